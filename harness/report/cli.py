"""Report subcommands (``leaderboard``, ``plot``, ``compare``, ``claims``) for the engine's argparse CLI.

``leaderboard --format html --out DIR`` writes the static site (:mod:`harness.report.site.writer`);
``leaderboard --agreement METRIC_A,METRIC_B`` prints how two metrics (or, with
``--agreement-models A,B``, two models) rank the methods alike (:mod:`harness.report.agreement`).

The engine owns the entry point; it calls :func:`add_report_subcommands` on its subparsers and
then ``return args.func(args)``. Each ``func`` returns the process exit code. Results go to
stdout (or ``--output``); diagnostics go to the logging system (stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.report.entries import LimitedRecordsError

__all__ = ["add_report_subcommands", "cmd_leaderboard", "cmd_plot", "cmd_compare", "cmd_claims"]

logger = logging.getLogger(__name__)

# Exit codes: 0 success, 1 regression found (compare), 2 the command could not run (bad input).
EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


def _quiet_font_subsetting() -> None:
    # Every PDF figure makes fontTools log its glyph subsetting at INFO; the CLI runs at INFO.
    logging.getLogger("fontTools").setLevel(logging.WARNING)


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
        logger.info("wrote %s", output)
    else:
        sys.stdout.write(text)


def _html_site(args: argparse.Namespace) -> int:
    """``leaderboard RESULTS --format html --out DIR``: write the static site, print its index path."""
    from harness.report.site.writer import write_site
    from harness.report.store import StoreError

    if not args.out:
        logger.error("--format html writes a site (a directory): give it with --out DIR")
        return EXIT_USAGE
    if len(args.results) != 1:
        logger.error("--format html builds its site from one results directory, got %d", len(args.results))
        return EXIT_USAGE
    _quiet_font_subsetting()
    try:
        index = write_site(
            args.results[0],
            args.out,
            metrics=args.metrics,
            model=args.model,
            allow_limited=args.allow_limited,
            baseline=args.compare,
            rtol=args.rtol,
            figures=not args.no_figures,
        )
    except (StoreError, ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    sys.stdout.write(f"{index}\n")
    return EXIT_OK


def _split_pair(text: str, what: str) -> list[str]:
    """``"A,B"`` -> ``["A", "B"]`` (``"A"`` -> ``["A"]``); more than two names is an error."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"{what}: give one or two comma-separated names, got {text!r}")
    return parts


def _agreement(args: argparse.Namespace) -> int:
    """``leaderboard RESULTS --agreement A,B [--ratio R] [--agreement-models M1,M2]``: rank agreement."""
    from harness.report.agreement import agreement, render_agreement
    from harness.report.store import load_stores

    if args.format not in ("md", "csv"):
        logger.error("--agreement prints md or csv, not %s", args.format)
        return EXIT_USAGE
    try:
        metrics = _split_pair(args.agreement, "--agreement")
        models = _split_pair(args.agreement_models, "--agreement-models") if args.agreement_models else None
        if models is None and args.model:
            models = [args.model]
        results = agreement(
            load_stores(args.results), metrics[0], metrics[-1], ratio=args.ratio, models=models,
            allow_limited=args.allow_limited,
        )
        text = render_agreement(results, fmt=args.format)
    except (LimitedRecordsError, ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    _emit(text, args.output)
    return EXIT_OK


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``leaderboard RESULTS --format md|latex|csv|html``: render the paper-style table (html: a site);
    with ``--agreement``: the rank agreement of two metrics or models instead."""
    from harness.report.leaderboard import render_leaderboard
    from harness.report.store import load_stores

    if args.agreement:
        return _agreement(args)
    if args.agreement_models or args.ratio is not None:
        logger.error("--agreement-models and --ratio belong to --agreement METRIC_A,METRIC_B")
        return EXIT_USAGE
    if args.format == "html":
        return _html_site(args)
    if args.compare or args.out:
        logger.error("--out and --compare belong to --format html; text formats use --output FILE")
        return EXIT_USAGE
    try:
        text = render_leaderboard(
            load_stores(args.results),
            fmt=args.format,
            metrics=args.metrics,
            allow_limited=args.allow_limited,
            model=args.model,
        )
    except (LimitedRecordsError, ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    _emit(text, args.output)
    return EXIT_OK


def cmd_claims(args: argparse.Namespace) -> int:
    """``claims CLAIMS.yaml RESULTS``: per paper claim, metric, ratio and model, whether it holds."""
    from harness.report.claims import check_claims, load_claims, render_claims
    from harness.report.store import load_stores

    try:
        spec = load_claims(args.claims)
        frame = load_stores(args.results)
        rows = check_claims(frame, spec)
        text = render_claims(rows, spec.models, fmt=args.format)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    _emit(text, args.output)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """``plot RESULTS --kind K [K ...] --out DIR``: write PDF + PNG figures and list their paths."""
    from harness.report.plots import plot
    from harness.report.store import load_store

    written: list[Path] = []
    _quiet_font_subsetting()
    try:
        frame = None
        for kind in args.kind:
            if kind == "spectra":
                written += plot(
                    None,
                    kind,
                    args.out,
                    spectra=args.spectra or args.results,
                    layers=args.layers,
                    git_sha=args.git_sha,
                    sweep_id=args.sweep_id,
                )
                continue
            frame = load_store(args.results) if frame is None else frame
            written += plot(
                frame,
                kind,
                args.out,
                model=args.model,
                metric=args.metric,
                ratio=args.ratio,
                value=args.value,
                git_sha=args.git_sha,
                sweep_id=args.sweep_id,
                allow_limited=args.allow_limited,
                chance=None if kind == "ppl-vs-ratio" else args.chance,  # a chance level is an accuracy's
            )
    except (LimitedRecordsError, ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    sys.stdout.write("".join(f"{p}\n" for p in written))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """``compare RESULTS --baseline BASELINE [--rtol R]``: exit 1 on a worse metric or a missing cell."""
    from harness.report.compare import compare

    try:
        result = compare(args.results, args.baseline, rtol=args.rtol, metrics=args.metrics)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    if args.output:
        out = Path(args.output)
        text = (
            result.table.to_csv(index=False)
            if out.suffix == ".csv"
            else result.to_markdown(only_problems=False)
        )
        _emit(text, args.output)
    sys.stdout.write(result.to_markdown(only_problems=not args.show_all))
    return result.exit_code


def add_report_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``leaderboard``, ``plot``, ``compare`` and ``claims`` on the engine's subparsers.

    Each subcommand sets ``func`` (namespace -> exit code) as its default.
    """
    from harness.report.plots import PLOT_KINDS

    p = subparsers.add_parser("leaderboard", help="paper-style table from a results directory")
    p.add_argument(
        "results", nargs="+",
        help="results directories (searched recursively) or record files; a record in several is counted once "
        "(e.g. two models' folders for --agreement-models)",
    )
    p.add_argument(
        "--format", choices=("md", "latex", "csv", "html"), default="md", help="html: a static site, see --out"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="columns, e.g. wikitext2 ptb piqa average (default: all present)",
    )
    p.add_argument(
        "--allow-limited", action="store_true", help="include records evaluated with --limit (marked)"
    )
    p.add_argument("--model", help="only this model (name or id); default: one table per model")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.add_argument("--out", metavar="DIR", help="html: the site directory (index.html, records/, figures/)")
    p.add_argument("--compare", metavar="BASELINE", help="html: also show regression verdicts against BASELINE")
    p.add_argument("--rtol", type=float, default=0.02, help="html --compare: relative tolerance (default 0.02)")
    p.add_argument("--no-figures", action="store_true", help="html: leave the figures out (faster)")
    p.add_argument(
        "--agreement",
        metavar="METRIC_A,METRIC_B",
        help="instead of the table: Spearman rho / Kendall tau of the methods' rankings by two metrics "
        "(e.g. wikitext2,average), per ratio; one metric with --agreement-models compares two models",
    )
    p.add_argument("--agreement-models", metavar="MODEL_A,MODEL_B", help="--agreement: rank on these two models")
    p.add_argument("--ratio", type=float, help="--agreement: only this ratio (default: every ratio)")
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser("claims", help="which paper claims hold, per metric, ratio and model")
    p.add_argument("claims", help="claims file (YAML: models, metrics, claims; see harness/report/claims.py)")
    p.add_argument("results", nargs="+", help="results directories (searched recursively), one protocol per model")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_claims)

    p = subparsers.add_parser("plot", help="paper figures (PDF + 300 dpi PNG) from a results directory")
    p.add_argument("results", help="results directory; for --kind spectra also a spectra JSON/npz file")
    p.add_argument("--kind", nargs="+", choices=PLOT_KINDS, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", help="only this model (default: one figure per model)")
    p.add_argument("--metric", help="ppl-vs-ratio: wikitext2|ptb|c4; zeroshot-vs-ratio: average or a task")
    p.add_argument("--ratio", type=float, help="rank-allocation: which ratio (default: the most common)")
    p.add_argument("--value", choices=("keep", "rank"), default="keep", help="rank-allocation y axis")
    p.add_argument("--spectra", help="spectra JSON/npz written by the engine (for --kind spectra)")
    p.add_argument("--layers", nargs="+", help="spectra: layer names to show (default: 4 spread out)")
    p.add_argument("--git-sha", help="recorded in the figure metadata (default: git rev-parse HEAD)")
    p.add_argument("--sweep-id", help="recorded in the figure metadata (default: from the records)")
    p.add_argument("--allow-limited", action="store_true", help="plot records evaluated with --limit")
    p.add_argument(
        "--chance", type=float, metavar="FRACTION",
        help="zeroshot-vs-ratio: chance level as a fraction (e.g. 0.37), drawn as a dotted line",
    )
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser("compare", help="regression verdict against a baseline results directory")
    p.add_argument("results", help="results directory under test")
    p.add_argument("--baseline", required=True, help="baseline results directory")
    p.add_argument("--rtol", type=float, default=0.02, help="relative tolerance (default 0.02)")
    p.add_argument(
        "--metrics", nargs="+", metavar="METRIC", help="metrics to compare (default: all in baseline)"
    )
    p.add_argument("--output", help="also write the full table (.csv, or Markdown otherwise)")
    p.add_argument("--show-all", action="store_true", help="print ok rows too, not only problems")
    p.set_defaults(func=cmd_compare)
