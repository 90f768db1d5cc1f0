"""``svdbench sweep SPEC [--dry-run | --status] [--retry-failed] [--executor ...] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

from harness.sweep.spec import EXECUTORS

__all__ = ["add_sweep_subcommand", "build_sweep_parser", "cmd_sweep"]

log = logging.getLogger(__name__)

# Exit codes: 0 every cell ok, 1 some cell failed (or was skipped as failed), 2 could not run.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_sweep_parser() -> argparse.ArgumentParser:
    """The parser of ``svdbench sweep``'s own arguments."""
    p = argparse.ArgumentParser(prog="svdbench sweep", description=__doc__)
    p.add_argument("spec", help="YAML sweep spec, e.g. benchmarks/reference_leaderboard.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. ratios=[0.2,0.4] calibration.samples=32")
    show = p.add_mutually_exclusive_group()
    show.add_argument("--dry-run", action="store_true", help="list the grid and which cells are done; load no weights")
    show.add_argument("--status", action="store_true",
                      help="each cell as pending, running, done or failed (records, running workers, SLURM job "
                           "states), with failed cells' first error line; load no weights")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose record says failed")
    p.add_argument("--executor", choices=EXECUTORS, default=None, help="default: the spec's executor (inprocess)")
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or, with ``--dry-run`` or ``--status``, list) the cells of a sweep spec; returns the exit code."""
    from harness.sweep.executors import ExecutorUnavailableError
    from harness.sweep.run import dry_run, run_sweep, status
    from harness.sweep.spec import load_spec

    opts = build_sweep_parser().parse_intermixed_args(args.argv)
    try:
        spec = load_spec(opts.spec, opts.overrides)
        if opts.dry_run or opts.status:
            sys.stdout.write(dry_run(spec) if opts.dry_run else status(spec))
            return EXIT_OK
        result = run_sweep(spec, executor=opts.executor, retry_failed=opts.retry_failed)
    except (ValueError, FileNotFoundError, KeyError, ExecutorUnavailableError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    sys.stdout.write(f"sweep {spec.name}: {result.summary()}\n")
    return EXIT_OK if result.ok else EXIT_FAILED


def add_sweep_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``sweep`` on the engine's subparsers.

    One argparse pass cannot take options between SPEC and the overrides (the variadic positional
    is closed by the first option), so the subcommand takes its words verbatim (no prefix
    characters) and :func:`cmd_sweep` parses them with ``parse_intermixed_args``.
    """
    p = subparsers.add_parser("sweep", help="run the missing cells of a YAML sweep spec (resumable; --help for more)",
                              prefix_chars="\0", add_help=False)
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=cmd_sweep)
