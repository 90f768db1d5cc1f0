"""End-to-end zero-shot evaluation of an in-memory tiny Llama through lm-eval, fully offline.

The model is a randomly initialised 2-layer LlamaForCausalLM (d=64); the tokenizer is a byte-level
BPE trained here on a few KB of pack text. Nothing touches the hub (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE
are forced on). Also checks that wrapping in HFLM leaves factorised (two-Linear) modules intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from harness.evaluations.zeroshot import DocSubset, evaluate_zeroshot, wrap_model  # noqa: E402
from harness.evaluations.zeroshot_tasks import TASK_SETS  # noqa: E402

DATA_ENV = os.environ.get("SVDBENCH_DATA")
needs_pack = pytest.mark.skipif(
    not DATA_ENV or not Path(DATA_ENV).is_dir(), reason="SVDBENCH_DATA (offline data pack) not set"
)
TASK_FIELDS = {
    "acc",
    "acc_stderr",
    "acc_norm",
    "acc_norm_stderr",
    "n_docs",
    "n_docs_total",
    "metric",
    "value",
    "source",
    "lm_eval_task",
    "version",
    "per_doc",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # For a d=64 model, intra-op threads only add synchronisation; on a loaded 2-core machine torch
    # with 2 threads was measured ~35x slower per forward than with 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _training_text() -> str:
    # A few KB of prose; the pack's calibration text if available, else a fixed sentence set.
    if DATA_ENV and (Path(DATA_ENV) / "wikitext-2-v1" / "valid.txt").is_file():
        return (Path(DATA_ENV) / "wikitext-2-v1" / "valid.txt").read_text(encoding="utf-8")[:20000]
    return "The quick brown fox jumps over the lazy dog. Question: why? Answer: yes or no.\n" * 200


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """Byte-level BPE (vocab 1024) that prepends <s>, like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_training_text()], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_llama(tok: Any, *, tie: bool = False, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return _tiny_llama(tokenizer)


class TwoFactorLinear(torch.nn.Module):
    """Stand-in for the harness's LowRankLinear: W ~= up.weight @ down.weight (rank r)."""

    def __init__(self, linear: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        self.down = torch.nn.Linear(linear.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(s[:rank, None] * vh[:rank])
            self.up.weight.copy_(u[:, :rank])
            if linear.bias is not None:
                self.up.bias.copy_(linear.bias)

    def forward(self, x: Any) -> Any:
        return self.up(self.down(x))


@pytest.mark.parametrize("tie", [False, True])
def test_hflm_wrapping_keeps_factorised_modules(tokenizer: Any, tie: bool) -> None:
    m = _tiny_llama(tokenizer, tie=tie)
    m.model.layers[0].mlp.down_proj = TwoFactorLinear(m.model.layers[0].mlp.down_proj, 8)
    # lm_head too: with tied embeddings, a bare tie_weights() would graft `weight` onto it.
    m.lm_head = TwoFactorLinear(m.lm_head, 16)
    names_before = [n for n, _ in m.named_parameters(remove_duplicate=False)]
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 17, 99, 300, 42]])
    m.train()  # HFLM calls .eval(); dropout is 0 anyway, but make the mode change observable
    with torch.no_grad():
        before = m(ids).logits.clone()

    lm = wrap_model(m, tokenizer, batch_size=4)

    assert lm.model is m
    assert isinstance(m.model.layers[0].mlp.down_proj, TwoFactorLinear)
    assert isinstance(m.lm_head, TwoFactorLinear)
    assert not hasattr(m.lm_head, "weight")
    assert [n for n, _ in m.named_parameters(remove_duplicate=False)] == names_before
    assert "tie_weights" not in vars(m)  # the temporary no-op shadow is gone
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)


def _check_record(rec: dict[str, Any], limit: int | None) -> None:
    json.dumps(rec, allow_nan=False)  # everything serialisable, strictly
    for key in ("protocol", "lm_eval_version", "num_fewshot", "limit", "batch_size", "seed", "task_set"):
        assert key in rec
    assert rec["protocol"].startswith(f"zeroshot@lm-eval-{rec['lm_eval_version']}")
    assert rec["num_fewshot"] == 0 and rec["limit"] == limit
    for name, t in rec["tasks"].items():
        assert set(t) == TASK_FIELDS, name
        assert t["source"] == "local-pack"
        assert t["metric"] == ("acc_norm" if t["acc_norm"] is not None else "acc")
        assert t["value"] == t[t["metric"]]
        for k in ("acc", "acc_norm"):
            assert t[k] is None or 0.0 <= t[k] <= 1.0
        assert t["acc_stderr"] is not None
        assert rec["raw"]["results"][t["lm_eval_task"]]["acc,none"] == t["acc"]
        # Per-document correctness reproduces the task's accuracy exactly.
        per_doc = t["per_doc"]
        assert len(per_doc["doc_ids"]) == len(per_doc["acc"]) == t["n_docs"]
        assert per_doc["acc"].count("1") / t["n_docs"] == pytest.approx(t["acc"])
        if t["acc_norm"] is not None:
            assert per_doc["acc_norm"].count("1") / t["n_docs"] == pytest.approx(t["acc_norm"])
    assert set(rec["raw"]) >= {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"}
    assert "samples" not in rec["raw"]


@needs_pack
@pytest.mark.integration
def test_offline_default_set_with_limit(model: Any, tokenizer: Any) -> None:
    rec = evaluate_zeroshot(model, tokenizer, limit=20, batch_size=16, seed=0)
    _check_record(rec, 20)
    assert rec["task_set"] == "offline-default" and rec["source"] == "local-pack"
    assert list(rec["tasks"]) == list(TASK_SETS["offline-default"])
    assert "hellaswag" not in rec["tasks"]  # the approximation keeps its own name
    assert all(t["n_docs"] == 20 for t in rec["tasks"].values())
    assert rec["tasks"]["boolq"]["metric"] == "acc" and rec["tasks"]["piqa"]["metric"] == "acc_norm"
    values = [t["value"] for t in rec["tasks"].values()]
    assert rec["average"] == pytest.approx(sum(values) / len(values))
    assert not model.training  # mode restored (it was eval)


@needs_pack
@pytest.mark.integration
def test_openbookqa_full_pack(model: Any, tokenizer: Any) -> None:
    rec = evaluate_zeroshot(model, tokenizer, ["openbookqa"], data_dir=DATA_ENV, batch_size=32)
    _check_record(rec, None)
    obqa = rec["tasks"]["openbookqa"]
    pack_file = Path(DATA_ENV or "") / "llm-foundry-converted" / "openbook_qa.jsonl"
    n_pack = sum(1 for line in pack_file.read_text(encoding="utf-8").splitlines() if line.strip())
    assert obqa["n_docs"] == obqa["n_docs_total"] == n_pack == 500
    assert obqa["lm_eval_task"] == "openbookqa_local" and rec["task_set"] == "custom"


@needs_pack
@pytest.mark.integration
def test_document_subset_is_a_named_protocol(model: Any, tokenizer: Any) -> None:
    """docs=n scores n documents per task spread over the file, named in the protocol id; every=k
    scores documents 0, k, 2k, ...; a subset and --limit exclude each other."""
    rec = evaluate_zeroshot(model, tokenizer, ["openbookqa", "winogrande"], batch_size=16, subset=DocSubset(docs=7))
    _check_record(rec, None)
    assert rec["protocol"] == f"zeroshot@lm-eval-{rec['lm_eval_version']}:docs7"
    assert rec["subset"] == {"docs": 7}
    obqa, wino = rec["tasks"]["openbookqa"], rec["tasks"]["winogrande"]
    assert obqa["n_docs"] == 7 and obqa["n_docs_total"] == 500
    assert obqa["per_doc"]["doc_ids"] == [i * 500 // 7 for i in range(7)]
    assert wino["n_docs_total"] == 1267 and wino["per_doc"]["doc_ids"][-1] == 6 * 1267 // 7
    # The subset's documents score as they do inside the full run (same prompts, same model).
    every = evaluate_zeroshot(model, tokenizer, ["openbookqa"], batch_size=16, subset=DocSubset(every=100))
    assert every["protocol"].endswith(":every100")
    assert every["tasks"]["openbookqa"]["per_doc"]["doc_ids"] == [0, 100, 200, 300, 400]
    full = evaluate_zeroshot(model, tokenizer, ["openbookqa"], batch_size=16, limit=401)
    bits = full["tasks"]["openbookqa"]["per_doc"]["acc_norm"]
    assert every["tasks"]["openbookqa"]["per_doc"]["acc_norm"] == "".join(bits[i] for i in (0, 100, 200, 300, 400))
    with pytest.raises(ValueError, match="exclude each other"):
        evaluate_zeroshot(model, tokenizer, ["openbookqa"], limit=5, subset=DocSubset(every=2))
    with pytest.raises(ValueError, match="one of them"):
        DocSubset(every=2, docs=3)
