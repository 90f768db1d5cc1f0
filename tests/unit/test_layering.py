"""The layering of harness/ is a checked contract (pyproject.toml ``[tool.importlinter]``).

``lint-imports`` checks it in tox's lint environment; this test checks the same contracts in the
test suite with its own reader of import statements (module level and inside functions, plus
``importlib.import_module("...")`` with a literal name), so CI fails when methods/ imports harness/,
an evaluation imports the sweep or report code, or the engine imports a testbed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, package: str) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value


def import_graph() -> dict[str, set[str]]:
    """Module -> the harness / methods modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for path in sorted([*ROOT.glob("harness/**/*.py"), *ROOT.glob("methods/**/*.py")]):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for m in _imported(tree, package) if m.split(".")[0] in ("harness", "methods") and m}
    return graph


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: Mapping[str, set[str]], contracts: list[dict]) -> list[str]:
    """Every import that breaks a ``forbidden`` or ``layers`` contract, as ``importer -> imported (contract)``."""
    found = []
    for contract in contracts:
        if contract["type"] == "forbidden":
            for src, targets in graph.items():
                if any(_within(src, s) for s in contract["source_modules"]):
                    found += [f"{src} -> {t} ({contract['name']})" for t in sorted(targets)
                              if any(_within(t, f) for f in contract["forbidden_modules"])]
        elif contract["type"] == "layers":
            layers = [[p.strip() for p in layer.split("|")] for layer in contract["layers"]]

            def level(module: str, layers: list[list[str]] = layers) -> tuple[int, str] | None:
                for i, layer in enumerate(layers):
                    for pkg in layer:
                        if _within(module, pkg):
                            return i, pkg
                return None

            for src, targets in graph.items():
                mine = level(src)
                for t in sorted(targets):
                    theirs = level(t)
                    if mine is None or theirs is None or mine[1] == theirs[1]:
                        continue
                    # A lower layer (larger index) must not import a higher one, nor a sibling of its own layer.
                    if theirs[0] <= mine[0]:
                        found.append(f"{src} -> {t} ({contract['name']})")
        else:
            raise AssertionError(f"contract type {contract['type']!r} is not read by this test")
    return found


def test_the_code_keeps_its_layering() -> None:
    graph = import_graph()
    assert "harness.runs.loop" in graph and "methods.method" in graph  # the reader found the packages
    assert violations(graph, CONTRACTS) == []


@pytest.mark.parametrize(("importer", "imported"), [
    ("methods.svd_llm", "harness.engine.models"),          # methods/ must stay pure tensor math
    ("harness.evaluations.perplexity", "harness.sweep.plan"),  # an evaluation imports the sweep
    ("harness.evaluations.zeroshot", "harness.report.metrics"),  # ... or the reports
    ("harness.engine.compress", "harness.testbeds.trained"),  # the engine imports a testbed
    ("harness.testbeds.trained", "harness.evaluations.perplexity"),  # siblings of one layer
])
def test_a_broken_contract_is_reported(importer: str, imported: str) -> None:
    graph = import_graph()
    graph[importer] = graph[importer] | {imported}
    assert [v for v in violations(graph, CONTRACTS) if v.startswith(f"{importer} -> {imported} ")]


def test_import_linter_agrees() -> None:
    pytest.importorskip("importlinter", reason="import-linter is in the test extra; not installed here")
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
