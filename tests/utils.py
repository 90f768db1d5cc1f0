"""Test helpers: tiny random-init models of each family saved in save_pretrained layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA = Path(os.environ.get("SVDBENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CALIB = f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}"  # calibration text of the pack (never a test split)

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=128)),
    # Blocks that do not all receive the same arguments: each attention type (a sliding window of 8
    # with a local rotary base, or global attention) gets its own mask and rotary table from the
    # model's loop. QK-norm, tied embeddings. head_dim * heads = hidden, as in the other tiny families.
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                        max_position_embeddings=128, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a slice of the pack's calibration text; adds one BOS per text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = (DATA / "wikitext-2-v1" / "valid.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_model_dir(family: str, out: Path, seed: int = 0) -> Path:
    """Random-init ``family`` model (2 blocks, d=64) + tokenizer saved under ``out``."""
    import transformers

    cls_name, kwargs = FAMILY_CONFIGS[family]
    tok = tiny_tokenizer()
    config = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_layer(m: int, n: int, tokens: int, seed: int = 0, scales: tuple[float, float] = (0.1, 3.0),
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``W: (m, n)``, inputs ``X: (n, tokens)`` whose features have spread-out scales
    (``scales`` from the first to the last feature, as activations with outliers do), and ``H = X X^T``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=dtype)
    x = torch.randn(n, tokens, generator=gen, dtype=dtype) * torch.linspace(*scales, n, dtype=dtype)[:, None]
    return w, x, x @ x.T
