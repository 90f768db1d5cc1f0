"""Named text sources for evaluation and calibration, and the calibration sampler.

Offline, everything comes from the data pack named by ``$SVDBENCH_DATA`` (layout in the pack's
README); online, the standard sources come through ``datasets``. Every function fails with a clear
message naming the missing file before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_ENV = "SVDBENCH_DATA"


def data_dir(required: bool = True) -> Path | None:
    """The data pack directory from ``$SVDBENCH_DATA``.

    Raises:
        FileNotFoundError: when required and the variable is unset or points nowhere.
    """
    value = os.environ.get(DATA_ENV)
    if not value:
        if required:
            raise FileNotFoundError(f"{DATA_ENV} is not set; point it at the offline data pack (e.g. ../shared/data)")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={value} is not a directory")
    return path


def pack_file(relative: str) -> Path:
    """A file of the data pack, checked to exist."""
    path = data_dir() / relative  # type: ignore[operator]
    if not path.is_file():
        raise FileNotFoundError(f"data file missing: {path} (expected in the pack under {DATA_ENV})")
    return path


def _read_jsonl_text(path: Path, key: str = "text") -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)[key] for line in fh if line.strip()]


def wikitext2_test_rows() -> list[str]:
    """The 4358 rows of the ``wikitext-2-raw-v1`` test split, from the pack or the hub."""
    if data_dir(required=False) is not None:
        return _read_jsonl_text(pack_file("wikitext-2-raw-v1/test.jsonl"))
    from datasets import load_dataset

    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])


def ptb_test_sentences() -> list[str]:
    """Penn Treebank (Mikolov) test sentences, each line stripped (as ``ptb_text_only`` gives them)."""
    if data_dir(required=False) is not None:
        lines = pack_file("ptb/ptb.test.txt").read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip()]
    from datasets import load_dataset

    return list(load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"])


C4_DOCS = 2000  # SVD-LLM's c4 protocol: the first 2000 validation documents


def c4_validation_docs() -> list[str]:
    """C4 (en) validation documents: ``$SVDBENCH_DATA/c4/c4-validation.json`` (JSON lines with ``text``,
    as SVD-LLM and SparseGPT ship it) or, online, the first validation shard of ``allenai/c4``.

    Raises:
        FileNotFoundError: offline without the file (the pack has no C4).
    """
    pack = data_dir(required=False)
    if pack is not None:
        path = pack / "c4" / "c4-validation.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"c4 data is not available: {path} is missing (the offline pack has no C4 validation shard). "
                "Place SparseGPT's c4-validation.json there, or run online without SVDBENCH_DATA."
            )
        return _read_jsonl_text(path)[:C4_DOCS]
    from datasets import load_dataset

    shard = "en/c4-validation.00000-of-00008.json.gz"
    return list(load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"][:C4_DOCS])


def _not_utf8(path: Path, exc: UnicodeDecodeError, offset: int = 0) -> ValueError:
    return ValueError(f"calibration file {path} is not UTF-8 text: at byte offset {offset + exc.start} ({exc.object[exc.start:exc.start + 1]!r}) "
                      f"{exc.reason}; convert it first, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt")


def check_utf8(path: Path) -> None:
    """Raise a :class:`ValueError` naming ``path`` and the first bad byte when it is not UTF-8 text."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before the decoder's pending bytes
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc, offset - len(pending)) from exc
            if not chunk:
                return
            offset += len(chunk)


def check_calibration_source(source: str) -> None:
    """Validate ``--calib`` cheaply (before any model is loaded): a ``file:`` source must exist and be UTF-8 text."""
    if source.startswith("file:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        check_utf8(path)
    elif source == "wikitext2":
        if data_dir(required=False) is not None and os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise FileNotFoundError(
                "--calib wikitext2 needs the wikitext-2-raw-v1 train split from the hub, which the offline pack "
                "does not hold; use --calib file:$SVDBENCH_DATA/wikitext-2-v1/valid.txt"
            )
    else:
        raise ValueError(f"unknown calibration source {source!r}; use 'wikitext2' or 'file:PATH'")


def calibration_text(source: str) -> str:
    """Text of a calibration source: ``wikitext2`` (train split, rows joined by blank lines) or ``file:PATH``."""
    check_calibration_source(source)
    if source.startswith("file:"):
        path = Path(source[5:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
    from datasets import load_dataset

    return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows and everything that determines them.

    Attributes:
        source: ``wikitext2`` or ``file:PATH``.
        samples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of the window sampler.
        input_ids: ``(samples, seqlen)`` int64.
        attention_mask: ``(samples, seqlen)`` 1 for real tokens, 0 for padding (encoder paragraphs).
        sampler: How the windows were drawn.
    """

    source: str
    samples: int
    seqlen: int
    seed: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    sampler: str = "random-token-windows"

    @property
    def token_hash(self) -> str:
        return "sha256:" + hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def record(self) -> dict[str, object]:
        return {
            "source": portable_source(self.source),
            "samples": self.samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "sampler": self.sampler,
            "token_hash": self.token_hash,
        }


def portable_source(source: str) -> str:
    """``source`` with the data pack's directory written ``${SVDBENCH_DATA}``, as sweep specs spell it.

    Records and run keys name the calibration by this string (and the tokens by their hash), so a
    cell computed with the pack at ``/work/shared/data`` is found again with it anywhere else; a
    ``file:`` path outside the pack, and ``wikitext2``, are kept as given.
    """
    pack = os.environ.get(DATA_ENV)
    if not source.startswith("file:") or not pack:
        return source
    try:
        inside = Path(source[len("file:"):]).expanduser().resolve().relative_to(Path(pack).expanduser().resolve())
    except ValueError:
        return source
    return f"file:${{{DATA_ENV}}}/{inside.as_posix()}"


def sample_calibration(tokenizer: object, source: str, samples: int, seqlen: int, seed: int) -> Calibration:
    """Draw ``samples`` windows of ``seqlen`` tokens at random offsets of the tokenized source.

    The GPTQ sampler: the whole text is tokenized once without special tokens, then window starts are
    drawn with ``random.Random(seed)``, so the same (tokenizer, source, samples, seqlen, seed) always
    gives the same tokens (recorded by hash).

    Raises:
        ValueError: when the source has fewer than ``seqlen + 1`` tokens.
    """
    text = calibration_text(source)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # type: ignore[operator]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(samples)]
    windows = torch.stack([ids[s : s + seqlen] for s in starts])
    return Calibration(source, samples, seqlen, seed, windows)


def paragraphs(rows: list[str], min_chars: int = 80) -> list[str]:
    """Non-heading rows longer than ``min_chars`` characters, stripped (WikiText headings look like `` = T = ``)."""
    out = []
    for row in rows:
        text = row.strip()
        if len(text) > min_chars and not text.startswith("="):
            out.append(text)
    return out


def sample_paragraph_calibration(tokenizer: object, source: str, samples: int, seqlen: int, seed: int) -> Calibration:
    """Calibration for encoders: ``samples`` random paragraphs of the source, each truncated to
    ``seqlen`` tokens and padded; padding is excluded from every statistic through the mask."""
    rows = paragraphs(calibration_text(source).splitlines())
    if len(rows) < samples:
        raise ValueError(f"calibration source {source!r} has {len(rows)} paragraphs, fewer than {samples}")
    picked = random.Random(seed).sample(rows, samples)
    enc = tokenizer(picked, truncation=True, max_length=seqlen, padding="max_length", return_tensors="pt")  # type: ignore[operator]
    return Calibration(source, samples, seqlen, seed, enc.input_ids, enc.attention_mask, "random-paragraphs-padded")
