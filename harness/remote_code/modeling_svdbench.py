"""An svdbench compressed model for plain ``transformers`` (``trust_remote_code=True``).

svdbench copies this file unchanged into every export directory; it imports only ``torch`` and
``transformers``, never svdbench. With it::

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)

How it works. ``config.json`` is the base model's config (every key unchanged) with three
additions: ``model_type: svdbench_lowrank`` (so that loading without ``trust_remote_code`` is
refused instead of silently building a dense model with random weights), ``auto_map`` (this file),
and a ``svdbench`` block naming the base architecture, each replaced linear with its class and
rank, and the tensors stored once for several names. The classes below specialise themselves on
first use to a subclass of the base model's own config and model classes (``LlamaConfig`` and
``LlamaForCausalLM``, say): the model is the base architecture, built by transformers, with the
recorded ``nn.Linear`` modules swapped for the small modules below. Their parameter and buffer
names are svdbench's, so the stored safetensors load unchanged, and ``save_pretrained`` writes a
directory that loads the same way again.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F  # noqa: N812
from transformers import GenerationMixin, PreTrainedModel

try:  # transformers >= 5 spells it PreTrainedConfig and keeps the old name as an alias
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4
    from transformers import PretrainedConfig as _BaseConfig

MODEL_TYPE = "svdbench_lowrank"
FORMAT_VERSION = 2  # of the svdbench export layout this file belongs to


# -- the replacement modules (same parameter and buffer names as svdbench's) -----------------------

class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``first.weight (rank, in)``, ``second.weight (out, rank)`` and the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class ColumnPreservingLowRank(nn.Module):
    """Duo-SVD: ``y = columns(x[kept_idx]) + lowrank(x[rest_idx])``; the bias sits in ``lowrank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, n_columns: int, bias: bool,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.n_columns = in_features, out_features, rank, n_columns
        self.register_buffer("kept_idx", torch.zeros(n_columns, dtype=torch.long, device=device))
        self.register_buffer("rest_idx", torch.zeros(in_features - n_columns, dtype=torch.long, device=device))
        self.columns = nn.Linear(n_columns, out_features, bias=False, device=device, dtype=dtype)
        self.lowrank = LowRankLinear(in_features - n_columns, out_features, rank, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.columns(x.index_select(-1, self.kept_idx)) + self.lowrank(x.index_select(-1, self.rest_idx))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"dense_columns={self.n_columns}")


class SharedBasisLinear(nn.Module):
    """Basis Sharing: ``y = second(x @ basis^T)``; one ``basis (rank, in)`` is shared by a group of layers."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.basis = nn.Parameter(torch.zeros(rank, in_features, device=device, dtype=dtype), requires_grad=False)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.linear(x, self.basis))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                "shared_basis=True")


def build_module(spec: dict[str, Any], device: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The replacement module a ``svdbench.modules`` entry of config.json describes."""
    cls = spec.get("class")
    shape = (int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]))
    if cls == "LowRankLinear":
        return LowRankLinear(*shape, bool(spec["bias"]), device, dtype)
    if cls == "ColumnPreservingLowRank":
        return ColumnPreservingLowRank(*shape, int(spec["n_columns"]), bool(spec["bias"]), device, dtype)
    if cls == "SharedBasisLinear":
        return SharedBasisLinear(*shape, bool(spec["bias"]), device, dtype)
    raise ValueError(f"unknown svdbench module class {cls!r}: this export needs a newer modeling_svdbench.py")


# -- specialising to the base architecture -------------------------------------------------------

def _svdbench_block(config: Any) -> dict[str, Any]:
    block = config.get("svdbench") if isinstance(config, dict) else getattr(config, "svdbench", None)
    if not isinstance(block, dict) or "base_config_class" not in block:
        raise ValueError("this config has no 'svdbench' block naming its base model: not an svdbench export's config")
    version = block.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"this config is svdbench export format {version}; this modeling file reads up to "
                         f"{FORMAT_VERSION} (export again with a matching svdbench)")
    return block


def _transformers_class(name: str) -> type:
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {name}; install a version that "
                         "knows the base model's architecture")
    return cls


_SPECIALISED: dict[tuple[type, type], type] = {}


def _specialise(cls: type, base: type) -> type:
    """``cls`` and the base model's ``base`` class in one (cached) class that keeps ``cls``'s name and module,
    so that transformers' auto classes and ``save_pretrained`` see the remote-code class."""
    key = (cls, base)
    if key not in _SPECIALISED:
        _SPECIALISED[key] = type(cls.__name__, (cls, base), {"__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__})
    return _SPECIALISED[key]


class SvdbenchLowRankConfig(_BaseConfig):
    """The base model's config plus the ``svdbench`` block; specialises to a subclass of the base config
    class when read (so every attribute, default and method of the base config is there)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        if cls is SvdbenchLowRankConfig:
            cls = _specialise(cls, _transformers_class(_svdbench_block(config_dict)["base_config_class"]))
        # Explicit super: cls may have just been replaced by the specialised class.
        return super(SvdbenchLowRankConfig, cls).from_dict(config_dict, **kwargs)  # noqa: UP008


class _SvdbenchCompressed:
    """What the remote-code model classes share: build the base architecture, then swap in the
    recorded modules and tie the tensors the export stored once."""

    _svdbench_static: type  # the class auto_map names (set on each static class below)

    def __new__(cls, config: Any = None, *args: Any, **kwargs: Any) -> Any:
        # A plain ``cls(config)`` (transformers' from_config, or user code) gets the specialised class too.
        if cls is cls._svdbench_static and config is not None:
            cls = cls._specialised_for(config)
        return super().__new__(cls)

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # the base architecture (dense linears, on meta when loading)
        block = _svdbench_block(config)
        for name, spec in block["modules"].items():
            old = self.get_submodule(name)
            if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (
                    int(spec["in_features"]), int(spec["out_features"])):
                raise ValueError(f"{name} of the base model is {old!r}, not a linear of {spec['in_features']} -> "
                                 f"{spec['out_features']} as the svdbench block records")
            owner, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(owner) if owner else self, leaf,
                    build_module(spec, old.weight.device, old.weight.dtype))
        tied = block.get("tied", {})
        for alias, source in tied.items():
            owner, _, leaf = alias.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            # save_pretrained drops the names declared here from the (deduplicated) weights it writes.
            module._tied_weights_keys = {**(getattr(module, "_tied_weights_keys", None) or {}), leaf: source}
        self._svdbench_installed = True
        if isinstance(getattr(self, "all_tied_weights_keys", None), dict):
            # transformers >= 5 computed the names it ties (and expects absent from the checkpoint) while
            # the base model was built, before the swap; the stored-once names join them now.
            self.all_tied_weights_keys.update(tied)
        self._svdbench_tie()

    @classmethod
    def _specialised_for(cls, config: Any) -> type:
        return _specialise(cls._svdbench_static,
                           _transformers_class(_svdbench_block(config)["base_architecture"]))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        if cls is cls._svdbench_static:
            config = kwargs.get("config")
            if not isinstance(config, _BaseConfig):
                config = SvdbenchLowRankConfig.from_pretrained(config or pretrained_model_name_or_path)
                kwargs["config"] = config
            return cls._specialised_for(config).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> Any:
        if cls is cls._svdbench_static:
            return cls._specialised_for(config)._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)

    def _svdbench_tie(self) -> None:
        """Make every stored-once name (a shared basis, a tied head) the same parameter as its source again."""
        if not getattr(self, "_svdbench_installed", False):
            return  # the base model's own __init__ ties its weights before the swap
        for alias, source in _svdbench_block(self.config).get("tied", {}).items():
            src_owner, _, src_leaf = source.rpartition(".")
            src = self.get_submodule(src_owner) if src_owner else self
            owner, _, leaf = alias.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            if src_leaf in src._parameters:
                setattr(module, leaf, src._parameters[src_leaf])
            else:  # a buffer stored once (never the case for svdbench's own modules, but allowed by the format)
                module._buffers[leaf] = src._buffers[src_leaf]

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # transformers >= 5 asks each model for its tied names (all_submodels=False) when it ties again.
        tied = super().get_expanded_tied_weights_keys(all_submodels)
        if not all_submodels and getattr(self, "_svdbench_installed", False):
            tied.update(_svdbench_block(self.config).get("tied", {}))
        return tied

    def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
        out = super().tie_weights(*args, **kwargs)
        self._svdbench_tie()
        return out


class SvdbenchLowRankForCausalLM(_SvdbenchCompressed, PreTrainedModel, GenerationMixin):
    """A causal LM compressed by svdbench (the base ``...ForCausalLM`` with low-rank linears)."""

    config_class = SvdbenchLowRankConfig


class SvdbenchLowRankModel(_SvdbenchCompressed, PreTrainedModel):
    """An encoder compressed by svdbench (the base ``...Model`` with low-rank linears)."""

    config_class = SvdbenchLowRankConfig


SvdbenchLowRankForCausalLM._svdbench_static = SvdbenchLowRankForCausalLM
SvdbenchLowRankModel._svdbench_static = SvdbenchLowRankModel
