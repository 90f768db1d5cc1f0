"""The LLM-scale engine on tiny random-init models: one statistic per distinct input, the per-block
store (verified on read), the fused and stored paths agreeing, and every file read back verified."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.cache import read_checked_json, write_checked_json
from harness.runs import RunConfig, Session, prepare, run
from harness.runs.loop import run_cell
from methods import parse_method
from tests.utils import CALIB, make_tiny_model_dir

pytestmark = pytest.mark.integration


def _config(model: Path, results: Path, methods: tuple[str, ...] = ("svd-llm",)) -> RunConfig:
    return RunConfig(model=str(model), methods=methods, ratios=(0.4,), calib=CALIB, calib_samples=8, calib_seqlen=32,
                     eval_seqlen=64, eval_max_windows=2, results=str(results))


def _cells(paths: list[Path]) -> dict[str, dict]:
    records = (json.loads(p.read_text()) for p in paths)
    return {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}


def _store_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("stats/*/gram/block-*.safetensors"))


@pytest.mark.parametrize("family,groups", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    # OPT defines k, v, q in that order; groups follow the model's module order.
    ("opt", [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_linears_reading_one_tensor_share_one_gram(family, groups, tmp_path, monkeypatch):
    """A Llama block has 7 target linears but 4 distinct inputs (q/k/v, o, gate/up, down): 4 Grams."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model_dir(family, tmp_path / family)
    rec = _cells(run(_config(model, tmp_path / "res")))["svd-llm"]
    assert rec["statistics"]["shared_inputs"] == groups
    assert rec["statistics"]["gram_product"] == "float32"
    files = _store_files(tmp_path / "cache")
    assert len(files) == 2  # one file per block
    with safe_open(str(files[0]), framework="pt") as fh:
        grams = [k for k in fh.keys() if k.endswith("::gram")]  # noqa: SIM118
    assert len(grams) == len(groups)
    # Sharing a Gram changes nothing: q, k and v are whitened with the same statistics.
    errs = {layer["name"].split(".", 3)[-1]: layer for layer in rec["layers"] if layer["block"] == 0}
    assert all(layer["calib_rel_error"] < 1 for layer in errs.values())


def test_fused_stored_and_paired_paths_agree(tiny_llama, tmp_path, monkeypatch):
    """The cold run (statistics computed in the fused pass) and the warm run (read from the store)
    give identical records, for a prior allocator (svd-llm), a calibrated one with a paired pass
    (adasvd) and a probe-driven one (duo-svd)."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    methods = ("svd-llm", "adasvd[adacomp.iters=2]", "duo-svd[kl-knapsack.n_sequences=2,kl-knapsack.step=0.3]")
    cold = _cells(run(_config(tiny_llama, tmp_path / "cold", methods)))
    warm = _cells(run(_config(tiny_llama, tmp_path / "warm", methods)))
    for name in methods:
        assert not warm[name]["timings_s"]["statistics"], name  # nothing recomputed
        assert warm[name]["metrics"]["wikitext2"]["ppl"] == cold[name]["metrics"]["wikitext2"]["ppl"], name
        for a, b in zip(cold[name]["layers"], warm[name]["layers"], strict=True):
            assert (a["rank"], a["calib_rel_error"]) == (b["rank"], b["calib_rel_error"]), (name, a["name"])
    assert cold["svd-llm"]["timings_s"]["statistics"] > 0
    assert warm["adasvd[adacomp.iters=2]"]["statistics"]["collected"] == ["gram", "block-cosine",
                                                                          "compressed-prefix-grams"]


def test_corrupted_block_file_is_moved_aside_and_recomputed(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    first = _cells(run(_config(tiny_llama, tmp_path / "a")))["svd-llm"]
    victim = _store_files(tmp_path / "cache")[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the tensor data: the header still parses
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = _cells(run(_config(tiny_llama, tmp_path / "b")))["svd-llm"]
    assert "fails its CRC-32 checksum" in caplog.text
    assert len(list((tmp_path / "cache").glob("stats/*/gram.corrupt-*"))) == 1
    assert again["metrics"]["wikitext2"]["ppl"] == first["metrics"]["wikitext2"]["ppl"]
    assert again["timings_s"]["statistics"] > 0  # recomputed, not read


def test_truncated_block_file_is_detected_before_use(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    run(_config(tiny_llama, tmp_path / "a"))
    victim = _store_files(tmp_path / "cache")[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        rec = _cells(run(_config(tiny_llama, tmp_path / "b")))["svd-llm"]
    assert "missing or truncated" in caplog.text and rec["status"] == "ok"


def test_truncated_record_is_moved_aside_and_the_cell_recomputed(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    paths = run(_config(tiny_llama, tmp_path / "res"))
    cell = next(p for p in paths if json.loads(p.read_text())["method"]["name"] == "svd-llm")
    good = json.loads(cell.read_text())
    cell.write_text(cell.read_text()[:200])
    with caplog.at_level(logging.WARNING):
        run(_config(tiny_llama, tmp_path / "res"))
    assert "unreadable record" in caplog.text
    assert json.loads(cell.read_text())["metrics"] == good["metrics"]
    assert len(list((tmp_path / "res").glob(f"{cell.name}.corrupt-*"))) == 1


def test_checked_json_moves_a_tampered_table_aside(tmp_path, caplog):
    path = tmp_path / "sensitivity" / "table.json"
    write_checked_json(path, {"fields": {"a": 1}, "table": {"m": [[0.5, 0.25]]}})
    assert read_checked_json(path)["table"]["m"] == [[0.5, 0.25]]
    path.write_text(path.read_text().replace("0.25", "0.35"))
    with caplog.at_level(logging.WARNING):
        assert read_checked_json(path) is None
    assert "failed its checksum" in caplog.text and not path.exists()
    assert len(list(path.parent.glob("table.json.corrupt-*"))) == 1


def test_corrupted_sensitivity_table_is_measured_again(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    method = "duo-svd[kl-knapsack.n_sequences=2,kl-knapsack.step=0.3]"
    first = _cells(run(_config(tiny_llama, tmp_path / "a", (method,))))[method]
    assert first["probes"]["kl_sensitivity"]["hit"] is False
    table = Path(first["probes"]["kl_sensitivity"]["cache"])
    table.write_text(table.read_text()[:-10])
    again = _cells(run(_config(tiny_llama, tmp_path / "b", (method,))))[method]
    assert again["probes"]["kl_sensitivity"]["hit"] is False and table.is_file()
    assert [layer["keep"] for layer in again["layers"]] == [layer["keep"] for layer in first["layers"]]
    third = _cells(run(_config(tiny_llama, tmp_path / "c", (method,))))[method]
    assert third["probes"]["kl_sensitivity"]["hit"] is True


def test_damaged_testbed_is_quarantined_and_retrained(tmp_path, monkeypatch):
    from harness.testbeds import trained as rm

    calls = []

    def fake_train(spec, out_dir, data_dir=None, *, seed=0, device="cpu", threads=None):
        calls.append(spec.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.safetensors").write_bytes(b"weights" * 10)
        card = {"name": spec.name, "files": {"model.safetensors": rm.directory_manifest(out_dir)["model.safetensors"]}}
        (out_dir / rm.CARD_NAME).write_text(json.dumps(card))
        return card

    monkeypatch.setattr(rm, "train_testbed_model", fake_train)
    path = rm.ensure_testbed_model("tiny-llama", cache_dir=tmp_path)
    assert rm.ensure_testbed_model("tiny-llama", cache_dir=tmp_path) == path and calls == ["tiny-llama"]
    (path / "model.safetensors").write_bytes(b"weightz" * 10)
    assert rm.ensure_testbed_model("tiny-llama", cache_dir=tmp_path) == path
    assert calls == ["tiny-llama", "tiny-llama"] and (path / "model.safetensors").read_bytes() == b"weights" * 10
    assert len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(_config(tmp_path / "no" / "such" / "dir", tmp_path / "res"))


def test_session_statistics_are_held_one_block_at_a_time(tiny_llama, tmp_path, monkeypatch):
    """Compression reads the store block by block: the loader is asked for each block once, in order,
    and never holds two blocks (the KL probe included)."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    session = Session(prepare(_config(tiny_llama, tmp_path / "res")))
    source = session.statistics()
    source.compute(source.missing(parse_method("svd-llm").statistics()))
    asked: list[int] = []
    real = source.load

    def load(block, statistics):
        asked.append(block)
        return real(block, statistics)

    monkeypatch.setattr(source, "load", load)
    run_cell(session, "svd-llm", 0.4)
    assert asked == list(range(session.layout.n_blocks))
    assert torch.is_tensor(real(0, parse_method("svd-llm").statistics())[0]["model.layers.0.mlp.down_proj"].gram)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "gemma3"])
def test_streamed_evaluation_equals_resident(family, tmp_path, monkeypatch):
    """Evaluation with blocks streamed through the device (the path of a model larger than the
    device, forced here on the CPU) gives the resident model's perplexity."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model_dir(family, tmp_path / family)
    ppl = {}
    for mode in ("never", "always"):
        cfg = dataclasses.replace(_config(model, tmp_path / mode), eval_offload=mode)
        for path in run(cfg):
            rec = json.loads(path.read_text())
            assert rec["evaluation"]["placement"] == ("streamed" if mode == "always" else "resident")
            ppl[(mode, rec["method"]["name"])] = rec["metrics"]["wikitext2"]["ppl"]
    for name in ("dense", "svd-llm"):
        assert ppl[("always", name)] == pytest.approx(ppl[("never", name)], rel=1e-6), name


def test_accelerate_offload_keeps_the_logits(tiny_llama):
    """Evaluations other than perplexity run under accelerate's CPU offload when the model does not
    fit; on the CPU it must leave the logits unchanged and remove its hooks afterwards."""
    pytest.importorskip("accelerate")
    from harness.engine.models import load_model
    from harness.engine.offload import offloaded

    model, _ = load_model(str(tiny_llama))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with offloaded(model, torch.device("cpu")):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
