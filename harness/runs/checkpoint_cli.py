"""Subcommands on checkpoint directories: ``svdbench validate DIR`` and ``svdbench run-external DIR --base M``."""

from __future__ import annotations

import argparse
from typing import Any


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cmd_validate(args: argparse.Namespace) -> int:
    from harness.runs.validate import validate_export

    report = validate_export(args.dir, tolerance=args.tolerance, remote_code=args.remote_code, ppl=args.ppl,
                             ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows, results=args.results,
                             ppl_rtol=args.ppl_rtol, device=args.device)
    print(report.render())
    return 0 if report.ok else 1


def _cmd_run_external(args: argparse.Namespace) -> int:
    from harness.runs import RunConfig
    from harness.runs.external import run_external

    cfg = RunConfig(model=args.base, methods=(), ratios=(), evals=args.eval, eval_seqlen=args.eval_seqlen,
                    eval_batch_size=args.eval_batch_size, eval_max_windows=args.eval_max_windows, limit=args.limit,
                    tasks=args.tasks, seed=args.seed, device=args.device, dtype=args.dtype, results=args.results,
                    eval_offload=args.eval_offload, eval_window_stride=args.eval_window_stride)
    print(run_external(cfg, args.dir, name=args.name, ratio=args.ratio, trust_remote_code=args.trust_remote_code))
    return 0


def add_checkpoint_subcommands(sub: Any) -> None:
    """Register ``validate`` and ``run-external`` on the ``svdbench`` subparsers ``sub``."""
    from harness.runs.validate import DEFAULT_PPL_RTOL, DEFAULT_TOLERANCE

    p = sub.add_parser("validate", help="check an export directory: files and checksums, module ranks, parameter "
                                        "counts against the recorded ratio, finite logits; exit 1 naming each problem")
    p.add_argument("dir", help="the export directory")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest absolute difference between a recorded and a recomputed achieved ratio")
    p.add_argument("--remote-code", action="store_true",
                   help="also load it with transformers' trust_remote_code=True (runs its modeling_svdbench.py) and "
                        "compare outputs with svdbench's loader")
    p.add_argument("--ppl", default=None, metavar="SOURCE",
                   help="a short perplexity: wikitext2, ptb, c4 (svdbench's protocols) or file:PATH (plain text)")
    p.add_argument("--ppl-seqlen", type=int, default=None, help="window length (default: the record's, else 256)")
    p.add_argument("--ppl-windows", type=int, default=None, help="windows scored (default: the record's, else 4)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="results directory holding the export's record (found by its run key): its perplexity is "
                        "recomputed under the same protocol and compared")
    p.add_argument("--ppl-rtol", type=float, default=DEFAULT_PPL_RTOL, help="relative tolerance of that comparison")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run-external", help="evaluate a compressed checkpoint svdbench did not make, as a cell of "
                                            "its dense base model (method external:<name> in the leaderboards)")
    p.add_argument("dir", help="checkpoint directory that transformers loads (save_pretrained layout)")
    p.add_argument("--base", required=True, help="the dense model it compresses (hub id, directory or alias): its "
                                                 "parameter count gives the achieved ratio, its cells the table")
    p.add_argument("--name", default=None, help="name in the method string external:<name> (default: directory name)")
    p.add_argument("--ratio", type=float, default=None,
                   help="the ratio it claims (table column); default its achieved ratio, rounded to 0.01")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the directory's own code (an svdbench export, or any checkpoint with auto_map)")
    p.add_argument("--eval", default=("wikitext2",), type=_names, help="perplexity and zero-shot evaluations")
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: min(2048, model max positions)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-max-windows", type=int, default=None, help="smoke runs: first N perplexity windows")
    p.add_argument("--eval-window-stride", type=int, default=None, help="perplexity on every k-th window only")
    p.add_argument("--tasks", type=_names, default=None, help="lm-eval tasks for --eval zeroshot")
    p.add_argument("--limit", type=int, default=None, help="lm-eval --limit (smoke only)")
    p.add_argument("--eval-offload", default="auto", choices=("auto", "never", "always"))
    p.add_argument("--results", default="results", help="directory for the JSON record")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--dtype", default="auto", help="float16, bfloat16 or float32 (auto: float16 on cuda, float32 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_run_external)
