"""Keep README.md's result tables generated from the records, never typed by hand.

A generated block in a Markdown file is the command that makes it, as an HTML comment, then its output,
then an end marker::

    <!-- svdbench: leaderboard results/reference --model smollm2-135m --format md -->
    ...the command's standard output...
    <!-- svdbench: end -->

    python -m benchmarks.readme_tables README.md           # rewrite every block from the records
    python -m benchmarks.readme_tables README.md --check   # exit 1 and name the stale blocks

The command is any ``svdbench`` report subcommand that prints to standard output (``leaderboard``,
``compare``, ``claims``); it runs in-process from the repository root, so its paths are relative to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.cli import main as svdbench

log = logging.getLogger("benchmarks.readme_tables")

START = re.compile(r"^<!-- svdbench: (?P<command>(?!end -->).+?) -->\n", re.M)
END = "<!-- svdbench: end -->"
ALLOWED = ("leaderboard", "compare", "claims")


@dataclass(frozen=True)
class Block:
    """One generated block: its command and the character span of its body (between the markers)."""

    command: str
    body_start: int
    body_end: int


def find_blocks(text: str) -> list[Block]:
    """The generated blocks of ``text`` in order.

    Raises:
        ValueError: a start marker without its end marker, or a command that is not a report command.
    """
    blocks = []
    for match in START.finditer(text):
        end = text.find(END, match.end())
        if end < 0:
            raise ValueError(f"'<!-- svdbench: {match['command']} -->' has no '{END}' after it")
        command = match["command"].strip()
        if shlex.split(command)[0] not in ALLOWED:
            raise ValueError(f"generated block command must be one of {', '.join(ALLOWED)}: {command!r}")
        blocks.append(Block(command, match.end(), end))
    return blocks


def render(command: str) -> str:
    """Standard output of ``svdbench <command>`` (run in-process), ending in one newline.

    Raises:
        RuntimeError: when the command exits non-zero.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = svdbench(shlex.split(command))
    if code != 0:
        raise RuntimeError(f"svdbench {command} exited {code}")
    return out.getvalue().rstrip("\n") + "\n"


def regenerate(text: str) -> tuple[str, list[str]]:
    """``text`` with every block's body replaced by its command's output, and the commands whose
    body changed."""
    changed: list[str] = []
    pieces, cursor = [], 0
    for block in find_blocks(text):
        body = render(block.command)
        if body != text[block.body_start:block.body_end]:
            changed.append(block.command)
        pieces += [text[cursor:block.body_start], body]
        cursor = block.body_end
    pieces.append(text[cursor:])
    return "".join(pieces), changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="Markdown files with generated blocks")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        new, changed = regenerate(text)
        for command in changed:
            print(f"{path}: {'stale' if args.check else 'updated'}: svdbench {command}", file=sys.stderr)
        stale += len(changed)
        if changed and not args.check:
            path.write_text(new, encoding="utf-8")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
