"""Loading models and finding their decoder blocks and target linears, without per-family code.

Discovery rule: the decoder blocks are the ``nn.ModuleList`` whose children all share one class,
contain ``nn.Linear`` layers and number ``config.num_hidden_layers`` (the largest such list wins).
That finds ``model.layers`` (Llama, Mistral, Qwen2), ``model.decoder.layers`` (OPT),
``gpt_neox.layers`` (GPT-NeoX), ``encoder.layer`` (BERT) and Gemma 3's ``model.layers`` with no
per-family table. Targets are every ``nn.Linear`` inside the blocks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.engine.packaged import PACKAGED, packaged_identity, packaged_tensor_types, resolve_packaged
from methods import ModuleInfo
from methods.module_types import MODULE_TYPES

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Short names for real pretrained models that ship inside installed wheels (no hub access needed).
MODEL_ALIASES = PACKAGED


@dataclass
class Layout:
    """Where the blocks and target linears of a loaded model are.

    Attributes:
        blocks_path: Dotted path of the block list.
        blocks: The block list itself.
        modules: Every target linear (``ModuleInfo``), in model order.
    """

    blocks_path: str
    blocks: nn.ModuleList
    modules: list[ModuleInfo]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def in_block(self, index: int) -> list[ModuleInfo]:
        return [m for m in self.modules if m.block == index]


def _get_path(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder (or encoder) block list (module docstring).

    Raises:
        ValueError: when no module list fits the rule.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        # A compressed model's blocks may hold no nn.Linear at all (every linear replaced by a registered
        # module type with bare parameters), and must still be found: efficiency and export look them up.
        if len({type(c) for c in mod}) != 1 or not any(MODULE_TYPES.linear_like(x) for x in mod[0].modules()):
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__} (model_type={model_type!r}): no "
            f"nn.ModuleList of {n_layers} blocks of one class holding linear layers"
        )
    return best[1], best[2]


def discover(model: nn.Module) -> Layout:
    """Blocks and target linears of ``model``."""
    path, blocks = find_blocks(model)
    modules = []
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                modules.append(ModuleInfo(f"{path}.{i}.{name}", i, name, mod.out_features, mod.in_features))
    if not modules:
        raise ValueError(f"no nn.Linear found inside the blocks at {path!r}")
    return Layout(path, blocks, modules)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return _get_path(model, name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` with ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = _get_path(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def resolve_model_path(model_id: str) -> str:
    """Map an alias (``minilm-l6``, ``smollm2-135m``, ``gemma3-270m``) to its local directory; pass ids and paths through.

    Raises:
        FileNotFoundError: for an alias whose package is not installed (names the pip command), or
            for an absolute or ``./``-relative path that does not exist (instead of the hub's
            repo-id error).
    """
    if model_id in MODEL_ALIASES:
        return str(resolve_packaged(model_id))
    looks_local = model_id.startswith(("/", "./", "../", "~")) or os.sep in model_id and model_id.count("/") > 1
    if looks_local and not Path(model_id).expanduser().exists():
        raise FileNotFoundError(f"model directory {model_id} does not exist")
    return str(Path(model_id).expanduser()) if looks_local else model_id


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def weight_files(path: Path) -> list[Path]:
    """The weight files directly in a model folder (``*.safetensors``, ``*.bin``, ...)."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def require_weights(model_id: str) -> None:
    """Raise when ``model_id`` is a local folder without weight files (cheap: before anything loads).

    Raises:
        FileNotFoundError: naming the folder and what it holds.
    """
    path = Path(resolve_model_path(model_id))
    if path.is_dir() and not weight_files(path):
        held = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"model folder {path} holds no weights (no {', '.join('*' + s for s in WEIGHT_SUFFIXES[:3])} file; "
            f"it holds {', '.join(held[:8]) or 'nothing'}{' ...' if len(held) > 8 else ''}); save the model there with "
            "save_pretrained, or point --model at the folder that has them")


def read_config(model_id: str) -> object:
    """The model's config (cheap: no weights), for validating a run before loading anything."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(model_id))


def is_encoder_config(config: object) -> bool:
    """True for bidirectional encoders (BERT family); those load with ``AutoModel``."""
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", "") in {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"} or any(
        a.endswith(("ForMaskedLM", "Model")) and not a.endswith("ForCausalLM") for a in archs
    )


def max_positions(config: object) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings`` or equivalent)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(model_id: str, dtype: str = "float32") -> tuple[nn.Module, object]:
    """Load a model and its tokenizer on the CPU (the engine moves blocks to the device itself).

    Args:
        model_id: Hub id, local directory or alias.
        dtype: ``float16``, ``bfloat16`` or ``float32``.

    Returns:
        ``(model in eval mode, tokenizer)``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_id)
    require_weights(model_id)
    config = read_config(model_id)
    cls = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        if Path(path).is_dir():  # a local folder: the hub hint would be wrong
            raise OSError(f"could not load the model folder {path}: {exc}") from exc
        raise OSError(
            f"could not load {model_id!r}: {exc}. Offline, pass a local directory "
            "(save_pretrained layout) instead of a hub id."
        ) from exc
    model.eval()
    return model, tokenizer


def fingerprint(model_id: str, full_hash_limit: int = 2 << 30) -> dict[str, object]:
    """Identify the exact weights: hub revision when known, else a content hash of the files.

    Files up to ``full_hash_limit`` bytes in total are hashed whole; above that, each file's size
    plus its first and last 16 MiB (fast on 7B checkpoints, still changes with any retraining).
    A packaged GGUF model (``smollm2-135m``, ``gemma3-270m``) is identified by its source file and
    conversion recipe instead, the same on every machine (:func:`harness.engine.packaged.packaged_identity`);
    the converted files' hash is kept as ``weights_hash``, and the source's tensors per GGUF type as
    ``gguf_tensor_types`` (outside the run key: they follow from the source file).
    """
    path = Path(resolve_model_path(model_id))
    name = model_id if model_id in MODEL_ALIASES else (path.name if path.exists() else model_id.split("/")[-1])
    info: dict[str, object] = {"id": model_id, "name": name}
    if not path.is_dir():
        info["revision"] = os.environ.get("SVDBENCH_MODEL_REVISION")
        info["content_hash"] = None
        return info
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".pt"})
    total = sum(p.stat().st_size for p in files)
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(str(p.stat().st_size).encode())
        with p.open("rb") as fh:
            if total <= full_hash_limit:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(16 << 20))
                fh.seek(max(0, p.stat().st_size - (16 << 20)))
                digest.update(fh.read())
    # A hub snapshot directory is named after its commit: that is the revision.
    parts = path.resolve().parts
    info["revision"] = parts[-1] if "snapshots" in parts else None
    info["content_hash"] = ("sha256:" if total <= full_hash_limit else "sha256-sampled:") + digest.hexdigest()
    source = packaged_identity(model_id) if model_id in MODEL_ALIASES else None
    if source is not None:  # a converted GGUF model: its identity is the source file (packaged_identity)
        info["weights_hash"] = info["content_hash"]
        info["content_hash"] = source
        info["gguf_tensor_types"] = packaged_tensor_types(model_id)
    return info


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
