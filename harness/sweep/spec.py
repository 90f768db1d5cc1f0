"""Sweep specs: one YAML file (models x methods x ratios x seeds, evaluations, calibration) parsed
strictly into frozen dataclasses.

The file holds one top-level ``sweep`` mapping (an example: ``benchmarks/reference_leaderboard.yaml``).
Parsing is strict in the lingua/OmegaConf sense: an unknown key, a value of the wrong type, a ratio
outside (0, 1) or an unregistered method is an error whose message names the key path
(``sweep.grid.ratios[2]``) and, where one is close, the intended name. ``${ENV}`` in any string is
replaced by the environment variable (an unset one is an error).

Command-line overrides are dotted ``key=value`` items applied to the raw YAML before validation, so
they are checked exactly like the file: ``ratios=[0.2,0.4]``, ``calibration.samples=32``,
``submitit.cluster=local``. Keys are relative to ``sweep``; the grid keys (``models``, ``methods``,
``ratios``, ``seeds``) may omit their ``grid.`` prefix. Values are YAML (``[a,b]``, ``32``, ``null``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.sweep.strict import (
    SpecError,
    build,
    convert,
    expand_env,
    expect_list,
    parse_with,
    unique,
    unknown,
)

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationSpec",
    "EvalSpec",
    "GridSpec",
    "ModelEntry",
    "SpecError",
    "SubmititSpec",
    "SweepSpec",
    "apply_overrides",
    "load_spec",
    "parse_spec",
]

EXECUTORS = ("inprocess", "local-gpus", "submitit")


# -- field parsers (hooked in through ``field(metadata={"parse": ...})``) -----------------------------


def _parse_models(value: Any, path: str) -> tuple[ModelEntry, ...]:
    items = expect_list(value, path)
    if not items:
        raise SpecError(f"empty list at {path}; name at least one model")
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if isinstance(item, str):
            item = {"id": item}
        if isinstance(item, Mapping) and "reference" in item:
            # The key's old name, kept for one release: "reference" also meant dense references and
            # the shipped leaderboards.
            log.warning("model at %s: 'reference' is deprecated, write 'testbed: %s'", where, item["reference"])
            item = {("testbed" if k == "reference" else k): v for k, v in item.items()}
        entry = build(ModelEntry, item, where)
        if (entry.id is None) == (entry.testbed is None):
            raise SpecError(f"model at {where} needs exactly one of 'id' or 'testbed'")
        out.append(entry)
    return unique(out, path, lambda m: m.label)


def _method_string(item: Any, where: str) -> str:
    """A method entry: a method string, or ``{name: BASE[+COMP...], options: {stage.option: value}}``."""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        raise SpecError(f"expected a method string or a mapping at {where}, got {type(item).__name__}")
    for key in item:
        if key not in ("name", "options"):
            raise unknown("key", str(key), where, ("name", "options"))
    if not isinstance(item.get("name"), str):
        raise SpecError(f"missing key 'name' at {where}")
    options = item.get("options") or {}
    if not isinstance(options, Mapping):
        raise SpecError(f"expected a mapping at {where}.options, got {type(options).__name__}")
    if not options:
        return item["name"]
    # The method grammar parses option values as JSON, falling back to bare strings.
    rendered = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()]
    return f"{item['name']}[{','.join(rendered)}]"


def _parse_methods(value: Any, path: str) -> tuple[str, ...]:
    from methods import METHODS, parse_method

    items = expect_list(value, path)
    if not items:
        raise SpecError(f"empty list at {path}; name at least one method")
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        text = _method_string(item, where)
        base = re.split(r"[+\[]", text.strip(), maxsplit=1)[0]
        if base not in METHODS:
            # The registry is the single source of truth: methods landing later need no change here.
            raise unknown("method", base, where, METHODS.names())
        try:
            out.append(parse_method(text).name)
        except (ValueError, KeyError) as exc:
            raise SpecError(f"invalid method {text!r} at {where}: {exc}") from exc
    return unique(out, path, str)


def _parse_ratios(value: Any, path: str) -> tuple[float, ...]:
    ratios = convert(value, tuple[float, ...], path)
    if not ratios:
        raise SpecError(f"empty list at {path}; give at least one ratio")
    for i, r in enumerate(ratios):
        if not 0.0 < r < 1.0:
            raise SpecError(f"bad ratio {r} at {path}[{i}]: must lie in (0, 1) (the fraction of parameters removed)")
    return unique(list(ratios), path, str)


def _parse_seeds(value: Any, path: str) -> tuple[int, ...]:
    seeds = convert(value, tuple[int, ...], path)
    if not seeds:
        raise SpecError(f"empty list at {path}; give at least one seed")
    return unique(list(seeds), path, str)


def _parse_evals(value: Any, path: str) -> tuple[str, ...]:
    from harness.evaluations import EVALUATIONS

    names = convert(value, tuple[str, ...], path)
    if not names:
        raise SpecError(f"empty list at {path}; give at least one evaluation")
    for i, name in enumerate(names):
        if name not in EVALUATIONS:
            raise unknown("evaluation", name, f"{path}[{i}]", EVALUATIONS.names())
    return unique(list(names), path, str)


def _parse_eval_options(value: Any, path: str) -> tuple:
    """``{evaluation: {option: value}}`` (checked against the registry when the run is prepared)."""
    from harness.runs.config import freeze_eval_options

    if value is None:
        return ()
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise SpecError(f"expected a mapping of evaluation -> {{option: value}} at {path}, got {value!r}")
    return freeze_eval_options(value)


def _positive(value: Any, path: str) -> int | None:
    out = convert(value, int | None, path)
    if out is not None and out < 1:
        raise SpecError(f"bad value {out} at {path}: must be a positive integer")
    return out


def _one_of(choices: Sequence[str], optional: bool = False) -> Callable[[Any, str], str | None]:
    def parse(value: Any, path: str) -> str | None:
        if optional and value is None:
            return None
        text = convert(value, str, path)
        if text not in choices:
            raise unknown("value", text, path, choices)
        return text

    return parse


# -- the schema --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model: ``id`` (hub id, local directory or alias) or ``testbed`` (a model svdbench trains
    itself, :mod:`harness.testbeds.trained`; the old key ``reference`` is accepted with a warning).
    """

    id: str | None = None
    testbed: str | None = None

    @property
    def label(self) -> str:
        return self.testbed if self.testbed is not None else str(self.id)

    def resolve(self, build: bool = True) -> str:
        """The model id or directory to load (trains a testbed model first if needed).

        Args:
            build: With False (dry runs), never train: an untrained testbed model is an error.

        Raises:
            SpecError: when ``build`` is False and the testbed model is not trained yet.
        """
        if self.testbed is None:
            return str(self.id)
        try:  # imported only when a testbed entry is used (and looked up so that tests can replace it)
            trained = importlib.import_module("harness.testbeds.trained")
        except ImportError as exc:
            raise SpecError(f"model {{testbed: {self.testbed}}} needs harness.testbeds.trained, which this build lacks") from exc
        if build:
            return str(trained.ensure_testbed_model(self.testbed))
        path = trained.testbed_model_path(self.testbed)
        if not trained.is_trained(path):
            raise SpecError(
                f"testbed model {self.testbed!r} is not trained yet, and the cells' run keys hash its "
                f"weights; a dry run does not train it (the sweep itself, or `python -m "
                f"harness.testbeds.trained --name {self.testbed}`, does)"
            )
        return str(path)


@dataclass(frozen=True)
class GridSpec:
    """The cross product that makes the cells: every model x method x ratio x seed."""

    models: tuple[ModelEntry, ...] = field(metadata=parse_with(_parse_models))
    methods: tuple[str, ...] = field(metadata=parse_with(_parse_methods))
    ratios: tuple[float, ...] = field(metadata=parse_with(_parse_ratios))
    seeds: tuple[int, ...] = field(default=(0,), metadata=parse_with(_parse_seeds))


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data: ``source`` is ``wikitext2`` or ``file:PATH``; ``seqlen`` None = model default."""

    source: str = "wikitext2"
    samples: int = field(default=256, metadata=parse_with(_positive))
    seqlen: int | None = field(default=None, metadata=parse_with(_positive))


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation settings shared by every cell (the ``svdbench run`` flags of the same names)."""

    seqlen: int | None = field(default=None, metadata=parse_with(_positive))
    batch_size: int = field(default=8, metadata=parse_with(_positive))
    max_windows: int | None = field(default=None, metadata=parse_with(_positive))
    window_stride: int | None = field(default=None, metadata=parse_with(_positive))
    limit: int | None = field(default=None, metadata=parse_with(_positive))
    tasks: tuple[str, ...] | None = None
    offload: str = "auto"
    # Options of registered evaluations, ``{evaluation: {option: value}}`` (``--eval-option``).
    options: tuple = field(default=(), metadata=parse_with(_parse_eval_options))


def _parse_sbatch(value: Any, path: str) -> tuple[tuple[str, str | bool], ...]:
    """Extra ``#SBATCH`` options: option name -> value (``{account: proj, qos: high}``); ``true``
    writes a bare flag (``exclusive: true`` -> ``--exclusive``), ``false`` leaves the option out."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise SpecError(f"expected a mapping of sbatch options at {path}, got {value!r}")
    out: list[tuple[str, str | bool]] = []
    for key, item in value.items():
        if item is False:
            continue
        if item is not True and not isinstance(item, (str, int, float)):
            raise SpecError(f"expected a string, number or true at {path}.{key}, got {item!r}")
        out.append((str(key), True if item is True else str(item)))
    return tuple(out)


@dataclass(frozen=True)
class SubmititSpec:
    """Settings of the ``submitit`` executor (SLURM job array, or local processes).

    ``cluster``: None lets submitit pick (SLURM when ``srun`` exists, else local); ``slurm``,
    ``local`` or ``debug`` force one. ``folder`` (logs and pickles; on SLURM it must be shared by
    the nodes) defaults to ``<results>/.submitit/%j``. ``unit``: one array task per ``cell`` (the
    resource requests below are per cell), or per ``group`` (the cells sharing a model,
    calibration and seed: one model load and one statistics pass, cells in sequence).
    ``gpus_per_node: 0`` requests no GPU. ``sbatch``: extra ``#SBATCH`` options
    (``{account: proj, qos: high, constraint: a100, exclusive: true}``).
    """

    cluster: str | None = field(default=None, metadata=parse_with(_one_of(("slurm", "local", "debug"), optional=True)))
    folder: str | None = None
    unit: str = field(default="cell", metadata=parse_with(_one_of(("cell", "group"))))
    timeout_min: int = field(default=240, metadata=parse_with(_positive))
    gpus_per_node: int = 1
    cpus_per_task: int = field(default=8, metadata=parse_with(_positive))
    mem_gb: float | None = None
    partition: str | None = None
    array_parallelism: int = field(default=16, metadata=parse_with(_positive))
    sbatch: tuple[tuple[str, str | bool], ...] = field(default=(), metadata=parse_with(_parse_sbatch))


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep; see the module docstring and ``benchmarks/reference_leaderboard.yaml``."""

    grid: GridSpec
    name: str = "sweep"
    results: str = "results"
    evals: tuple[str, ...] = field(default=("wikitext2",), metadata=parse_with(_parse_evals))
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    device: str = "auto"
    dtype: str = field(default="auto", metadata=parse_with(_one_of(("auto", "float16", "bfloat16", "float32"))))
    executor: str = field(default="inprocess", metadata=parse_with(_one_of(EXECUTORS)))
    # Top-k SVD routine of the factorizers (``svdbench run --svd-driver``); None: the device default.
    svd_driver: str | None = field(default=None, metadata=parse_with(_one_of(("svd", "gram-eigh"), optional=True)))
    # A store of compressed cells (``svdbench run --compressed-store``): cells compressed once, evaluated
    # from there by later sweeps; None: no store. Does not enter run keys.
    compressed_store: str | None = None
    compressed_store_max_gb: float | None = None
    submitit: SubmititSpec = field(default_factory=SubmititSpec)

    @property
    def n_cells(self) -> int:
        g = self.grid
        return len(g.models) * len(g.methods) * len(g.ratios) * len(g.seeds)


# -- overrides and entry points ----------------------------------------------------------------------

_GRID_KEYS = {f.name for f in dataclasses.fields(GridSpec)}
_SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepSpec)}


def _override_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        # Method strings with options (``[svd-llm+adacomp[adacomp.iters=5]]``) are not valid YAML.
        if key.endswith("methods") and text.startswith("[") and text.endswith("]"):
            from methods import split_method_list

            return split_method_list(text[1:-1])
        raise SpecError(f"cannot parse the value of override {key}={text!r} as YAML") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw YAML mapping with dotted ``key=value`` overrides applied (module docstring).

    Raises:
        SpecError: for an item without ``=`` or one that descends into a non-mapping value.
    """
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise SpecError(f"override {item!r} must look like key=value, e.g. ratios=[0.2,0.4]")
        if parts[0] == "sweep":
            parts = parts[1:]
        if not parts:
            raise SpecError(f"override {item!r} must name a key below sweep")
        if parts[0] in _GRID_KEYS:
            parts = ["grid", *parts]
        elif parts[0] not in _SWEEP_KEYS:
            # Suggest among the grid shorthands too: ``ratioz=...`` most likely meant ``ratios``.
            raise unknown("key", parts[0], "sweep", sorted(_SWEEP_KEYS | _GRID_KEYS))
        if out.get("sweep") is None:
            out["sweep"] = {}
        node = out["sweep"]
        for part in parts[:-1]:
            if not isinstance(node, dict):
                break
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise SpecError(f"override {item!r}: sweep.{'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = _override_value(key, text.strip())
    return out


def parse_spec(raw: Any, overrides: Sequence[str] = (), default_name: str = "sweep") -> SweepSpec:
    """Validate a raw YAML mapping (``{"sweep": {...}}``) plus overrides into a :class:`SweepSpec`.

    Raises:
        SpecError: with the key path, for anything invalid (module docstring).
    """
    if not isinstance(raw, Mapping):
        raise SpecError(f"a sweep spec is a mapping with one top-level key 'sweep', got {raw!r}")
    merged = apply_overrides(raw, overrides)
    for key in merged:
        if key != "sweep":
            raise unknown("key", str(key), "top level", ("sweep",))
    if "sweep" not in merged:
        raise SpecError("missing key 'sweep' at top level")
    body = expand_env(merged["sweep"], "sweep")
    if isinstance(body, Mapping) and "name" not in body:
        body = {**body, "name": default_name}
    return build(SweepSpec, body, "sweep")


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and validate the YAML sweep spec at ``path`` (its file stem is the default name).

    Raises:
        FileNotFoundError: when the file is missing.
        SpecError: for invalid YAML or an invalid spec.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {exc}") from exc
    return parse_spec(raw or {}, overrides, default_name=path.stem)
