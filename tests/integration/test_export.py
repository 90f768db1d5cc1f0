"""Export and load: every registered method round-trips bit-exactly through a fresh process.

One module fixture compresses the tiny reference decoder with every registered method (small
calibration, duo-svd with a small KL probe), keeps the in-memory compressed model's logits, exports
it through the runner's own hook, and loads every export in one fresh interpreter. The tests then
compare logits (max abs diff 0 in float32), file sizes against the recorded parameter counts, and
check that truncated or edited exports are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.engine.compress import compress_model, restore
from harness.export import (
    MANIFEST,
    ExportError,
    export_model,
    load_compressed,
    read_manifest,
    verify_export,
)
from harness.records import run_key
from harness.runs import RunConfig, Session, key_fields, prepare, run
from harness.runs.export import export_cell
from methods import METHODS, parse_method
from tests.utils import CALIB, make_tiny_model_dir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RATIO = 0.4
# Small options where a method has a slow stage (duo-svd's KL probe runs the model per candidate).
METHOD_STRINGS = {"duo-svd": "duo-svd[kl-knapsack.n_sequences=2,kl-knapsack.step=0.3]", "adasvd": "adasvd[adacomp.iters=2]",
                  "dobi-svd": "dobi-svd[dobi-gamma.epochs=1,dobi-gamma.n_sequences=2]",
                  "gfwsvd": "gfwsvd[kronecker-fisher.estimator=one-step]"}
# Token ids every comparison feeds (two sequences; the tiny vocabularies have >= 384 ids).
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))

LOAD_SCRIPT = """
import sys, torch
from harness.export import load_compressed
torch.set_num_threads(int(sys.argv[1]))
ids = torch.load(sys.argv[2])
out = {}
for path in sys.argv[4:]:
    model, _ = load_compressed(path)
    with torch.no_grad():
        out[path] = model(input_ids=ids).logits
torch.save(out, sys.argv[3])
"""


def _fresh_python(script: str, *args: str) -> None:
    """Run ``script`` in a new interpreter with this process's thread count (same kernels, same sums)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script, str(torch.get_num_threads()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _method_names() -> list[str]:
    return METHODS.names()


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per registered method: export dir, in-memory logits, its compression facts, fresh-process logits."""
    tmp = tmp_path_factory.mktemp("export")
    methods = tuple(METHOD_STRINGS.get(name, name) for name in _method_names())
    cfg = RunConfig(model=str(tiny_model_dirs["llama"]), methods=methods, ratios=(RATIO,), evals=(), calib=CALIB,
                    calib_samples=8, calib_seqlen=64, device="cpu", dtype="float32",
                    results=str(tmp / "res"), export=str(tmp / "exports"))
    prep = prepare(cfg)
    session = Session(prep)
    source = session.statistics()
    out: dict[str, dict] = {}
    for name, method in zip(_method_names(), prep.methods, strict=True):
        key = run_key(key_fields(prep, session.model_info, {"name": method.name, "config": method.config()}, RATIO,
                                 session.calibration.record()))
        result = compress_model(session.model, session.layout, method, RATIO, source, probes=session.probes(method))
        try:
            with torch.no_grad():
                logits = session.model(input_ids=IDS).logits
            path = export_cell(session, method, RATIO, key, result)
        finally:
            restore(session.model, result)
        out[name] = {"path": path, "logits": logits, "key": key, "params": result.params_model_compressed,
                     "targets": result.params_compressed}
    torch.save(IDS, tmp / "ids.pt")
    _fresh_python(LOAD_SCRIPT, str(tmp / "ids.pt"), str(tmp / "logits.pt"), *(str(v["path"]) for v in out.values()))
    loaded = torch.load(tmp / "logits.pt")
    for entry in out.values():
        entry["loaded_logits"] = loaded[str(entry["path"])]
    return out


@pytest.mark.parametrize("name", _method_names())
def test_round_trip_in_a_fresh_process_is_exact(exported: dict[str, dict], name: str):
    entry = exported[name]
    assert entry["logits"].dtype == torch.float32
    assert (entry["loaded_logits"] - entry["logits"]).abs().max().item() == 0.0
    manifest = read_manifest(entry["path"])
    assert manifest["run_key"] == entry["key"] and manifest["method"]["name"] == parse_method(
        METHOD_STRINGS.get(name, name)).name
    assert manifest["modules"], "nothing was replaced"
    assert manifest["parameters"] == entry["params"] == manifest["compression"]["params_model_compressed"]


@pytest.mark.parametrize("name", _method_names())
def test_file_size_matches_the_recorded_parameter_count(exported: dict[str, dict], name: str):
    entry = exported[name]
    manifest = read_manifest(entry["path"])
    (weights,) = manifest["weights"]
    file = entry["path"] / weights
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    # Indices of column-preserving layers are int64 buffers, not parameters; everything else is float32.
    indices = sum(spec["in_features"] for spec in manifest["modules"].values()
                  if spec["class"] == "ColumnPreservingLowRank")
    assert manifest["tensor_elements"] == {"float32": entry["params"], **({"int64": indices} if indices else {})}
    assert file.stat().st_size == 8 + header + 4 * entry["params"] + 8 * indices
    # The target linears' share: the stored factors are exactly the recorded compressed parameters.
    factor_params = sum(layer["params"] for layer in manifest["compression"]["layers"])
    assert factor_params == entry["targets"]


def test_duo_svd_export_covers_column_preserving_layers(exported: dict[str, dict]):
    # So the fresh-process round trip above also covers the column-preserving module and its buffers.
    classes = {spec["class"] for spec in read_manifest(exported["duo-svd"]["path"])["modules"].values()}
    assert classes == {"LowRankLinear", "ColumnPreservingLowRank"}


def test_column_preserving_round_trip(tiny_llama: Path, tmp_path: Path):
    """A hand-made column-preserving layer (with a bias) survives export and load bit-exactly."""
    from harness.engine.models import discover, get_module, load_model, set_module
    from methods.column_preserving import ColumnPreservingFactorization, ColumnPreservingLowRank

    model, tok = load_model(str(tiny_llama), "float32")
    name = discover(model).modules[0].name
    lin = get_module(model, name)
    w = lin.weight.detach().double()
    n = w.shape[1]
    kept, rest = torch.arange(0, n, 7), torch.tensor([i for i in range(n) if i % 7])
    u, s, vh = torch.linalg.svd(w[:, rest], full_matrices=False)
    fact = ColumnPreservingFactorization(u[:, :5] * s[:5], vh[:5], w[:, kept], kept, rest)
    set_module(model, name, fact.to_module(torch.randn(w.shape[0]), torch.float32, "cpu"))
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    export_model(model, tok, tmp_path / "cp", method={"name": "hand"})
    loaded, _ = load_compressed(tmp_path / "cp")
    assert isinstance(loaded.get_submodule(name), ColumnPreservingLowRank)
    assert torch.equal(loaded.get_submodule(name).kept_idx, kept)
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["opt", "qwen2", "gpt_neox", "mistral", "gemma3"])
def test_families_round_trip(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Tied embeddings (OPT, Qwen2) are stored once and tied again; other block layouts load."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = make_tiny_model_dir(family, tmp_path / family)
    cfg = RunConfig(model=str(model_dir), methods=("svd",), ratios=(0.5,), evals=(), calib=CALIB, calib_samples=4,
                    calib_seqlen=32, device="cpu", dtype="float32", results=str(tmp_path / "res"))
    prep = prepare(cfg)
    session = Session(prep)
    result = compress_model(session.model, session.layout, prep.methods[0], 0.5, session.statistics())
    with torch.no_grad():
        ref = session.model(input_ids=IDS).logits
    export_model(session.model, session.tokenizer, tmp_path / "exp", method={"name": "svd"})
    restore(session.model, result)
    loaded, tok = load_compressed(tmp_path / "exp")
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - ref).abs().max().item() == 0.0
    manifest = loaded.svdbench_export
    tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
    assert bool(manifest["tied"]) == tied
    if tied:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert manifest["parameters"] == sum(p.numel() for p in loaded.parameters()) == result.params_model_compressed
    assert tok("a b").input_ids == session.tokenizer("a b").input_ids


# -- refusing damaged exports -----------------------------------------------------------------------

@pytest.fixture()
def damaged(exported: dict[str, dict], tmp_path: Path) -> Path:
    """A private copy of the svd export to damage."""
    return Path(shutil.copytree(exported["svd"]["path"], tmp_path / "copy"))


def test_truncated_weights_are_refused(damaged: Path):
    file = damaged / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors is truncated: \d+ bytes, the export wrote \d+"):
        load_compressed(damaged)


def test_edited_weights_are_refused(damaged: Path):
    file = damaged / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0x01  # one bit of one factor: same size, different content
    file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors does not match its SHA-256"):
        load_compressed(damaged)
    verify_export(damaged, checksums=False)  # sizes alone cannot see it; the checksum does


def test_edited_manifest_and_missing_files_are_refused(damaged: Path):
    manifest = json.loads((damaged / MANIFEST).read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["rank"] += 1
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="changed after export"):
        load_compressed(damaged)
    (damaged / MANIFEST).write_text(json.dumps(manifest)[:200])
    with pytest.raises(ExportError, match="not valid JSON"):
        load_compressed(damaged)
    (damaged / MANIFEST).unlink()
    with pytest.raises(ExportError, match="is not an svdbench export"):
        load_compressed(damaged)


def test_missing_tokenizer_is_refused(damaged: Path):
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json is missing"):
        load_compressed(damaged)


def test_export_refuses_a_non_empty_directory(exported: dict[str, dict], tmp_path: Path):
    entry = exported["svd"]
    model, tok = load_compressed(entry["path"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(model, tok, tmp_path / "busy", method={"name": "svd"})


# -- plain transformers, without svdbench ------------------------------------------------------------

def _recipe_from_docs() -> str:
    """The first Python block of docs/export.md: the stand-alone loader users copy."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match and "def load(path)" in match.group(1), "docs/export.md lost its loader recipe"
    return match.group(1)


PLAIN_RECIPE = "import sys\n" + _recipe_from_docs()

PLAIN_SCRIPT = PLAIN_RECIPE + """
torch.set_num_threads(int(sys.argv[1]))
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = load(sys.argv[4])(input_ids=ids).logits
assert not any(m.split(".")[0] in ("harness", "methods") for m in sys.modules), "svdbench was imported"
torch.save(logits, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["svd", "duo-svd", "basis-sharing"])
def test_plain_transformers_recipe_loads_an_export(exported: dict[str, dict], name: str, tmp_path: Path):
    """The recipe of docs/export.md (plain torch + transformers + safetensors, no svdbench) gives the same logits."""
    entry = exported[name]
    torch.save(IDS, tmp_path / "ids.pt")
    _fresh_python(PLAIN_SCRIPT, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), str(entry["path"]))
    assert (torch.load(tmp_path / "out.pt") - entry["logits"]).abs().max().item() == 0.0


# -- the runner flag and the export subcommand ------------------------------------------------------

def test_run_export_flag_and_export_command_agree(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from harness.cli import main

    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    flags = ["--model", str(tiny_llama), "--method", "svd-llm", "--ratio", "0.4", "--calib", CALIB,
             "--calib-samples", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-max-windows", "1",
             "--device", "cpu"]
    cfg = RunConfig(model=str(tiny_llama), methods=("svd-llm",), ratios=(0.4,), calib=CALIB, calib_samples=4,
                    calib_seqlen=32, eval_seqlen=32, eval_max_windows=1, device="cpu",
                    results=str(tmp_path / "res"), export=str(tmp_path / "exports"))
    record_path = run(cfg)[-1]
    record = json.loads(record_path.read_text())
    out = tmp_path / "exports" / record["run_key"]
    manifest = verify_export(out)
    assert manifest["run_key"] == record["run_key"] and manifest["parameters"] == record["params_model_compressed"]
    assert manifest["compression"]["achieved_ratio"] == record["achieved_ratio"]
    # A re-run keeps the finished cell and its export; a lost export is rebuilt without re-evaluating.
    mtime = record_path.stat().st_mtime_ns
    shutil.rmtree(out)
    run(cfg)
    assert record_path.stat().st_mtime_ns == mtime and verify_export(out)["run_key"] == record["run_key"]
    # The subcommand with the same flags writes the same model under the same run key.
    assert main(["export", *flags, "--out", str(tmp_path / "cli")]) == 0
    again = verify_export(tmp_path / "cli")
    assert again["run_key"] == record["run_key"]
    assert again["files"]["model.safetensors"] == manifest["files"]["model.safetensors"]
    assert main(["export", *flags, "--out", str(tmp_path / "cli")]) == 2  # refuses to overwrite
