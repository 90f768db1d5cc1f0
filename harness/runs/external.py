"""Evaluating a compressed checkpoint svdbench did not make (``svdbench run-external``).

A directory that ``transformers`` loads (``AutoModelForCausalLM.from_pretrained``, with or without
remote code) is evaluated as a finished compressed cell: the same evaluations and protocols as
``svdbench run``, its parameter count against a named dense base model for the achieved ratios,
and a record that the leaderboards put beside svdbench's cells of that base model. The record's
``model`` block is the base model's (that is what a table groups by); its method is
``external:<name>`` and its ``external`` block names the directory and hashes its files, so a
changed checkpoint is a new cell.

Only evaluations without a dense reference run here (perplexities, zero-shot): ``efficiency`` and
``embed-fidelity`` measure against the dense model within one run of svdbench's own cells.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.engine.models import (
    DTYPES,
    discover,
    fingerprint,
    is_encoder_config,
    max_positions,
    read_config,
    resolve_model_path,
)
from harness.engine.offload import OFFLOAD_MODES, offloaded, placement, resident
from harness.evaluations import EVALUATIONS, EvalSettings, preflight, resolve_options, run_evaluations
from harness.export import MANIFEST, sha256_file
from harness.integrity import trusted_record, write_record
from harness.records import cell_record, failed_record, peak_memory_bytes, provenance, record_header, run_key
from harness.runs.config import Prepared, RunConfig, eval_options, key_fields, resolve_device, resolve_dtype

__all__ = ["ExternalCheckpoint", "describe_checkpoint", "prepare_external", "run_external"]

log = logging.getLogger(__name__)

PREFIX = "external:"  # the method name of an external cell: external:<name>
# A sentence both tokenizers must encode alike: scores are only comparable over the same tokens.
_TOKENIZER_PROBE = "Perplexity compares tokens: the checkpoint and its base model must split this text alike, 1234."


@dataclass(frozen=True)
class ExternalCheckpoint:
    """A checkpoint directory and what identifies it (files hashed, not the path).

    Attributes:
        path: The directory.
        name: Its name in the method string (``external:<name>``).
        remote_code: Whether its config needs ``trust_remote_code`` (an ``auto_map`` with a
            ``model_type`` transformers does not know).
        identity: Hashes that enter the run key: the weights' content hash, config.json's and, when
            present, the svdbench manifest's and the code files' SHA-256.
    """

    path: Path
    name: str
    remote_code: bool
    identity: dict[str, Any]


def describe_checkpoint(path: Path | str, name: str | None = None) -> ExternalCheckpoint:
    """Identify the checkpoint at ``path`` without loading it.

    Raises:
        FileNotFoundError: when ``path`` is not a directory with a ``config.json``.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    root = Path(path).expanduser()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} is not a transformers checkpoint directory (no config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    remote = bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING
    identity: dict[str, Any] = {"content_hash": fingerprint(str(root))["content_hash"],
                                "config_sha256": sha256_file(config_file)}
    if (root / MANIFEST).is_file():
        identity["manifest_sha256"] = sha256_file(root / MANIFEST)
    code = {p.name: sha256_file(p) for p in sorted(root.glob("*.py"))}
    if code:
        identity["code_sha256"] = code
    return ExternalCheckpoint(root, name or root.resolve().name, remote, identity)


def prepare_external(cfg: RunConfig) -> Prepared:
    """Validate the evaluation side of ``cfg`` (``cfg.model`` is the dense base model) without weights.

    Raises:
        ValueError: for bad settings, or an evaluation that needs a dense reference.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    for n, v in (("eval-batch-size", cfg.eval_batch_size), ("eval-window-stride", cfg.eval_window_stride),
                 ("eval-seqlen", cfg.eval_seqlen), ("eval-max-windows", cfg.eval_max_windows)):
        if v is not None and v < 1:
            raise ValueError(f"--{n} must be positive, got {v}")
    if cfg.eval_offload not in OFFLOAD_MODES:
        raise ValueError(f"--eval-offload must be one of {', '.join(OFFLOAD_MODES)}, got {cfg.eval_offload!r}")
    if not cfg.evals:
        raise ValueError("no evaluation given (--eval)")
    base_config = read_config(cfg.model)
    preflight(list(cfg.evals), encoder=is_encoder_config(base_config), options=eval_options(cfg.eval_options))
    needs_dense = [n for n in cfg.evals if EVALUATIONS.get(n).reference is not None]
    if needs_dense:
        raise ValueError(f"{', '.join(needs_dense)} compare(s) with the dense model measured in the same run; an "
                         "external checkpoint is evaluated with perplexity and zero-shot evaluations only")
    limit = max_positions(base_config)
    if cfg.eval_seqlen is not None and limit is not None and cfg.eval_seqlen > limit:
        raise ValueError(f"--eval-seqlen {cfg.eval_seqlen} exceeds the base model's maximum of {limit} positions")
    return Prepared(cfg, (), device, dtype, cfg.eval_seqlen or min(2048, limit or 2048), 0)


def _base_counts(base: str) -> tuple[dict[str, Any], int, int]:
    """The base model's fingerprint block, target-linear and total parameter counts (built on meta: no weights)."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = read_config(base)
    with torch.device("meta"):
        skeleton = (AutoModel if is_encoder_config(config) else AutoModelForCausalLM).from_config(config)
    layout = discover(skeleton)
    info = {**fingerprint(base), "family": getattr(config, "model_type", None), "n_blocks": layout.n_blocks}
    return info, sum(m.params for m in layout.modules), sum(p.numel() for p in skeleton.parameters())


def _load_checkpoint(ckpt: ExternalCheckpoint, base: str, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """The checkpoint's model (eval mode, on the CPU) and tokenizer, checked against the base tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if ckpt.remote_code and not trust_remote_code:
        raise ValueError(f"{ckpt.path} needs its own code to load (config.json has an auto_map for a model type "
                         "transformers does not know); read it, then pass --trust-remote-code")
    trust = bool(trust_remote_code and ckpt.remote_code)
    base_tok = AutoTokenizer.from_pretrained(resolve_model_path(base))
    has_tokenizer = any((ckpt.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=trust) if has_tokenizer else base_tok
    if len(tokenizer) != len(base_tok) or tokenizer(_TOKENIZER_PROBE).input_ids != base_tok(_TOKENIZER_PROBE).input_ids:
        raise ValueError(f"{ckpt.path} tokenizes differently from its base model {base}: its scores would not be "
                         "comparable with the base model's cells")
    config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust)
    cls = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    model = cls.from_pretrained(ckpt.path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust)
    return model.eval(), tokenizer


def _counts(params_model: int, params_targets_dense: int, params_model_dense: int) -> dict[str, Any]:
    """A record's counts; everything outside the target linears is taken to be stored unchanged."""
    compressed = params_model - (params_model_dense - params_targets_dense)
    if not 0 < compressed <= params_targets_dense:
        raise ValueError(f"the checkpoint has {params_model} parameters against {params_model_dense} of its base "
                         f"model ({params_targets_dense} in target linears): not a compression of that model")
    return {
        "achieved_ratio": 1.0 - compressed / params_targets_dense,
        "achieved_ratio_model": 1.0 - params_model / params_model_dense,
        "params_dense": params_targets_dense, "params_compressed": compressed,
        "params_model_dense": params_model_dense, "params_model_compressed": params_model,
    }


def _evaluate(model: Any, tokenizer: Any, prep: Prepared) -> tuple[dict[str, Any], str, float]:
    cfg = prep.config
    settings = EvalSettings(prep.eval_seqlen, cfg.eval_batch_size, cfg.eval_max_windows, cfg.limit, cfg.tasks, cfg.seed,
                            prep.device, window_stride=cfg.eval_window_stride,
                            options=resolve_options(cfg.evals, eval_options(cfg.eval_options)))
    t0 = time.perf_counter()
    where = placement(model, prep.device, cfg.eval_offload)
    with (resident if where == "resident" else offloaded)(model, prep.device):
        metrics = run_evaluations(list(cfg.evals), model, tokenizer, settings)
    return metrics, where, time.perf_counter() - t0


def run_external(cfg: RunConfig, checkpoint: Path | str, *, name: str | None = None, ratio: float | None = None,
                 trust_remote_code: bool = False) -> Path:
    """Evaluate ``checkpoint`` as a compressed cell of the base model ``cfg.model``; returns its record.

    An existing ``ok`` record of the same cell (same checkpoint files, base model and protocols) is
    kept. A failure after loading is recorded (status ``failed``) and raised.

    Args:
        cfg: The base model (``model``) and the evaluation settings (``evals``, ``eval_seqlen``,
            ``limit``, ``device``, ``dtype``, ``results``, ...); its methods and ratios are ignored.
        checkpoint: The directory (``save_pretrained`` layout).
        name: Its name in the method string (default: the directory's name).
        ratio: The nominal ratio it claims (the table column); default the achieved ratio of the
            target linears, rounded to two decimals.
        trust_remote_code: Allow running the directory's own code (needed for an svdbench export).
    """
    prep = prepare_external(cfg)
    ckpt = describe_checkpoint(checkpoint, name)
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    torch.manual_seed(cfg.seed)
    base_info, targets, total = _base_counts(cfg.model)
    method = {"name": f"{PREFIX}{ckpt.name}", "config": ckpt.identity}

    def done(ratio: float) -> tuple[dict[str, Any], Path, bool]:
        fields = key_fields(prep, base_info, method, ratio, None)
        path = Path(cfg.results) / f"{run_key(fields)}.json"
        existing = trusted_record(path, fields)  # as svdbench's own cells: signed and verified records only
        return fields, path, existing is not None and existing.get("status") == "ok"

    if ratio is not None and (found := done(ratio))[2]:  # known before any weight loads
        log.info("external cell done already: %s -> %s", ckpt.path, found[1])
        return found[1]
    t0 = time.perf_counter()
    model, tokenizer = _load_checkpoint(ckpt, cfg.model, prep.dtype, trust_remote_code)
    load_s = time.perf_counter() - t0
    counts = _counts(sum(p.numel() for p in model.parameters()), targets, total)
    ratio = round(counts["achieved_ratio"], 2) if ratio is None else ratio
    fields, path, finished = done(ratio)
    if finished:
        log.info("external cell done already: %s -> %s", ckpt.path, path)
        return path
    key = run_key(fields)
    header = record_header(key, base_info, cfg.limit, provenance(prep.device, prep.dtype, cfg.seed), method, ratio,
                           None, key_fields=fields)
    external = {"path": str(ckpt.path.resolve()), "name": ckpt.name, "remote_code": ckpt.remote_code,
                "architecture": type(model).__name__, **ckpt.identity}
    try:
        metrics, where, eval_s = _evaluate(model, tokenizer, prep)
    except Exception:
        write_record(path, {**failed_record(header, traceback.format_exc()), "external": external})
        raise
    options = eval_options(cfg.eval_options)
    evaluation = {"placement": where, **({"options": options} if options else {})}
    # Nothing was computed here but the evaluations: no statistics, probes, factorization or layers.
    record = cell_record(header, counts, metrics, evaluation, {"load": load_s, "eval": eval_s},
                         statistics_cached=True, statistics={}, probes={},
                         peak_bytes=peak_memory_bytes(prep.device)["bytes"], numerics={}, layers=[])
    write_record(path, {**record, "external": external})
    log.info("external %s: achieved ratio %.4f of %s's target linears -> %s", ckpt.name, counts["achieved_ratio"],
             cfg.model, path)
    return path
