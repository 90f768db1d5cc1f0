"""Adding an evaluation touches one file: this test registers one and runs it through ``svdbench run``,
``svdbench sweep`` and ``svdbench leaderboard`` without changing anything else in svdbench.

The toy evaluation: top-1 agreement of the model's next-token predictions with the dense model's on a
fixed random token sequence (its dense reference is computed once per run, before any cell), with
one option (the sequence length) that must reach the run key and the record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harness.cli import main
from harness.evaluations import EvalSettings, Evaluation, MetricSpec, register_evaluation
from harness.records import read_record
from harness.runs import RunConfig, freeze_eval_options, run
from harness.sweep.run import dry_run, run_sweep
from harness.sweep.spec import load_spec
from tests.utils import DATA, make_tiny_model_dir

pytestmark = pytest.mark.integration

NAME = "toy-agreement"


def _tokens(model: torch.nn.Module, n_tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=generator)


def _predictions(model: torch.nn.Module, s: EvalSettings) -> torch.Tensor:
    ids = _tokens(model, s.options[NAME]["n_tokens"]).to(s.device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.argmax(-1).cpu()


def _reference(model: torch.nn.Module, tokenizer: Any, s: EvalSettings) -> None:
    s.cache.setdefault(NAME, _predictions(model, s))


def _run(model: torch.nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
    agree = (_predictions(model, s) == s.cache[NAME]).double().mean().item()
    return {"protocol": f"{NAME}@{s.options[NAME]['n_tokens']}", "top1": agree}


register_evaluation(Evaluation(
    NAME, _run,
    metrics=(MetricSpec(f"{NAME}.top1", "Top-1 agree", True, "score"),),
    aliases={"toy": f"{NAME}.top1"},
    reference=_reference,
    options={"n_tokens": 64},
))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_tiny_model_dir("llama", tmp_path_factory.mktemp("toy") / "tiny-llama")
    (model.parent / "calib.txt").write_text((DATA / "wikitext-2-v1" / "valid.txt").read_text()[:40_000])
    return model


def _config(model: Path, results: Path, **options: Any) -> RunConfig:
    return RunConfig(model=str(model), methods=("svd",), ratios=(0.6,), evals=(NAME,),
                     calib=f"file:{model.parent / 'calib.txt'}", calib_samples=8, calib_seqlen=64,
                     device="cpu", dtype="float32", results=str(results),
                     eval_options=freeze_eval_options({NAME: options} if options else None))


def test_toy_evaluation_through_run_sweep_and_leaderboard(tiny: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    # svdbench run: the option reaches the evaluation, the record and the run key.
    paths = run(_config(tiny, results, n_tokens=48))
    dense, cell = (read_record(p) for p in paths)
    assert dense["metrics"][NAME] == {"protocol": f"{NAME}@48", "top1": 1.0}
    assert 0.0 <= cell["metrics"][NAME]["top1"] < 1.0  # plain SVD at 60% changes some predictions
    assert cell["evaluation"]["options"] == {NAME: {"n_tokens": 48}}
    default_key = Path(run(_config(tiny, tmp_path / "default"))[1]).stem
    assert default_key != Path(paths[1]).stem  # the option is part of what determines the result

    # svdbench sweep with the same settings finds the run's records: one run loop, one key definition.
    spec = {"sweep": {
        "name": "toy", "results": str(results),
        "grid": {"models": [str(tiny)], "methods": ["svd", "svd-llm"], "ratios": [0.6]},
        "evals": [NAME],
        "calibration": {"source": f"file:{tiny.parent / 'calib.txt'}", "samples": 8, "seqlen": 64},
        "eval": {"options": {NAME: {"n_tokens": 48}}},
        "device": "cpu", "dtype": "float32",
    }}
    spec_path = tmp_path / "toy.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    plan = dry_run(load_spec(spec_path))
    assert "2 done, 0 failed, 1 missing" in plan  # dense and svd from the run; svd-llm to compute
    result = run_sweep(load_spec(spec_path))
    assert result.ok and [o.cell.method for o in result.outcomes] == ["svd-llm"]
    whitened = read_record(result.outcomes[0].cell.path)["metrics"][NAME]["top1"]
    assert 0.0 <= whitened <= 1.0

    # svdbench leaderboard: the column is labelled and directed by the registration.
    csv = tmp_path / "board.csv"
    assert main(["leaderboard", str(results), "--metrics", "toy", "--format", "csv", "--output", str(csv)]) == 0
    rows = csv.read_text().splitlines()
    assert f"{NAME}.top1" in rows[0] or "Top-1 agree" in rows[0]
    assert len(rows) == 4  # header, dense, svd, svd-llm
    md = tmp_path / "board.md"
    assert main(["leaderboard", str(results), "--format", "md", "--output", str(md)]) == 0
    assert "Top-1 agree↑" in md.read_text()


def test_unknown_option_is_refused_before_loading(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr("harness.runs.session.load_model", refuse)
    with pytest.raises(ValueError, match="has no option 'n_token'"):
        run(_config(tiny, tmp_path, n_token=3))
    assert main(["run", "--model", str(tiny), "--method", "svd", "--ratio", "0.5", "--eval", "wikitext2",
                 "--eval-option", f"{NAME}.n_tokens=3", "--results", str(tmp_path)]) == 2  # not evaluated in this run
    assert not list(tmp_path.glob("*.json"))
    json.dumps(freeze_eval_options({NAME: {"n_tokens": 3}}))  # the frozen form stays JSON-serialisable
