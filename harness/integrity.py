"""Records verify themselves: a content digest, the run key re-derived, metrics against their sources.

A record is trusted only when what it says agrees with itself:

* **Digest.** Records written by this svdbench carry ``digest: {sha256, scheme}``, the SHA-256 of the
  canonical JSON (:func:`harness.records.canonical_json`) of the record without its digest. Any edit
  after writing changes it.
* **Run key.** Records written by this svdbench carry ``key_fields``, the very fields their run key
  hashes (:func:`harness.runs.config.key_fields`): the key must be their hash, and the record's model,
  dtype, method, ratio, calibration, evaluations and limit must be the ones those fields name. A
  record whose ratio was edited no longer matches its key, so it cannot move silently to another row.
  The file name, when it has the form of a run key, must be the record's key.
* **Metrics against their sources.** A perplexity is ``exp(nll_sum / tokens)`` of its own block; the
  achieved ratios are ``1 - compressed / dense`` of the parameter counts; a zero-shot task's accuracy
  is the share of ones in its per-document string, the average the mean of the task values.

Records written before digests existed are **unsigned**: they are verified as far as their content
allows (perplexity against its nll sum, per-document accuracies, the target-linear ratio within
1e-3; their run key re-derived from the fields the key hashed, which older records hold implicitly,
see :func:`legacy_key_fields`) and never called tampered for lacking a digest. The checks older
writers and hand-made stores may not satisfy (the whole-model ratio, a task's ``value`` against its
metric, the zero-shot average) apply to signed records only. A key that cannot be re-derived from an unsigned record is a warning, not a verdict: its
writer may have used a setting this reader cannot reconstruct.

Anything that fails makes the record **tampered**: the report never ranks it, a run or sweep never
counts it as done (the run moves it aside and recomputes it), and each names the file and the check.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.files import quarantine, write_text_atomic
from harness.records import canonical_json, read_record, run_key

__all__ = [
    "DIGEST", "DIGEST_SCHEME", "KEY_FIELDS", "SIGNED", "TAMPERED", "UNSIGNED", "Verdict", "identity_problems",
    "legacy_key_fields", "record_digest", "sign", "verify_record", "write_record",
]

log = logging.getLogger(__name__)

DIGEST = "digest"
KEY_FIELDS = "key_fields"
DIGEST_SCHEME = "sha256 of canonical JSON without the digest, v1"
SIGNED, UNSIGNED, TAMPERED = "signed", "unsigned", "tampered"
_RUN_KEY = re.compile(r"^[0-9a-f]{20}$")
_PPL_RTOL = 1e-9
_RATIO_ATOL = 1e-9
_LEGACY_RATIO_ATOL = 1e-3  # unsigned records: older writers (and hand-made test stores) rounded counts


@dataclass
class Verdict:
    """What :func:`verify_record` found.

    Attributes:
        status: ``signed`` (digest and every check hold), ``unsigned`` (no digest; every check that
            its content allows holds) or ``tampered``.
        problems: Why it is tampered (empty otherwise), one sentence each.
        notes: What could not be verified (an unsigned record's key that could not be re-derived).
    """

    status: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != TAMPERED

    def reason(self) -> str:
        return "; ".join(self.problems) or "; ".join(self.notes) or self.status


def _body(record: Mapping[str, Any]) -> dict[str, Any]:
    # Keys starting with "_" are added by readers (the report store's _source_file), never written.
    return {k: v for k, v in record.items() if k != DIGEST and not str(k).startswith("_")}


def record_digest(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``record`` without its digest (and reader-added ``_`` keys)."""
    return hashlib.sha256(canonical_json(_body(record)).encode()).hexdigest()


def sign(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as JSON reads it back (tuples as lists, keys as strings), with its digest added."""
    plain = json.loads(json.dumps(_body(record), allow_nan=False, default=str))
    plain[DIGEST] = {"sha256": record_digest(plain), "scheme": DIGEST_SCHEME}
    return plain


# -- checks -------------------------------------------------------------------------------------------
def _close(a: Any, b: float, rtol: float = 0.0, atol: float = 0.0) -> bool:
    return isinstance(a, int | float) and not isinstance(a, bool) and math.isclose(float(a), b, rel_tol=rtol, abs_tol=atol)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _perplexity_problems(name: str, block: Mapping[str, Any]) -> list[str]:
    """A perplexity block (``ppl``, ``nll_sum``, ``tokens``, ...) against its own sum and count."""
    nll, tokens = block.get("nll_sum"), block.get("tokens")
    if not (_number(nll) and _number(tokens)) or tokens <= 0:
        return []
    out = []
    windows, bad = block.get("windows"), block.get("nonfinite_windows") or 0
    ppl = block.get("ppl")
    if ppl is not None and not bad:
        expected = math.exp(nll / tokens)
        if not _close(ppl, expected, rtol=_PPL_RTOL):
            out.append(f"{name}.ppl is {ppl!r} but its nll_sum/tokens give {expected:.6g}")
    finite = block.get("ppl_finite_windows")
    if finite is not None and _number(windows) and windows > bad:
        expected = math.exp(nll / (tokens * (windows - bad) / windows))
        if not _close(finite, expected, rtol=_PPL_RTOL):
            out.append(f"{name}.ppl_finite_windows is {finite!r} but its nll_sum/tokens give {expected:.6g}")
    return out


def _zeroshot_problems(name: str, block: Mapping[str, Any], strict: bool) -> list[str]:
    tasks = block.get("tasks")
    if not isinstance(tasks, Mapping):
        return []
    out = []
    values = []
    for task, t in tasks.items():
        if not isinstance(t, Mapping):
            continue
        values.append(t.get("value"))
        metric = t.get("metric")
        if strict and isinstance(metric, str) and metric in t and t.get("value") != t[metric]:
            out.append(f"{name}.tasks.{task}.value is {t.get('value')!r} but its {metric} is {t[metric]!r}")
        per_doc = t.get("per_doc") or {}
        for m in ("acc", "acc_norm"):
            ones = per_doc.get(m) if isinstance(per_doc, Mapping) else None
            if isinstance(ones, str) and ones and _number(t.get(m)) and len(ones) == t.get("n_docs", len(ones)):
                share = ones.count("1") / len(ones)
                if not _close(t[m], share, atol=1e-9):
                    out.append(f"{name}.tasks.{task}.{m} is {t[m]!r} but its per-document results give {share:.6g}")
    average = block.get("average")
    if strict and _number(average) and values and all(_number(v) for v in values):
        mean = sum(values) / len(values)
        if not _close(average, mean, atol=1e-9):
            out.append(f"{name}.average is {average!r} but its tasks' values average {mean:.6g}")
    return out


def _ratio_problems(record: Mapping[str, Any], strict: bool) -> list[str]:
    out = []
    pairs = [("achieved_ratio", "params_compressed", "params_dense"),
             ("achieved_ratio_storage", "storage_compressed", "params_dense")]
    if strict:  # older writers' (and hand-made stores') whole-model counts are not checked
        pairs.append(("achieved_ratio_model", "params_model_compressed", "params_model_dense"))
    for ratio, compressed, dense in pairs:
        value, c, d = record.get(ratio), record.get(compressed), record.get(dense)
        if _number(value) and _number(c) and _number(d) and d > 0:
            expected = 1.0 - c / d
            if not _close(value, expected, atol=_RATIO_ATOL if strict else _LEGACY_RATIO_ATOL):
                out.append(f"{ratio} is {value!r} but {compressed}/{dense} = {c}/{d} give {expected:.6g}")
    return out


def metric_problems(record: Mapping[str, Any], strict: bool = True) -> list[str]:
    """Metrics and ratios of an ok record that disagree with what they are computed from."""
    if record.get("status") != "ok":
        return []
    out = _ratio_problems(record, strict)
    metrics = record.get("metrics")
    for name, block in (metrics.items() if isinstance(metrics, Mapping) else ()):
        if isinstance(block, Mapping):
            out += _perplexity_problems(name, block)
            out += _zeroshot_problems(name, block, strict)
    return out


def _method_block(record: Mapping[str, Any]) -> Any:
    method = record.get("method") or {}
    if isinstance(method, Mapping) and method.get("name") == "dense":
        return {"name": "dense"}  # the dense key hashes the name alone
    return method


def identity_problems(record: Mapping[str, Any], fields: Mapping[str, Any]) -> list[str]:
    """What the record says about its identity (model, dtype, method, ratio, calibration, evaluations,
    limit) that differs from the key ``fields`` (its own ``key_fields``, or those a run expects)."""
    said: dict[str, Any] = {
        "model": {k: (record.get("model") or {}).get(k) for k in ("id", "revision", "content_hash")},
        "dtype": (record.get("provenance") or {}).get("dtype"),
        "method": _method_block(record),
        "ratio": record.get("ratio"),
        "calibration": record.get("calibration"),
    }
    if record.get("status") == "ok" and isinstance(record.get("metrics"), Mapping):
        said["evals"] = sorted(record["metrics"])
    if "limit" in record:
        said["limit"] = record.get("limit")
    wanted = json.loads(canonical_json(fields))
    out = []
    for name, value in json.loads(canonical_json(said)).items():
        expected = (wanted.get("eval") or {}).get("limit") if name == "limit" else wanted.get(name)
        if name not in wanted and name != "limit":
            continue
        if name == "dtype" and value is None:
            continue  # a failure recorded before the run resolved its dtype
        if value != expected:
            out.append(f"{name} is {_short(value)} but the run key's fields say {_short(expected)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_PROTOCOL = re.compile(r"^[^@]+@(?:[a-z]+-)?(\d+)(?::every(\d+))?(?::first(\d+))?$")
_SEQLENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def legacy_key_fields(record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The key fields an unsigned ok record's run key may have hashed, reconstructed from its content.

    The evaluation length, window stride and first-N windows come from the perplexity protocol ids;
    the SVD driver and a zero-shot task list are tried with and without.
    """
    model, prov = record.get("model") or {}, record.get("provenance") or {}
    metrics = record.get("metrics") or {}
    seqlens, firsts, strides = set(), {None}, set()
    for block in metrics.values():
        match = _PROTOCOL.match(str(block.get("protocol"))) if isinstance(block, Mapping) else None
        if match:
            seqlens.add(int(match.group(1)))
            strides.add(int(match.group(2)) if match.group(2) else None)
            firsts.add(int(match.group(3)) if match.group(3) else None)
    options = (record.get("evaluation") or {}).get("options")
    zeroshot = metrics.get("zeroshot") or {}
    tasks = [None] + ([list(zeroshot["tasks"])] if isinstance(zeroshot.get("tasks"), Mapping) else [])
    drivers = dict.fromkeys([None, (record.get("statistics") or {}).get("svd_driver"), "svd", "gram-eigh"])
    for seqlen, first, stride, task_list, driver in itertools.product(
            sorted(seqlens) or _SEQLENS, firsts, sorted(strides, key=str) or [None], tasks, drivers):
        yield {
            "model": {k: model.get(k) for k in ("id", "revision", "content_hash")},
            "dtype": prov.get("dtype"), "method": _method_block(record), "ratio": record.get("ratio"),
            "calibration": record.get("calibration"), "evals": sorted(metrics),
            "eval": {"seqlen": seqlen, "max_windows": first, "limit": record.get("limit"), "tasks": task_list,
                     **({"window_stride": stride} if stride else {}), **({"options": options} if options else {})},
            **({"svd_driver": driver} if driver else {}),
            "svdbench": prov.get("svdbench_version"),
        }


def verify_record(record: Mapping[str, Any], path: Path | str | None = None,
                  expected: Mapping[str, Any] | None = None) -> Verdict:
    """Verify ``record`` (module docstring).

    Args:
        record: The parsed record.
        path: Its file; a file name of the form of a run key must be the record's key.
        expected: The key fields a run expects under this file (:func:`harness.runs.config.key_fields`);
            the record's identity must match them.

    Returns:
        The :class:`Verdict`.
    """
    problems: list[str] = []
    notes: list[str] = []
    key = record.get("run_key")
    digest = record.get(DIGEST)
    signed = digest is not None
    if signed:
        stored = digest.get("sha256") if isinstance(digest, Mapping) else None
        if stored != record_digest(record):
            problems.append("its content digest does not match its content (edited after it was written)")
    stem = Path(path).stem if path is not None else None
    if stem is not None and _RUN_KEY.match(stem) and stem != key:
        problems.append(f"its run key {key!r} is not its file name {stem!r}")
    fields = record.get(KEY_FIELDS)
    if isinstance(fields, Mapping):
        if run_key(dict(fields)) != key:
            problems.append(f"its run key {key!r} is not the hash of its key fields ({run_key(dict(fields))})")
        problems += identity_problems(record, fields)
    elif signed and record.get("status") == "ok":
        problems.append("it has a digest but no key fields")
    elif record.get("status") == "ok" and isinstance(key, str) and _RUN_KEY.match(key):
        if not any(run_key(c) == key for c in legacy_key_fields(record)):
            notes.append("its run key could not be re-derived from its content (an edited identity, or a "
                         "setting this reader cannot reconstruct)")
    if expected is not None and record.get("status") == "ok":
        problems += [p.replace("the run key's fields say", "this cell is") for p in identity_problems(record, expected)]
        if run_key(dict(expected)) != key:
            problems.append(f"its run key {key!r} is not this cell's ({run_key(dict(expected))})")
    problems += metric_problems(record, strict=signed)
    return Verdict(TAMPERED if problems else (SIGNED if signed else UNSIGNED), list(dict.fromkeys(problems)), notes)


# -- reading and writing --------------------------------------------------------------------------------
def trusted_record(path: Path, expected: Mapping[str, Any] | None = None, repair: bool = True) -> dict[str, Any] | None:
    """The record at ``path`` when it parses and verifies, else None.

    A record that does not parse or verify is logged with the file and the reason; with ``repair`` it is
    moved aside (bounded quarantine, :func:`harness.files.quarantine`) so that its cell is recomputed.
    """
    record = read_record(path, repair=repair)
    if record is None:
        return None
    verdict = verify_record(record, path, expected)
    if verdict.ok:
        for note in verdict.notes:
            log.warning("record %s: %s", path, note)
        return record
    if repair:
        quarantine(path, f"tampered record ({verdict.reason()}); it is recomputed")
    else:
        log.error("tampered record %s: %s; it does not count as done", path, verdict.reason())
    return None


def write_record(path: Path, record: Mapping[str, Any]) -> bool:
    """Sign ``record`` and write it atomically to ``path``, unless that would replace a finished one.

    A ``failed`` record never replaces an ``ok`` record that verifies (another process, or an earlier
    run, finished the cell); an ``ok`` record that does not verify is moved aside first (kept as
    evidence, never overwritten); an ``ok`` record replaces anything else. Returns whether it was written.
    """
    signed = sign(record)
    if signed.get("status") != "ok" and path.is_file():
        existing = read_record(path, repair=False)
        if existing is not None and existing.get("status") == "ok":
            verdict = verify_record(existing, path)
            if verdict.ok:
                log.warning("not recording %s as failed: %s holds a finished record of it", signed.get("run_key"), path)
                return False
            quarantine(path, f"tampered record ({verdict.reason()}) in the way of a failure record")
    write_text_atomic(path, json.dumps(signed, indent=1, allow_nan=False, default=str))
    return True
