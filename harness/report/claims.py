"""Paper claims checked against the records: per claim, metric, ratio and model, does it hold?

A claim is "method A beats method B" (a paper's headline: *AdaSVD beats SVD-LLM*, *whitening rescues
plain SVD*). :func:`check_claims` judges it on every model and ratio the records cover, with the
leaderboard's own rule (:func:`harness.report.spread.best_and_ties`: the seed-spread overlap, and on
zero-shot columns the paired test over documents), applied to the two methods alone:

* ``holds``: A is better and the rule separates the two;
* ``tie``: the rule does not separate them (whichever mean is better);
* ``reversed``: B is better and separated;
* ``–``: a model lacks one of the methods or the metric at that ratio.

The claims live in a YAML file (``benchmarks/claims.yaml``)::

    models: [smollm2-135m, gemma3-270m, minilm-l6]   # table columns, in order
    metrics: [wikitext2, average, embed-fidelity]     # tried in turn; a model uses those it has
    claims:
      - claim: AdaSVD beats SVD-LLM
        paper: AdaSVD
        better: adasvd
        than: svd-llm

A side names a method string; it also matches that method with options (``duo-svd`` matches
``duo-svd[kl-knapsack.n_sequences=1,...]``, the CPU probe of one model), preferring the exact string,
and refusing a model where several option variants match without it (name one in the claim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tabulate import tabulate

from harness.report.leaderboard import SINGLE_SEED_MARK, LeaderboardTable, build_leaderboard
from harness.report.metrics import UnknownMetricError, resolve_metric

HOLDS, TIE, REVERSED, MISSING = "holds", "tie", "reversed", "–"


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``than`` (``claim``: the sentence, ``paper``: whose claim)."""

    claim: str
    paper: str
    better: str
    than: str


@dataclass(frozen=True)
class ClaimsSpec:
    """A claims file: the models (columns), the metrics to try and the claims."""

    models: tuple[str, ...]
    metrics: tuple[str, ...]
    claims: tuple[Claim, ...]


@dataclass(frozen=True)
class Verdict:
    """One claim on one model, metric and ratio.

    Attributes:
        verdict: ``holds``, ``tie``, ``reversed`` or ``–``.
        better_text: The claimed-better method's value as the leaderboard prints it (``mean ± s``).
        than_text: The other method's.
        better_method: The method string matched on this model.
        than_method: Likewise.
    """

    verdict: str
    better_text: str = ""
    than_text: str = ""
    better_method: str = ""
    than_method: str = ""

    def text(self) -> str:
        if self.verdict == MISSING:
            return MISSING
        return f"{self.verdict}: {self.better_text} vs {self.than_text}"


@dataclass(frozen=True)
class ClaimRow:
    """A claim at one metric and ratio, with its verdict on each model."""

    claim: Claim
    metric: str
    ratio: float
    verdicts: dict[str, Verdict]

    def holds_on(self) -> list[str]:
        return [m for m, v in self.verdicts.items() if v.verdict == HOLDS]


def load_claims(path: str | Path) -> ClaimsSpec:
    """Read and check a claims file (module docstring).

    Raises:
        ValueError: a missing key or an empty list, naming the file and the claim.
    """
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for key in ("models", "metrics", "claims"):
        if not data.get(key):
            raise ValueError(f"{path}: '{key}' must be a non-empty list")
    claims = []
    for i, c in enumerate(data["claims"]):
        missing = [k for k in ("claim", "paper", "better", "than") if not c.get(k)]
        if missing:
            raise ValueError(f"{path}: claim {i + 1} ({c.get('claim', '?')!r}) lacks {', '.join(missing)}")
        claims.append(Claim(str(c["claim"]), str(c["paper"]), str(c["better"]), str(c["than"])))
    return ClaimsSpec(tuple(map(str, data["models"])), tuple(map(str, data["metrics"])), tuple(claims))


def match_method(side: str, methods: Sequence[str]) -> str | None:
    """The method string of ``methods`` that claim side ``side`` names (module docstring), or None.

    Raises:
        ValueError: several option variants match and the bare name is absent.
    """
    if side in methods:
        return side
    variants = sorted({m for m in methods if m.startswith(side + "[")})
    if len(variants) > 1:
        raise ValueError(f"'{side}' matches several method strings ({', '.join(variants)}): name one in the claim")
    return variants[0] if variants else None


def _pair_verdict(table: LeaderboardTable, key: str, ratio: float, better: str, than: str) -> Verdict:
    rows = table.rows
    at = table.methods_at(ratio)
    index = {m: i for i, m in zip(at.index, at["method"], strict=True)}
    if better not in index or than not in index:
        return Verdict(MISSING)
    ib, it = index[better], index[than]
    if pd.isna(rows.at[ib, key]) or pd.isna(rows.at[it, key]):
        return Verdict(MISSING)
    mark_b, mark_t = table.marks.at[ib, key], table.marks.at[it, key]
    if mark_b == "best" and mark_t == "":
        verdict = HOLDS
    elif mark_t == "best" and mark_b == "":
        verdict = REVERSED
    else:
        verdict = TIE  # "best tie" / "tie": the rule does not separate them
    return Verdict(verdict, _value_text(table, ib, key), _value_text(table, it, key), better, than)


def _value_text(table: LeaderboardTable, i: int, key: str) -> str:
    """The leaderboard's text of a value, with ``°`` on every single-seed value: a claim cell stands
    alone, so the table's header mark for an all-single-seed column does not reach it."""
    text = table.cell_text(i, key)
    if table.counts.at[i, key] == 1 and not text.endswith(SINGLE_SEED_MARK):
        text += SINGLE_SEED_MARK
    return text


def _model_metrics(sub: pd.DataFrame, model: str, wanted: Sequence[str]) -> dict[str, str]:
    """``{claim-file metric name: store key}`` for the metrics of ``wanted`` that ``model`` has values of."""
    present = [c for c in sub.columns if sub[c].notna().any()]
    out = {}
    for name in wanted:
        try:
            key = resolve_metric(name, present).key
        except UnknownMetricError:
            continue
        if key in present:
            out[name] = key
    return out


def check_claims(frame: pd.DataFrame, spec: ClaimsSpec) -> list[ClaimRow]:
    """Judge every claim of ``spec`` on every model, metric and ratio of the store ``frame``.

    Each claim is judged on a leaderboard of its two methods alone, so the verdict is the
    leaderboard's best/tie mark between them (module docstring).

    Args:
        frame: Store frame (:func:`harness.report.store.load_store`), all models, one protocol each.
        spec: From :func:`load_claims`.

    Returns:
        One :class:`ClaimRow` per claim, metric and ratio where at least one model has both methods,
        in the file's claim order, then metric order, then ratio.

    Raises:
        ValueError: a method with records of two configurations or calibrations at one ratio, or a
            side that matches several option variants.
    """
    frame = frame[frame["status"].fillna("ok") == "ok"] if "status" in frame else frame
    per_model = {m: frame[frame["model"] == m] for m in spec.models}
    metrics = {m: _model_metrics(sub, m, spec.metrics) for m, sub in per_model.items() if not sub.empty}
    out: list[ClaimRow] = []
    order = {m: i for i, m in enumerate(spec.metrics)}
    for claim in spec.claims:
        cells: dict[tuple[str, float], dict[str, Verdict]] = {}
        for model, keys in metrics.items():
            sub = per_model[model]
            methods = sorted(set(sub["method"]))
            better, than = match_method(claim.better, methods), match_method(claim.than, methods)
            if better is None or than is None or not keys:
                continue
            (table,) = build_leaderboard(sub[sub["method"].isin([better, than])], metrics=list(keys.values()),
                                         model=model)
            for name, key in keys.items():
                for ratio in sorted(set(table.rows.loc[~table.rows["is_dense"], "ratio"])):
                    verdict = _pair_verdict(table, key, float(ratio), better, than)
                    if verdict.verdict != MISSING:
                        cells.setdefault((name, float(ratio)), {})[model] = verdict
        for (metric, ratio), verdicts in sorted(cells.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
            out.append(ClaimRow(claim, metric, ratio, {m: verdicts.get(m, Verdict(MISSING)) for m in spec.models}))
    return out


def render_claims(rows: Sequence[ClaimRow], models: Sequence[str], labels: Mapping[str, str] | None = None,
                  fmt: str = "md") -> str:
    """The claims table: claim, metric, ratio, one column per model, and where it holds.

    Args:
        rows: From :func:`check_claims`.
        models: Column order.
        labels: Model -> column title (default the model name).
        fmt: ``md`` or ``csv`` (one row per claim, metric, ratio and model, with the verdict alone).
    """
    labels = dict(labels or {})
    if fmt == "csv":
        flat: list[dict[str, Any]] = [
            {"claim": r.claim.claim, "paper": r.claim.paper, "metric": r.metric, "ratio": r.ratio, "model": m,
             "verdict": v.verdict, "better": v.better_method, "than": v.than_method,
             "better_value": v.better_text, "than_value": v.than_text}
            for r in rows for m, v in r.verdicts.items()
        ]
        return pd.DataFrame(flat).to_csv(index=False, lineterminator="\n")
    if fmt != "md":
        raise ValueError(f"claims render as md or csv, not {fmt!r}")
    body = []
    for r in rows:
        holds = r.holds_on()
        where = ("all" if len(holds) == len([v for v in r.verdicts.values() if v.verdict != MISSING]) > 1
                 else ", ".join(labels.get(m, m) for m in holds) or "none")
        body.append([f"{r.claim.claim} ({r.claim.paper})", r.metric, f"{r.ratio:g}",
                     *(r.verdicts[m].text() for m in models), where])
    table = tabulate(body, headers=["Claim (paper)", "Metric", "Ratio", *(labels.get(m, m) for m in models), "Holds on"],
                     tablefmt="pipe", disable_numparse=True)
    notes = [
        "- Each cell: the verdict, then the claimed-better method's value vs the other's (mean ± s over seeds, "
        "as the leaderboard prints them).",
        "- holds: better and separated by the leaderboard's rule (seed spreads do not overlap; on zero-shot "
        "columns also the paired test over documents); tie: not separated; reversed: the other method is "
        "better and separated; –: no records of both methods at that ratio.",
        "- Holds on: the models where it holds (all: every model that has both methods).",
    ]
    return "\n".join([table, "", *notes])
