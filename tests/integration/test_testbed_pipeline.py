"""Issue-2 and issue-7 acceptance on the trained tiny testbed models.

Perplexity here scores the first 8 windows of the standard protocol (the full protocol runs in
benchmarks/ and the demo); everything else is the real pipeline.
"""

from __future__ import annotations

import json
import socket

import pytest

from harness.runs import RunConfig, run
from tests.utils import DATA

pytestmark = pytest.mark.integration
CALIB = f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}"


def _records(paths):
    return [json.loads(p.read_text()) for p in paths]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_testbeds_svd_and_svd_llm(family, tiny_model_dirs, tmp_path):
    ratios = (0.2, 0.6)
    cfg = RunConfig(model=str(tiny_model_dirs[family]), methods=("svd", "svd-llm"), ratios=ratios, calib=CALIB,
                    calib_samples=32, calib_seqlen=256, eval_max_windows=8, results=str(tmp_path))
    records = _records(run(cfg))
    assert len(records) == 1 + 2 * len(ratios)
    by_cell = {(r["method"]["name"], r["ratio"]): r for r in records}
    for rec in records:
        ppl = rec["metrics"]["wikitext2"]
        assert ppl["ppl"] is not None and 1 < ppl["ppl"] < 1e5 and ppl["nonfinite_windows"] == 0
        if rec["ratio"] > 0:
            assert abs(rec["achieved_ratio"] - rec["ratio"]) < 0.01
    for r in ratios:
        plain = {layer["name"]: layer["calib_rel_error"] for layer in by_cell[("svd", r)]["layers"]}
        for layer in by_cell[("svd-llm", r)]["layers"]:
            assert layer["calib_rel_error"] <= plain[layer["name"]] + 1e-9, (r, layer["name"])


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection to a non-loopback address fails the test."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in {"localhost", "::1"}):
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_zeroshot_and_ptb_records_on_a_testbed(tiny_model_dirs, tmp_path, no_network):
    # PIQA is left out: some of its solutions are longer than the testbed models' 256-token
    # context, which lm-eval cannot score (asserted in harness.evaluations with a clear message).
    # The first 100 documents of each task (lm-eval's --limit, recorded); full packs are scored in
    # tests/integration/test_zeroshot.py and in results/.
    tasks = ("openbookqa", "winogrande")
    pack_docs = {"openbookqa": 500, "winogrande": 1267}
    cfg = RunConfig(model=str(tiny_model_dirs["llama"]), methods=("svd-llm",), ratios=(0.4,),
                    evals=("wikitext2", "ptb", "zeroshot"), tasks=tasks, calib=CALIB, calib_samples=32,
                    calib_seqlen=256, eval_max_windows=8, eval_batch_size=16, limit=100, results=str(tmp_path))
    records = _records(run(cfg))
    assert {r["method"]["name"] for r in records} == {"dense", "svd-llm"}
    for rec in records:
        assert rec["metrics"]["ptb"]["protocol"] == "ptb@test-256:first8" and rec["metrics"]["ptb"]["ppl"] > 1
        zs = rec["metrics"]["zeroshot"]
        assert zs["protocol"].startswith("zeroshot@lm-eval-") and zs["lm_eval_version"] and zs["limit"] == 100
        assert set(zs["tasks"]) == set(tasks) and 0 <= zs["average"] <= 1 and "results" in zs["raw"]
        for name, task in zs["tasks"].items():
            assert task["n_docs"] == 100 and task["n_docs_total"] == pack_docs[name] and task["source"] == "local-pack"
            assert 0 <= task["acc"] <= 1 and task["acc_stderr"] is not None
            assert task["metric"] in {"acc", "acc_norm"} and task["value"] == task[task["metric"]]
            if name == "openbookqa":
                assert 0 <= task["acc_norm"] <= 1
