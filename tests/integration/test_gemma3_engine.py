"""Gemma 3 through the generic engine, on a tiny random-init model (3 blocks, d=64, window 8).

Gemma 3 is the first family here whose blocks do not all receive the same arguments: the model's
own loop hands each block the attention mask and the rotary table of its attention type (a
sliding window with a local rotary base, or global attention with a global base). With sequences
longer than the window both kinds of block occur, so replaying one block's arguments through the
others (what the engine did before it recorded every block's call) changes the statistics and the
perplexity. The engine-wide family tests (streamed evaluation, export round trip, end to end) include the
``gemma3`` tiny config of tests/utils.py; this file holds the streamed-versus-resident statistics
test, which also runs on Llama.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

from harness.engine.capture import capture_block_inputs
from harness.engine.models import discover, load_model
from harness.engine.stream import stream_blocks
from methods.statistics import InputGram
from tests.utils import make_tiny_model_dir

pytestmark = pytest.mark.integration
CPU = torch.device("cpu")

def _streamed_grams(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    """Input Gram of every target linear from the block-streamed pass, and the captured batches."""
    layout = discover(model)
    batches = capture_block_inputs(model, layout, ids, CPU, batch_size=2)
    calls = [b.calls for b in batches]
    grams: dict[str, torch.Tensor] = {}
    stream_blocks(model, layout, batches, CPU, [InputGram()],
                  lambda stats: grams.update({name: st.gram.clone() for name, st in stats.linear.items()}))
    return grams, calls


def _resident_grams(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input Gram of every target linear from hooks on the whole model's ordinary forward."""
    grams: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))

    def hook(name: str):
        def add(_module, inputs, _output) -> None:
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams[name] + rows.T @ rows
        return add

    handles = [model.get_submodule(m.name).register_forward_hook(hook(m.name)) for m in discover(model).modules]
    try:
        with torch.no_grad():
            for batch in ids.split(2):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return dict(grams)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_statistics_equal_resident(family: str, tmp_path: Path):
    """Every target linear's Gram from the streamed pass is the one the whole model's forward feeds it."""
    model, _ = load_model(str(make_tiny_model_dir(family, tmp_path / family)))
    ids = torch.randint(3, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    streamed, calls = _streamed_grams(model, ids)
    resident = _resident_grams(model, ids)
    assert streamed.keys() == resident.keys() and len(streamed) == 7 * model.config.num_hidden_layers
    for name, gram in resident.items():
        # float32 Gram product against float64: GRAM_PRODUCT_TOL (1e-5) relative
        assert float((streamed[name] - gram).norm() / gram.norm()) < 1e-5, name
    if family == "gemma3":  # the arguments really differ per attention type, and are shared within one
        sliding_0, full, sliding_2 = (kwargs for _args, kwargs in calls[0])
        assert full["position_embeddings"] is not sliding_0["position_embeddings"]
        assert sliding_2["position_embeddings"] is sliding_0["position_embeddings"]
        assert sliding_2["attention_mask"] is sliding_0["attention_mask"]
