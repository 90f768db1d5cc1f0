"""Build the reference leaderboard: run the sweep, then write the table and the figures.

    python -m benchmarks.make_reference_results [--executor submitit] [key=value ...]

1. ``svdbench sweep benchmarks/reference_leaderboard.yaml results=<results>`` (resumable: only the
   missing cells run; extra ``key=value`` overrides are passed through, e.g. ``ratios=[0.4]``),
2. ``svdbench leaderboard <results>`` as ``leaderboard.md``, ``.tex`` and ``.csv`` in ``<results>`` and
   the HTML site in ``<results>/site``,
3. ``svdbench plot <results> --kind ppl-vs-ratio rank-allocation --out <figures>`` (PDF + PNG), with
   ``zeroshot-vs-ratio`` (average zero-shot accuracy) too when the sweep evaluates ``zeroshot``.

The reports are written even when some cells failed (they show what exists); the exit code is then
the sweep's (1). Needs ``SVDBENCH_DATA`` (the calibration file lives in the data pack).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from harness.cli import main as svdbench
from harness.evaluations.perplexity import PROTOCOLS as PERPLEXITY_PROTOCOLS
from harness.evaluations.zeroshot import TASK_KEY
from harness.evaluations.zeroshot_tasks import chance_average
from harness.sweep.spec import load_spec

log = logging.getLogger("benchmarks.make_reference_results")

SPEC = Path(__file__).with_name("reference_leaderboard.yaml")


def make_reference_results(results: str | Path = "results/reference", figures: str | Path = "results/figures",
                           overrides: Sequence[str] = (), spec: str | Path = SPEC,
                           executor: str | None = None, retry_failed: bool = False,
                           reports_only: bool = False) -> int:
    """Sweep, leaderboard and figures; returns the process exit code.

    Args:
        results: Record directory (the sweep's ``results``); the leaderboard lands here too.
        figures: Figure directory.
        overrides: Extra sweep overrides (``key=value``).
        spec: The sweep spec (default: the shipped reference leaderboard).
        executor: ``inprocess`` (default), ``local-gpus`` or ``submitit``.
        retry_failed: Rerun cells recorded as failed.
        reports_only: Skip the sweep; write the reports from the records that exist.

    Returns:
        0 when every cell is ok and the reports were written; 1 when cells failed; 2 when the sweep
        could not run or a report could not be written.
    """
    code = 0
    if not reports_only:
        argv = ["sweep", str(spec), f"results={results}", *overrides]
        argv += ["--executor", executor] if executor else []
        argv += ["--retry-failed"] if retry_failed else []
        code = svdbench(argv)
        if code == 2:
            return code
    name = Path(spec).stem.replace("_", "-")
    kinds, plot_flags = _figure_kinds(results, load_spec(spec, overrides).evals)
    steps = [
        ["leaderboard", str(results), "--format", "md", "--output", str(Path(results) / "leaderboard.md")],
        ["leaderboard", str(results), "--format", "latex", "--output", str(Path(results) / "leaderboard.tex")],
        ["leaderboard", str(results), "--format", "csv", "--output", str(Path(results) / "leaderboard.csv")],
        ["leaderboard", str(results), "--format", "html", "--out", str(Path(results) / "site")],
        ["plot", str(results), "--kind", *kinds, "rank-allocation", *plot_flags, "--out", str(figures), "--sweep-id", name],
    ]
    for step in steps:
        if svdbench(step) != 0:
            log.error("svdbench %s failed", " ".join(step))
            return 2
    return code


def _figure_kinds(results: str | Path, evals: Sequence[str]) -> tuple[list[str], list[str]]:
    """Figure kinds and their flags (``--metric``, ``--chance``) for what the results folder holds, not
    only this spec.

    A perplexity sweep and a zero-shot sweep share one folder (the two halves of the main table), so
    the perplexity figure is drawn when any record has a perplexity and the zero-shot-average figure
    when any has zero-shot, with the task set's chance level as a line; an encoder's folder gets its
    first metric against the ratio.
    """
    from harness.report.store import load_store

    columns = set(load_store(results).columns)
    kinds = [kind for kind, present in (
        ("ppl-vs-ratio", any(f"{p}.ppl" in columns for p in PERPLEXITY_PROTOCOLS)),
        ("zeroshot-vs-ratio", "zeroshot.average" in columns),
    ) if present]
    if not kinds:
        return ["metric-vs-ratio"], ["--metric", evals[0]]
    tasks = sorted(m.group(1) for c in columns if (m := TASK_KEY.match(c)) and m.group(2) == "value")
    chance = chance_average(tasks) if "zeroshot-vs-ratio" in kinds else None
    return kinds, [] if chance is None else ["--chance", f"{chance:g}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="sweep overrides, e.g. ratios=[0.4]")
    parser.add_argument("--results", default="results/reference")
    parser.add_argument("--figures", default="results/figures")
    parser.add_argument("--spec", default=str(SPEC))
    parser.add_argument("--executor", choices=("inprocess", "local-gpus", "submitit"))
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--reports-only", action="store_true", help="skip the sweep; tables and figures only")
    args = parser.parse_intermixed_args(argv)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting is chatty at INFO
    return make_reference_results(args.results, args.figures, args.overrides, args.spec, args.executor,
                                  args.retry_failed, args.reports_only)


if __name__ == "__main__":
    raise SystemExit(main())
