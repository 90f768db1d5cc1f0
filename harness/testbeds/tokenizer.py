"""Training text and BPE tokenizer of the self-trained testbed models.

The text is the offline data pack's training material (see the pack's README): the BoolQ dev
Wikipedia passages plus the WikiText-2 (``<unk>`` variant) validation split, about 2.8 MB. No test
split is ever read here. The last ``val_fraction`` of the joined text, cut at a line boundary, is
held out for validation and early stopping (with the default 2% that is the tail of the WikiText-2
validation split, the same kind of text as the WikiText-2 test protocol); the tokenizer is trained on the rest only.

The tokenizer is byte-level BPE (so no character is ever unknown) with ``<s>`` (BOS), ``</s>`` (EOS)
and ``<pad>``. Like LLaMA's, it puts exactly one BOS in front of every encoded text and no EOS.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DATA_ENV = "SVDBENCH_DATA"
TRAINING_FILES: tuple[str, ...] = ("reference-corpus/boolq_passages.txt", "wikitext-2-v1/valid.txt")
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data pack directory: ``data_dir`` if given, else ``$SVDBENCH_DATA``.

    Args:
        data_dir: Explicit data pack directory, or None to use the environment.

    Returns:
        The directory, which holds every file in ``TRAINING_FILES``.

    Raises:
        FileNotFoundError: If no directory is given and ``SVDBENCH_DATA`` is unset, or the
            directory lacks a training file.
    """
    if data_dir is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise FileNotFoundError(
                f"No data pack directory: pass data_dir or set the {DATA_ENV} environment variable "
                "to the offline data pack (the folder holding reference-corpus/ and wikitext-2-v1/)."
            )
        data_dir = env
    path = Path(data_dir).expanduser()
    for rel in TRAINING_FILES:
        if not (path / rel).is_file():
            raise FileNotFoundError(f"Training file {rel} not found under data dir {path} (see {DATA_ENV}).")
    return path


def data_checksums(data_dir: str | Path | None = None) -> dict[str, str]:
    """SHA-256 of each training file, keyed by its path relative to the data pack.

    Args:
        data_dir: Data pack directory (default ``$SVDBENCH_DATA``).

    Returns:
        ``{relative_path: hex_digest}`` for every file in ``TRAINING_FILES``.
    """
    root = resolve_data_dir(data_dir)
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in TRAINING_FILES}


def load_training_text(data_dir: str | Path | None = None, val_fraction: float = 0.02) -> tuple[str, str]:
    """Read the training files and split off the held-out tail.

    Args:
        data_dir: Data pack directory (default ``$SVDBENCH_DATA``).
        val_fraction: Approximate fraction of characters held out, taken from the end of the
            joined text (files joined by a blank line) and cut at the line boundary before that point.

    Returns:
        ``(train_text, val_text)``; their concatenation is the joined text.
    """
    root = resolve_data_dir(data_dir)
    text = "\n\n".join((root / rel).read_text(encoding="utf-8") for rel in TRAINING_FILES)
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline >= 0 else cut
    return text[:cut], text[cut:]


def train_testbed_tokenizer(
    text: str, vocab_size: int = 4096, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``text`` and wrap it for ``transformers``.

    Training is deterministic: the same text and vocabulary size give the same ``tokenizer.json``.

    Args:
        text: Training text (never a test split).
        vocab_size: Total vocabulary size, special tokens included.
        model_max_length: Maximum sequence length recorded in the tokenizer config.

    Returns:
        A fast tokenizer that adds one BOS in front of each text, with EOS and pad tokens set;
        ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it offline.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One item, not lines: line splitting would hide whitespace runs such as "\n\n" from the trainer.
    backend.train_from_iterator([text], trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
    )


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of a long text, without special tokens and without truncation.

    Args:
        tokenizer: The reference tokenizer.
        text: Any text, longer than the model's positions or not.

    Returns:
        A 1-D ``long`` tensor.
    """
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)


def validation_windows(tokenizer: PreTrainedTokenizerBase, val_text: str, length: int) -> torch.Tensor:
    """Cut the held-out text into token windows as the perplexity protocol does (no BOS per window).

    Args:
        tokenizer: The reference tokenizer.
        val_text: Held-out text from :func:`load_training_text`.
        length: Window length (the model's positions).

    Returns:
        ``(n, length)`` token ids, non-overlapping; the remainder is dropped.
    """
    ids = encode_text(tokenizer, val_text)
    count = ids.numel() // length
    return ids[: count * length].view(count, length)
