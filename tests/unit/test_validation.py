"""Bad input fails with a clear message before any model is loaded."""

from __future__ import annotations

import pytest

import harness.engine.models
from harness.cli import main
from harness.runs import RunConfig, prepare, run
from tests.utils import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(harness.engine.models, "load_model", refuse)
    monkeypatch.setattr("harness.runs.session.load_model", refuse)


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), methods=("svd",), ratios=(0.4,), calib="file:" + str(model_dir / "config.json"))
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2, -0.3])
def test_ratio_outside_unit_interval(model_dir, ratio):
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\)"):
        run(_cfg(model_dir, ratios=(ratio,)))


def test_unknown_method_names_closest(model_dir):
    with pytest.raises(KeyError, match="Did you mean 'svd-llm'"):
        run(_cfg(model_dir, methods=("svdllm",)))


def test_missing_data_file(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wikitext-2-raw-v1/test.jsonl"):
        run(_cfg(model_dir))


def test_missing_calibration_file(model_dir):
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        run(_cfg(model_dir, calib="file:/nonexistent/calib.txt"))


def test_eval_seqlen_above_model_limit(model_dir):
    with pytest.raises(ValueError, match="exceeds the model's maximum of 128 positions"):
        run(_cfg(model_dir, eval_seqlen=4096))


def test_default_eval_seqlen_is_capped_by_model(model_dir):
    assert prepare(_cfg(model_dir)).eval_seqlen == 128


def test_cli_reports_error_and_exit_code(model_dir, capsys):
    code = main(["run", "--model", str(model_dir), "--method", "svd", "--ratio", "1.5", "--calib", "file:/x"])
    assert code == 2


def test_demo_refuses_an_unknown_model_before_any_work(tmp_path):
    from harness.demo import demo

    with pytest.raises(ValueError, match="demo model must be one of smollm2-135m"):
        demo(tmp_path, "llama-7b")
