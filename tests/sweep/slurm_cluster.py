"""A throwaway one-node SLURM on localhost for the live test: Debian's ``slurm-wlm`` and ``munge``,
one private directory for the configuration, state, spool, logs and munge socket, and the three
daemons (munged, slurmctld, slurmd) started in the foreground so that they are stopped by their own
process ids, never by name.

The configuration works inside an unprivileged container: processes are tracked through /proc
(``proctrack/linuxproc``), no cgroup task plugin, no accounting storage (``sacct`` is unavailable,
``squeue --states=all`` reports finished jobs for ``MinJobAge`` seconds instead).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("svdbench.test.slurm")

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    """The live cluster cannot run here; the message says exactly why (it becomes the skip reason)."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_packages() -> None:
    """Install ``slurm-wlm`` and ``munge`` with apt-get unless their programs are already there.

    Raises:
        SlurmUnavailable: not root, no apt-get, or the installation failed (with apt's last lines).
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"needs root to install {' and '.join(PACKAGES)} and start munged, slurmctld and "
                               f"slurmd (running as uid {os.geteuid()})")
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        log.info("slurm-wlm and munge already installed (%s)", shutil.which("slurmctld"))
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    t0 = time.monotonic()
    for attempt in ([install], [["apt-get", "update", "-q"], install]):  # update only when needed
        for command in attempt:
            log.info("$ %s", shlex.join(command))
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                break
        else:
            log.info("installed %s in %.0f s", " ".join(PACKAGES), time.monotonic() - t0)
            return
    raise SlurmUnavailable(f"`{shlex.join(command)}` failed (exit {proc.returncode}): "
                           f"{_tail(proc.stderr or proc.stdout, 3)}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """One SLURM node on localhost, configured under ``root``.

    Args:
        root: An empty private directory (the munge key and socket live there).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- commands ------------------------------------------------------------------------------
    def sh(self, *command: str, check: bool = True, quiet: bool = False, timeout_s: float = 60) -> str:
        """Run a SLURM client command against this cluster; log it (and its output unless ``quiet``)."""
        if not quiet:
            log.info("$ %s", shlex.join(command))
        proc = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout_s)
        out = (proc.stdout + proc.stderr).strip()
        if out and not quiet:
            log.info("%s", out)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited {proc.returncode}: {out}")
        return proc.stdout

    def state(self, job_id: str) -> str:
        """``STATE|REASON`` of one job as squeue shows it ('' when unknown)."""
        out = self.sh("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r", f"--jobs={job_id}",
                      check=False, quiet=True)
        return next((line.split("|", 1)[1] for line in out.splitlines() if line.split("|")[0] == job_id), "")

    def signal(self, job_id: str, name: str) -> None:
        """``scancel --signal=NAME JOB``, as SLURM signals a job it preempts or is about to time out.

        The signal is delivered at once, but when the job's handler requeues the job at once too (as
        submitit's does), scancel is told the job "can not be altered now" and retries for a minute
        or more: it is stopped after two seconds.
        """
        command = ["scancel", f"--signal={name}", job_id]
        log.info("$ %s", shlex.join(command))
        try:
            subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=2)
        except subprocess.TimeoutExpired:
            log.info("(scancel still retrying after 2 s, the job being requeued: stopped it)")

    # -- life cycle ----------------------------------------------------------------------------
    def _node_line(self) -> tuple[int, int]:
        """CPUs and memory (MB) of this machine as slurmd sees them (the node must not claim more)."""
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60).stdout
        cpus = re.search(r"\bCPUs=(\d+)", out)
        mem = re.search(r"\bRealMemory=(\d+)", out)
        return (int(cpus[1]) if cpus else os.cpu_count() or 1), (int(mem[1]) if mem else 1024)

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        cpus, mem = self._node_line()
        user = pwd.getpwuid(os.geteuid()).pw_name
        r = self.root
        self.conf.write_text(f"""\
ClusterName=svdbench-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
# Inside a container: processes tracked through /proc, no cgroup plugin, no accounting storage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# submitit ignores SIGTERM, so a cancelled job ends with the SIGKILL that follows KillWait seconds later.
KillWait=2
# Without accounting, squeue is the only record of finished jobs: keep them listed for 10 minutes.
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        log.info("slurm.conf for node %s (%d CPUs, %d MB) at %s", self.host, cpus, mem, self.conf)

    def _spawn(self, name: str, command: Sequence[str]) -> None:
        out = (self.root / "log" / f"{name}.out").open("w")
        log.info("$ %s", shlex.join(command))
        self.procs[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        out.close()
        log.info("%s started, pid %d", name, self.procs[name].pid)

    def _why_down(self, name: str) -> str:
        logs = [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"]
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
        return f"{name} did not come up: {_tail(text, 8) or 'no output'}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait for the node to be idle.

        Raises:
            SlurmUnavailable: when a daemon exits or the node is not idle within ``timeout_s``.
        """
        self.write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"])
        self._wait(lambda: self.socket.exists(), "munged", 15)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.sh("sinfo", "--noheader", check=False, quiet=True) != "", "slurmctld", timeout_s)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(lambda: "idle" in self.sh("sinfo", "--noheader", "--Node", "--format=%T", check=False, quiet=True),
                   "slurmd", timeout_s)
        self.sh("sinfo", "--Node", "--long")

    def _wait(self, ready, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(self._why_down(name))
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop slurmd, slurmctld and munged by their process ids."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.sh("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
            deadline = time.monotonic() + 15
            while self.sh("squeue", "--noheader", check=False, quiet=True).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            log.info("stopping %s (pid %d)", name, proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            log.info("%s (pid %d) exited %s", name, proc.pid, proc.returncode)
