"""Exports load with plain transformers (remote code), ``svdbench validate`` checks them, and
``svdbench run-external`` evaluates them as cells of their base model (docs/export.md).

One module fixture compresses tiny random-init models (llama with svd-llm, duo-svd and
basis-sharing; qwen2, with tied embeddings, and gemma3 with svd) and exports them; one fresh
interpreter that cannot import svdbench loads every export through ``trust_remote_code``, round-trips
it through ``save_pretrained``, tries loading without the flag, and runs lm-eval's ``HFLM`` on one.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.export import (
    FORMAT_VERSION,
    MANIFEST,
    ExportError,
    load_compressed,
    manifest_digest,
    read_manifest,
    sha256_file,
)
from harness.remote_code import TEMPLATE, base_config
from harness.runs.validate import validate_export
from tests.export_helpers import export_compressed, run_without_svdbench

pytestmark = pytest.mark.integration

RATIO = 0.4
LLAMA_METHODS = ("svd-llm", "duo-svd[kl-knapsack.n_sequences=2,kl-knapsack.step=0.3]", "basis-sharing")
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))

REMOTE_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(sys.argv[1]))
ids = torch.load(sys.argv[2])
lm_eval_path, paths = sys.argv[4], sys.argv[5:]
models = {}
for path in paths:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(path + "-resaved")
    again = AutoModelForCausalLM.from_pretrained(path + "-resaved", trust_remote_code=True)
    with torch.no_grad():
        resaved = again(input_ids=ids).logits
    tokenizer = AutoTokenizer.from_pretrained(path)  # no flag: falls back once the remote-code question fails
    models[path] = {"logits": logits, "resaved": resaved, "class": type(model).__name__,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "resaved_files": sorted(os.listdir(path + "-resaved")), "tokens": tokenizer("The cat sat.").input_ids}
try:
    AutoModelForCausalLM.from_pretrained(paths[0])
    refusal = None
except Exception as exc:
    refusal = f"{type(exc).__name__}: {exc}"
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained=lm_eval_path, trust_remote_code=True, device="cpu", batch_size=1)
(score, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The cat", " sat"), 0)])
context, continuation = lm._encode_pair("The cat", " sat")
with torch.no_grad():
    logits = lm.model(input_ids=torch.tensor([context + continuation])).logits[0, :-1].log_softmax(-1)
expected = sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("harness", "methods"))
torch.save({"models": models, "refusal": refusal, "leaked": leaked,
            "lm_eval": {"class": type(lm.model).__name__, "score": score, "expected": expected}}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per export name (``llama-svd-llm``, ...): path, base model dir, svdbench's loader logits."""
    tmp = tmp_path_factory.mktemp("remote")
    made = {**export_compressed("llama", LLAMA_METHODS, RATIO, tmp),
            **{f"{fam}-svd": e for fam in ("qwen2", "gemma3") for e in export_compressed(fam, ("svd",), 0.5, tmp).values()}}
    out: dict[str, dict] = {}
    for entry in made.values():
        model, tokenizer = load_compressed(entry["path"])
        with torch.no_grad():
            out[entry["path"].name] = {**entry, "logits": model(input_ids=IDS).logits,
                                       "tokens": tokenizer("The cat sat.").input_ids}
    return out


@pytest.fixture(scope="module")
def remote(exports: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What the svdbench-free interpreter saw (one run for every export)."""
    tmp = tmp_path_factory.mktemp("remote-run")
    torch.save(IDS, tmp / "ids.pt")
    paths = [str(e["path"]) for e in exports.values()]
    proc = run_without_svdbench(REMOTE_SCRIPT, str(torch.get_num_threads()), str(tmp / "ids.pt"), str(tmp / "out.pt"),
                                str(exports["llama-basis-sharing"]["path"]), *paths, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


# -- plain transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-svd-llm", "llama-duo-svd", "llama-basis-sharing", "qwen2-svd", "gemma3-svd"])
def test_remote_code_gives_the_loaders_logits_exactly(exports: dict[str, dict], remote: dict, name: str):
    entry, seen = exports[name], remote["models"][str(exports[name]["path"])]
    assert remote["leaked"] == [], "the fresh interpreter imported svdbench"
    assert seen["class"] == "SvdbenchLowRankForCausalLM"
    assert entry["logits"].dtype == torch.float32 and torch.equal(seen["logits"], entry["logits"])
    manifest = read_manifest(entry["path"])
    assert seen["parameters"] == manifest["parameters"]  # shared bases and tied heads are shared again
    # save_pretrained round-trips: the same classes, each shared tensor once, identical logits.
    assert torch.equal(seen["resaved"], entry["logits"])
    assert {"config.json", "model.safetensors", "modeling_svdbench.py"} <= set(seen["resaved_files"])
    assert seen["tokens"] == entry["tokens"]


def test_the_exports_cover_every_replacement_class(exports: dict[str, dict]):
    classes = {spec["class"] for e in exports.values() for spec in read_manifest(e["path"])["modules"].values()}
    assert classes == {"LowRankLinear", "ColumnPreservingLowRank", "SharedBasisLinear"}
    assert read_manifest(exports["llama-basis-sharing"]["path"])["tied"]  # bases stored once
    assert read_manifest(exports["qwen2-svd"]["path"])["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_without_trust_remote_code_loading_is_refused(remote: dict):
    assert remote["refusal"] is not None, "from_pretrained without trust_remote_code loaded the export"
    assert "trust_remote_code=True" in remote["refusal"]


def test_lm_eval_hflm_scores_an_export(remote: dict):
    result = remote["lm_eval"]
    assert result["class"] == "SvdbenchLowRankForCausalLM"
    assert result["score"] < 0 and result["score"] == pytest.approx(result["expected"], abs=1e-4)


def test_the_modeling_file_is_self_contained_and_checksummed(exports: dict[str, dict]):
    path = exports["llama-svd-llm"]["path"]
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["files"]["modeling_svdbench.py"]["sha256"] == sha256_file(TEMPLATE)
    assert "config.json" in manifest["files"]
    tree = ast.parse(TEMPLATE.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "typing", "torch", "transformers"}
    version = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", None) == "FORMAT_VERSION")
    assert version == FORMAT_VERSION
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "svdbench_lowrank" and config["svdbench"]["modules"] == manifest["modules"]


def test_the_modeling_file_refuses_a_newer_format():
    from harness.remote_code import modeling_svdbench

    with pytest.raises(ValueError, match="export format 3; this modeling file reads up to 2"):
        modeling_svdbench._svdbench_block({"svdbench": {"base_config_class": "LlamaConfig", "format_version": 3}})


# -- versions -------------------------------------------------------------------------------------------

def _rewrite_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def test_a_format_1_export_still_loads(exports: dict[str, dict], tmp_path: Path):
    """The layout before remote code: base config.json, no modeling file."""
    entry = exports["llama-basis-sharing"]
    old = Path(shutil.copytree(entry["path"], tmp_path / "v1"))
    base_config(old).save_pretrained(old)  # the base model's own config.json
    (old / "modeling_svdbench.py").unlink()

    def as_v1(manifest: dict) -> None:
        manifest["format_version"] = 1
        del manifest["files"]["modeling_svdbench.py"]
        manifest["files"]["config.json"] = {"bytes": (old / "config.json").stat().st_size,
                                            "sha256": sha256_file(old / "config.json")}

    _rewrite_manifest(old, as_v1)
    model, _ = load_compressed(old)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, entry["logits"])
    report = validate_export(old)
    assert report.ok, report.render()


def test_a_newer_format_is_refused_naming_both_versions(exports: dict[str, dict], tmp_path: Path):
    newer = Path(shutil.copytree(exports["llama-svd-llm"]["path"], tmp_path / "v3"))
    _rewrite_manifest(newer, lambda m: m.update(format_version=3))
    with pytest.raises(ExportError, match=r"format version 3; this svdbench reads versions 1, 2; upgrade svdbench"):
        load_compressed(newer)
    assert "format version 3" in validate_export(newer).render()


# -- svdbench validate ------------------------------------------------------------------------------------

@pytest.fixture()
def copy(exports: dict[str, dict], tmp_path: Path) -> Path:
    """A private copy of the llama svd-llm export to damage."""
    return Path(shutil.copytree(exports["llama-svd-llm"]["path"], tmp_path / "copy"))


def _problems(path: Path, **kwargs) -> list[str]:
    report = validate_export(path, **kwargs)
    assert not report.ok, report.render()
    return [f"{f.check}: {f.message}" for f in report.problems()]


def test_validate_accepts_a_good_export(copy: Path, capsys: pytest.CaptureFixture):
    from harness.cli import main

    report = validate_export(copy, remote_code=True)
    assert report.ok, report.render()
    assert {f.check for f in report.findings} >= {"manifest", "files", "config", "modules", "load", "counts",
                                                  "logits", "remote-code"}
    assert main(["validate", str(copy)]) == 0
    assert f"{copy}: OK" in capsys.readouterr().out


def test_validate_rejects_a_truncated_file(copy: Path, capsys: pytest.CaptureFixture):
    from harness.cli import main

    file = copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    assert any("files: model.safetensors is truncated" in p for p in _problems(copy))
    assert main(["validate", str(copy)]) == 1
    assert "FAIL files: model.safetensors is truncated" in capsys.readouterr().out


def test_validate_rejects_a_rank_edited_in_the_manifest(copy: Path):
    name = next(iter(read_manifest(copy)["modules"]))

    def bump(manifest: dict) -> None:
        manifest["modules"][name]["rank"] += 1

    _rewrite_manifest(copy, bump)  # a consistent-looking manifest (digest recomputed)
    problems = _problems(copy)
    assert any(p.startswith(f"modules: {name} (LowRankLinear of rank") and "its rank implies" in p for p in problems)
    assert any(p.startswith("config: config.json and svdbench.json record different modules") for p in problems)


def test_validate_rejects_a_tensor_of_another_rank(copy: Path):
    from safetensors.torch import load_file, save_file

    manifest = read_manifest(copy)
    name = next(iter(manifest["modules"]))
    state = load_file(str(copy / "model.safetensors"))
    state[f"{name}.first.weight"] = state[f"{name}.first.weight"][:-1].clone()
    state[f"{name}.second.weight"] = state[f"{name}.second.weight"][:, :-1].contiguous()
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})

    def resum(m: dict) -> None:  # the checksums updated as if the file had been exported so
        m["files"]["model.safetensors"] = {"bytes": (copy / "model.safetensors").stat().st_size,
                                           "sha256": sha256_file(copy / "model.safetensors")}

    _rewrite_manifest(copy, resum)
    problems = _problems(copy)
    rank = manifest["modules"][name]["rank"]
    assert any(p.startswith(f"modules: {name} (LowRankLinear of rank {rank}") and f"shape ({rank - 1}," in p
               for p in problems)
    assert any(p.startswith("load: svdbench's loader refuses it") for p in problems)


def test_validate_rejects_a_tampered_achieved_ratio(copy: Path):
    _rewrite_manifest(copy, lambda m: m["compression"].update(achieved_ratio=m["compression"]["achieved_ratio"] + 0.05))
    problems = _problems(copy)
    assert any(p.startswith("counts: achieved_ratio ") and "disagrees with the stored model" in p for p in problems)
    assert not any(p.startswith("manifest") for p in problems)  # only the lie, not the digest
    # The same edit without a new digest is also named as an edit.
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["compression"]["achieved_ratio"] -= 0.04
    (copy / MANIFEST).write_text(json.dumps(manifest))
    problems = _problems(copy)
    assert any(p.startswith("manifest: svdbench.json was changed after export") for p in problems)
    assert any(p.startswith("counts: achieved_ratio ") for p in problems)


def test_validate_reruns_the_records_perplexity(copy: Path, tmp_path: Path):
    from harness.evaluations.perplexity import evaluate_protocol

    model, tokenizer = load_compressed(copy)
    want = evaluate_protocol("wikitext2", model, tokenizer, 32, torch.device("cpu"), max_windows=2)
    record = tmp_path / "res" / f"{read_manifest(copy)['run_key']}.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"metrics": {"wikitext2": {"protocol": want["protocol"], "ppl": want["ppl"]}}}))
    report = validate_export(copy, ppl="wikitext2", results=tmp_path / "res")
    assert report.ok and "matches the record" in report.findings[-1].message, report.render()
    record.write_text(json.dumps({"metrics": {"wikitext2": {"protocol": want["protocol"], "ppl": want["ppl"] * 1.1}}}))
    assert any(p.startswith("ppl: perplexity") and "the record says" in p
               for p in _problems(copy, ppl="wikitext2", results=tmp_path / "res"))


# -- svdbench run-external --------------------------------------------------------------------------------

def test_an_export_evaluates_as_an_external_cell_beside_the_base_models(exports: dict[str, dict], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture):
    from harness.cli import main
    from harness.runs import RunConfig, run_cells
    from tests.utils import CALIB

    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    entry = exports["llama-svd-llm"]
    results = tmp_path / "res"
    evals = ["--ratio", str(RATIO), "--eval", "wikitext2", "--eval-seqlen", "32", "--eval-max-windows", "2",
             "--device", "cpu", "--results", str(results)]
    # The same base, compressed by svdbench itself with the export's settings: a cell of the same table.
    cfg = RunConfig(model=str(entry["base"]), methods=("svd-llm",), ratios=(RATIO,), evals=("wikitext2",), calib=CALIB,
                    calib_samples=4, calib_seqlen=32, eval_seqlen=32, eval_max_windows=2, device="cpu",
                    dtype="float32", results=str(results))
    assert [o.status for o in run_cells(cfg, [("dense", 0.0), ("svd-llm", RATIO)])] == ["ok", "ok"]
    # Without the flag the directory's own code does not run.
    assert main(["run-external", str(entry["path"]), "--base", str(entry["base"]), *evals]) == 2
    assert main(["run-external", str(entry["path"]), "--base", str(entry["base"]), "--trust-remote-code", *evals]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads(path.read_text())
    manifest = read_manifest(entry["path"])
    assert record["status"] == "ok" and record["method"]["name"] == "external:llama-svd-llm"
    assert record["external"]["path"] == str(entry["path"].resolve())
    assert record["external"]["manifest_sha256"] == sha256_file(entry["path"] / MANIFEST)
    assert record["external"]["config_sha256"] == sha256_file(entry["path"] / "config.json")
    assert record["model"]["content_hash"] == manifest["base_model"]["content_hash"]
    assert record["ratio"] == RATIO
    for key in ("params_dense", "params_model_dense", "params_compressed", "params_model_compressed"):
        assert record[key] == manifest["compression"][key], key
    assert record["achieved_ratio"] == pytest.approx(manifest["compression"]["achieved_ratio"], abs=1e-12)
    # Same compressed model, same protocol: the perplexity of svdbench's own cell.
    own = [json.loads(p.read_text()) for p in results.glob("*.json") if p != path]
    cell = next(r for r in own if r["method"]["name"] == "svd-llm")
    assert record["metrics"]["wikitext2"]["protocol"] == cell["metrics"]["wikitext2"]["protocol"]
    assert record["metrics"]["wikitext2"]["ppl"] == pytest.approx(cell["metrics"]["wikitext2"]["ppl"], rel=1e-6)
    # A rerun keeps the record.
    mtime = path.stat().st_mtime_ns
    assert main(["run-external", str(entry["path"]), "--base", str(entry["base"]), "--trust-remote-code", *evals]) == 0
    assert path.stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert main(["leaderboard", str(results)]) == 0
    table = capsys.readouterr().out
    assert table.count(f"**{entry['base'].name}**") == 1  # one table: the base model's
    assert "SVD-LLM" in table and "external:llama-svd-llm" in table and "Original" in table
