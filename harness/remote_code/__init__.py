"""What an export directory carries so that plain ``transformers`` loads it (``trust_remote_code=True``).

:data:`TEMPLATE` (``modeling_svdbench.py`` beside this file) is copied unchanged into every export;
svdbench never imports it (it must work where svdbench is not installed). :func:`remote_config`
turns the base model's config into the export's ``config.json``; :func:`base_config` reads the
base model's config back from it (svdbench's own loader needs no remote code).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("modeling_svdbench.py")
MODULE = TEMPLATE.stem  # the auto_map prefix: "modeling_svdbench.<class>"
MODEL_TYPE = "svdbench_lowrank"
CONFIG_CLASS = "SvdbenchLowRankConfig"
# svdbench's loader class (harness.export.AUTO_CLASSES) -> the remote-code class that auto_map names for it.
MODEL_CLASSES = {"AutoModelForCausalLM": "SvdbenchLowRankForCausalLM", "AutoModel": "SvdbenchLowRankModel"}
BLOCK = "svdbench"  # the key of config.json that holds the base model and the replaced modules


class RemoteCodeError(ValueError):
    """A model whose export could not be loaded by plain transformers, or a config.json that is not one."""


def _transformers_name(obj_type: type) -> str:
    """The public transformers name of a config or model class (the remote code looks it up by name)."""
    import transformers

    name = obj_type.__name__
    if getattr(transformers, name, None) is not obj_type:
        raise RemoteCodeError(f"{name} is not a class of the installed transformers (remote code of the base "
                              "model?); svdbench's export needs the base architecture to be part of transformers")
    return name


def remote_config(config: Any, model_type: type, auto_class: str, modules: Mapping[str, Any],
                  tied: Mapping[str, str], format_version: int) -> dict[str, Any]:
    """The export's ``config.json``: the base config (as ``save_pretrained`` writes it) with
    ``model_type``, ``architectures`` and ``auto_map`` of the remote code and the ``svdbench`` block.

    Args:
        config: The (compressed) model's config, i.e. the base model's.
        model_type: The model's class (``LlamaForCausalLM``): the architecture the remote code builds.
        auto_class: ``AutoModelForCausalLM`` or ``AutoModel`` (svdbench's loader class).
        modules: The replaced modules (``harness.export.module_specs``).
        tied: Tensors stored once: alias name -> stored name.
        format_version: The export format version.

    Raises:
        RemoteCodeError: when the base config or model class is not part of transformers.
    """
    if auto_class not in MODEL_CLASSES:
        raise RemoteCodeError(f"no remote-code class for {auto_class}; known: {', '.join(MODEL_CLASSES)}")
    if BLOCK in config.to_dict():
        raise RemoteCodeError(f"the model's config has a {BLOCK!r} key already (an export loaded through its remote "
                              "code?); export a model loaded with svdbench")
    body = json.loads(config.to_json_string(use_diff=True))
    block = {
        "format_version": format_version,
        "base_model_type": config.model_type,
        "base_config_class": _transformers_name(type(config)),
        "base_architecture": _transformers_name(model_type),
        "modules": dict(modules),
        "tied": dict(tied),
    }
    return {
        **body,
        "model_type": MODEL_TYPE,
        "architectures": [MODEL_CLASSES[auto_class]],
        "auto_map": {"AutoConfig": f"{MODULE}.{CONFIG_CLASS}", auto_class: f"{MODULE}.{MODEL_CLASSES[auto_class]}"},
        BLOCK: block,
    }


def write_remote_code(root: Path, config_dict: Mapping[str, Any]) -> None:
    """Write ``config.json`` and copy the modeling file into the export directory ``root``."""
    (root / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(TEMPLATE, root / TEMPLATE.name)


def read_block(config_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``svdbench`` block of a config.json, or None for a plain base config (format 1)."""
    block = config_dict.get(BLOCK)
    if block is None:
        return None
    if not isinstance(block, dict) or config_dict.get("model_type") != MODEL_TYPE:
        raise RemoteCodeError(f"config.json has a {BLOCK!r} key but is not an svdbench remote-code config")
    return block


def base_config(root: Path) -> Any:
    """The base model's config from an export's ``config.json`` (either format), without remote code."""
    import transformers

    body = json.loads((root / "config.json").read_text(encoding="utf-8"))
    block = read_block(body)
    if block is None:
        return transformers.AutoConfig.from_pretrained(root)
    body.pop(BLOCK)
    body.pop("auto_map", None)
    body["model_type"] = block["base_model_type"]
    body["architectures"] = [block["base_architecture"]]
    cls = getattr(transformers, str(block.get("base_config_class")), None)
    if cls is None:
        raise RemoteCodeError(f"{root}/config.json names base config class {block.get('base_config_class')!r}, "
                              f"which transformers {transformers.__version__} does not have")
    return cls.from_dict(body)
