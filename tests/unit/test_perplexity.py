"""The perplexity protocol on a toy model: exact value, windowing, and non-finite windows reported."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness.evaluations.perplexity import PROTOCOLS, perplexity


class Bigram(nn.Module):
    """Logits depend only on the current token; optionally NaN for windows starting with ``poison``."""

    def __init__(self, vocab: int, poison: int | None = None) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.poison = poison

    def forward(self, input_ids, use_cache=False):
        logits = self.table[input_ids].clone()
        if self.poison is not None:
            logits[input_ids[:, 0] == self.poison] = float("nan")
        return SimpleNamespace(logits=logits)


def _reference(model: Bigram, ids: torch.Tensor, seqlen: int) -> float:
    n = ids.numel() // seqlen
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    total, count = 0.0, 0
    for w in range(n):
        win = ids[w * seqlen : (w + 1) * seqlen]
        for t in range(1, seqlen):
            total -= float(logp[win[t - 1], win[t]])
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_manual_computation_and_drops_remainder():
    ids = torch.randint(0, 11, (1000,), generator=torch.Generator().manual_seed(1))
    model = Bigram(11)
    out = perplexity(model, ids, 64, torch.device("cpu"), batch_size=3)
    assert out["windows"] == 15 and out["tokens"] == 15 * 63 and out["nonfinite_windows"] == 0
    assert out["ppl"] == pytest.approx(_reference(model, ids, 64), rel=1e-9)
    limited = perplexity(model, ids, 64, torch.device("cpu"), max_windows=4)
    assert limited["windows"] == 4


def test_nonfinite_windows_are_counted_not_skipped():
    ids = torch.randint(1, 11, (640,), generator=torch.Generator().manual_seed(2))
    ids[128] = 0  # window 2 starts with the poison token
    out = perplexity(Bigram(11, poison=0), ids, 64, torch.device("cpu"), batch_size=4)
    assert out["nonfinite_windows"] == 1 and out["ppl"] is None
    assert out["ppl_finite_windows"] is not None and math.isfinite(out["ppl_finite_windows"])


def test_protocol_ids_name_their_parameters():
    assert PROTOCOLS["wikitext2"].protocol_id(2048, None) == "wikitext2@2048"
    assert PROTOCOLS["wikitext2"].protocol_id(256, 8) == "wikitext2@256:first8"
    assert PROTOCOLS["ptb"].protocol_id(2048, None) == "ptb@test-2048"
    assert PROTOCOLS["c4"].protocol_id(2048, None) == "c4@svdllm-2048"


def test_wikitext2_text_is_the_standard_join():
    text = PROTOCOLS["wikitext2"].text()
    assert len(text) == 1_294_336  # the pack README's figure for "\n\n".join(rows)


def test_c4_without_data_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="c4 data is not available"):
        PROTOCOLS["c4"].text()


def test_window_stride_scores_every_kth_window_and_names_the_subset():
    """``stride=k`` scores windows 0, k, 2k, ... of the whole text: the mean NLL of exactly those."""
    model = Bigram(11)
    ids = torch.randint(0, 11, (10 * 8,), generator=torch.Generator().manual_seed(2))
    every3 = perplexity(model, ids, 8, torch.device("cpu"), batch_size=2, stride=3)
    assert every3["windows"] == 4 and every3["tokens"] == 4 * 7
    singles = [perplexity(model, ids[w * 8:(w + 1) * 8], 8, torch.device("cpu"))["nll_sum"] for w in (0, 3, 6, 9)]
    assert every3["nll_sum"] == pytest.approx(sum(singles))
    assert PROTOCOLS["wikitext2"].protocol_id(1024, None, 12) == "wikitext2@1024:every12"
    assert PROTOCOLS["wikitext2"].protocol_id(1024, 5, 12) == "wikitext2@1024:every12:first5"
