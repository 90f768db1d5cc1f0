"""Regression scenarios (the llm-compressor ``tests/lmeval`` pattern): one YAML per expectation.

Example::

    # benchmarks/scenarios/llama2-7b_svd-llm_40.yaml
    model: Llama-2-7b-hf
    method: svd-llm
    ratio: 0.4
    metrics:
      wikitext2.ppl: {value: 12.3, rtol: 0.02, protocol: wikitext2@2048}
      zeroshot.average: {value: 0.52}
    recovery_threshold: 0.75     # compressed/dense (accuracy), dense/compressed (perplexity)

A ``regression`` pytest marker runs :func:`check_scenario` over such files and fails on any
returned message.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.report.metrics import relative_change, resolve_metric, verdict
from harness.report.store import load_store, value_text

__all__ = ["check_scenario"]

logger = logging.getLogger(__name__)

_SCENARIO_KEYS = {
    "model",
    "method",
    "ratio",
    "metrics",
    "recovery_threshold",
    "seed",
    "limit",
    "config_hash",
    "calibration",
    "rtol",
    "name",
    "description",
    "cadence",
}


def _load_scenario(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario must be a YAML mapping")
    for key in data:
        if key not in _SCENARIO_KEYS:  # strict: a typo must not silently disable a check
            close = difflib.get_close_matches(str(key), sorted(_SCENARIO_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown scenario key {key!r}{hint}")
    missing = [k for k in ("model", "method", "ratio") if k not in data]
    if missing or not (data.get("metrics") or data.get("recovery_threshold")):
        raise ValueError(
            f"{path}: a scenario needs model, method, ratio and metrics or recovery_threshold"
            + (f" (missing {', '.join(missing)})" if missing else "")
        )
    return data


def _select(frame: pd.DataFrame, sc: Mapping[str, Any], method: str, ratio: float) -> pd.DataFrame:
    sel = frame[
        ((frame["model"] == sc["model"]) | (frame["model_id"] == sc["model"])) & (frame["method"] == method)
    ]
    sel = sel[(sel["ratio"] - ratio).abs() < 1e-9]
    if "limit" in sc:
        sel = sel[sel["limit"].map(value_text) == value_text(sc["limit"])]
    else:  # smoke records only count when the scenario asks for them
        sel = sel[~sel["limited"].fillna(False).astype(bool)]
    if method == "dense":
        return sel
    if "seed" in sc:
        sel = sel[sel["seed"].map(value_text) == value_text(sc["seed"])]
    if "config_hash" in sc:
        sel = sel[sel["config_hash"] == str(sc["config_hash"])]
    for field_name, want in (sc.get("calibration") or {}).items():
        sel = sel[sel[f"calib_{field_name}"].map(value_text) == value_text(want)]
    return sel


def check_scenario(scenario_path: str | Path, results_dir: str | Path | pd.DataFrame) -> list[str]:
    """Check one regression scenario (llm-compressor style YAML) against a results store.

    Scenario keys: ``model``, ``method``, ``ratio`` (required); ``metrics`` mapping metric name ->
    ``{value, rtol?, protocol?}`` (a metric fails when worse than ``value`` by more than ``rtol``,
    default the scenario's ``rtol`` or 0.02); ``recovery_threshold`` (a float, or metric -> float:
    compressed/dense for higher-is-better metrics, dense/compressed for lower-is-better ones must
    reach it); optional filters ``seed``, ``limit`` (default: only records without ``--limit``),
    ``config_hash``, ``calibration: {source, samples, seqlen, seed}``. Several matching seeds are averaged.

    Args:
        scenario_path: The YAML file.
        results_dir: Results directory (or store frame).

    Returns:
        Human-readable failures; empty when the scenario passes.

    Raises:
        ValueError: If the scenario file is malformed (unknown keys, missing required keys).
    """
    sc = _load_scenario(scenario_path)
    frame = load_store(results_dir) if isinstance(results_dir, (str, Path)) else results_dir
    name = sc.get("name") or Path(scenario_path).stem
    ratio = float(sc["ratio"])
    sel = _select(frame, sc, str(sc["method"]), ratio)
    where = f"{name}: {sc['model']} / {sc['method']} @ ratio {ratio:g}"
    if sel.empty:
        return [f"{where}: no matching record in the results"]
    ident = (
        sel[["method_config", "calib_source", "calib_samples", "calib_seqlen"]]
        .map(value_text)
        .drop_duplicates()
    )
    if len(ident) > 1:
        return [
            f"{where}: {len(ident)} configurations/calibrations match; narrow with config_hash or calibration"
        ]
    failures: list[str] = []
    metrics: Mapping[str, Any] = sc.get("metrics") or {}
    thresholds = sc.get("recovery_threshold")
    if thresholds is not None and not isinstance(thresholds, Mapping):
        thresholds = {m: thresholds for m in metrics}
    dense = _select(frame, sc, "dense", 0.0) if thresholds else None
    for mname in dict.fromkeys([*metrics, *(thresholds or {})]):
        spec = resolve_metric(mname, frame.columns)
        cur = float(sel[spec.key].mean()) if spec.key in sel.columns else math.nan
        if math.isnan(cur):
            failures.append(f"{where}: {spec.key} not reported")
            continue
        expect = metrics.get(mname)
        if expect is not None:
            exp = expect if isinstance(expect, Mapping) else {"value": expect}
            want_proto = exp.get("protocol")
            got_proto = sorted(
                {value_text(p) for p in sel.get(f"{spec.key.split('.')[0]}.protocol", pd.Series())}
            )
            if want_proto and got_proto != [str(want_proto)]:
                failures.append(f"{where}: {spec.key} protocol {got_proto} != expected {want_proto!r}")
            tol = float(exp.get("rtol", sc.get("rtol", 0.02)))
            v = verdict(spec, float(exp["value"]), cur, tol)
            if v == "worse":
                failures.append(
                    f"{where}: {spec.key} = {cur:.6g} is worse than expected {float(exp['value']):.6g} "
                    f"({relative_change(float(exp['value']), cur):+.2%}, rtol {tol:.2%})"
                )
            elif v == "better":
                logger.info(
                    "%s: %s = %.6g beats the expected %.6g; consider updating the scenario",
                    where,
                    spec.key,
                    cur,
                    float(exp["value"]),
                )
        thr = (thresholds or {}).get(mname)
        if thr is not None:
            dval = float(dense[spec.key].mean()) if dense is not None and spec.key in dense else math.nan
            if math.isnan(dval):
                failures.append(f"{where}: recovery for {spec.key} needs a dense record of {sc['model']}")
                continue
            num, den = (cur, dval) if spec.higher_is_better else (dval, cur)
            recovery = num / den if den else math.inf
            if not recovery >= float(thr):
                failures.append(
                    f"{where}: {spec.key} recovery {recovery:.4f} < threshold {float(thr):.4f} "
                    f"(compressed {cur:.6g}, dense {dval:.6g})"
                )
    return failures
