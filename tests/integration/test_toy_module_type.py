"""Adding a factorizer with its own module type touches its own file: this test registers a toy factorizer
whose modules are of a toy type, and compresses, measures (efficiency), exports, validates, stores and
reloads a tiny model with it, without any change elsewhere in svdbench.

The toy type, ``ToyFactoredLinear``, holds its two factors as bare parameters (no ``nn.Linear``
child), so nothing but the module-type registry (:mod:`methods.module_types`) can find it: a harness
that still named classes would export nothing, load a dense skeleton, or measure the model as dense.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from harness.engine.compress import compress_model, restore
from harness.engine.models import set_module
from harness.evaluations import efficiency as eff
from harness.export import compression_summary, export_model, load_compressed, read_manifest
from harness.runs import RunConfig, Session, prepare, run
from harness.runs.compressions import CompressionStore
from harness.runs.validate import validate_export
from methods.components import FACTORIZERS, LinearStats
from methods.lowrank import Factorization
from methods.module_types import MODULE_TYPES
from tests.utils import CALIB, make_tiny_model_dir

pytestmark = pytest.mark.integration

METHOD = "svd+toy-factored"
RATIO = 0.5
PATH = "toy-factored"  # the toy type's efficiency label
PROTO = eff.EfficiencyProtocol(batch=1, prefill=16, decode=4, warmup=0, repeats=2)
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


class ToyFactoredLinear(nn.Module):
    """``y = U (V x) + b``: ``u: (out, rank)``, ``v: (rank, in)`` and ``bias: (out,)`` as bare parameters."""

    export_name: ClassVar[str] = "ToyFactoredLinear"
    forward_path: ClassVar[str] = PATH

    def __init__(self, u: Tensor, v: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.u = nn.Parameter(u.clone(), requires_grad=False)
        self.v = nn.Parameter(v.clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def export_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> ToyFactoredLinear:
        m, n, k = int(spec["out_features"]), int(spec["in_features"]), int(spec["rank"])
        return cls(torch.empty(m, k, device=device, dtype=dtype), torch.empty(k, n, device=device, dtype=dtype),
                   torch.empty(m, device=device, dtype=dtype) if spec["bias"] else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)


@dataclass
class ToyFactorization(Factorization):
    """A plain factorisation materialised as :class:`ToyFactoredLinear`."""

    def to_module(self, bias: Tensor | None, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return ToyFactoredLinear(cast(self.a), cast(self.b), None if bias is None else cast(bias.detach()))


@dataclass(frozen=True)
class ToyFactorizer:
    """Truncated SVD of the weight alone, in a module of its own type."""

    name: ClassVar[str] = "toy-factored"

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> ToyFactorization:
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return ToyFactorization(u[:, :rank] * s[:rank], vh[:rank], spectrum=s)


@pytest.fixture(scope="module")
def toy_registered() -> Iterator[None]:
    """The toy factorizer and module type, registered for this module's tests only."""
    MODULE_TYPES.register(ToyFactoredLinear)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FACTORIZERS._items, ToyFactorizer.name, ToyFactorizer)
        try:
            yield
        finally:
            MODULE_TYPES.unregister(ToyFactoredLinear.export_name)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama")


def _toy_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ToyFactoredLinear)}


def test_export_reload_store_and_efficiency_of_a_toy_module_type(toy_registered: None, tiny_llama: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    measured_models: list[nn.Module] = []
    real_measure = eff.measure

    def counting(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        measured_models.append(model)
        return real_measure(model, *args, **kwargs)

    monkeypatch.setattr(eff, "measure", counting)
    cfg = RunConfig(model=str(tiny_llama), methods=(METHOD,), ratios=(RATIO,), evals=(), calib=CALIB,
                    calib_samples=4, calib_seqlen=32, device="cpu", dtype="float32", results=str(tmp_path / "res"))
    prep = prepare(cfg)
    session = Session(prep)
    (method,) = prep.methods
    device = torch.device("cpu")
    cache: dict[str, Any] = {}
    eff.efficiency_reference(session.model, cache, device, PROTO)
    dense = eff.efficiency(session.model, cache, device, PROTO)
    assert set(dense["paths"]) == {"dense"}

    result = compress_model(session.model, session.layout, method, RATIO, session.statistics(),
                            probes=session.probes(method))
    try:
        replaced = _toy_modules(session.model)
        assert len(replaced) == len(result.undo) > 0
        state = {k: t.clone() for k, t in session.model.state_dict().items()}
        with torch.no_grad():
            logits = session.model(input_ids=IDS).logits
        measured = eff.efficiency(session.model, cache, device, PROTO)
        out = export_model(session.model, session.tokenizer, tmp_path / "export",
                           method={"name": method.name, "config": method.config()}, ratio=RATIO,
                           base_model=session.model_info, compression=compression_summary(result))
        store = CompressionStore(tmp_path / "store")
        store.save("toykey", session.model, list(replaced), {"method": method.name}, {})
    finally:
        restore(session.model, result)

    # Efficiency: classified as compressed, measured (not the dense reference), bytes of the toy factors.
    assert measured["paths"] == {PATH: len(replaced)}
    assert len(measured_models) == 2  # the dense reference, then the compressed model itself
    assert measured["weight_bytes"]["targets"] == 4 * result.params_compressed  # float32, no biases in Llama
    assert measured["weight_bytes"]["model"] == 4 * result.params_model_compressed

    # Export: every toy module recorded with its declared spec; the directory validates.
    manifest = read_manifest(out)
    assert set(manifest["modules"]) == set(replaced)
    assert {spec["class"] for spec in manifest["modules"].values()} == {"ToyFactoredLinear"}
    assert manifest["parameters"] == result.params_model_compressed
    assert validate_export(out).ok, validate_export(out).render()

    # Reload from the directory alone: the toy modules again, the same tensors and logits, measured as compressed.
    loaded, _ = load_compressed(out)
    assert set(_toy_modules(loaded)) == set(replaced)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state) and all(torch.equal(loaded_state[k], t) for k, t in state.items())
    with torch.no_grad():
        # Same tensors; the sums may round differently where the loaded factors sit at other memory alignments.
        torch.testing.assert_close(loaded(input_ids=IDS).logits, logits, rtol=0, atol=1e-5)
    assert eff.efficiency(loaded, cache, device, PROTO)["paths"] == {PATH: len(replaced)}
    assert len(measured_models) == 3 and measured_models[-1] is loaded

    # The compression store rebuilds them into the dense model too.
    _, undo = store.install("toykey", session.model)
    try:
        assert set(_toy_modules(session.model)) == set(replaced)
        assert all(torch.equal(session.model.state_dict()[k], t) for k, t in state.items())
        with torch.no_grad():
            torch.testing.assert_close(session.model(input_ids=IDS).logits, logits, rtol=0, atol=1e-5)
    finally:
        for name, module in reversed(undo):
            set_module(session.model, name, module)


def test_a_toy_cell_through_the_runner_is_measured_and_exported(toy_registered: None, tiny_llama: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model=str(tiny_llama), methods=(METHOD,), ratios=(RATIO,), evals=("efficiency",), calib=CALIB,
                    calib_samples=4, calib_seqlen=32, device="cpu", dtype="float32", results=str(tmp_path / "res"),
                    export=str(tmp_path / "exports"))
    records = {r["method"]["name"]: r for r in (json.loads(p.read_text()) for p in run(cfg))}
    cell = records[METHOD]
    m = cell["metrics"]["efficiency"]
    assert m["paths"] == {PATH: len([layer for layer in cell["layers"] if layer["rank"] is not None])}
    assert m["weight_bytes"]["targets"] == 4 * cell["params_compressed"]
    assert m["weight_bytes"]["targets_ratio"] < 1.0
    (export,) = (tmp_path / "exports").iterdir()
    loaded, _ = load_compressed(export)
    assert _toy_modules(loaded) and read_manifest(export)["run_key"] == cell["run_key"]


def test_the_registry_refuses_incomplete_or_clashing_types():
    class NoSpec(nn.Module):
        export_name: ClassVar[str] = "NoSpec"
        forward_path: ClassVar[str] = "x"

    class ClaimsDense(ToyFactoredLinear):
        export_name: ClassVar[str] = "ClaimsDense"
        forward_path: ClassVar[str] = "dense"

    class Clash(ToyFactoredLinear):
        export_name: ClassVar[str] = "LowRankLinear"

    with pytest.raises(TypeError, match="export_spec"):
        MODULE_TYPES.register(NoSpec)
    with pytest.raises(ValueError, match="reserved"):
        MODULE_TYPES.register(ClaimsDense)
    with pytest.raises(ValueError, match="already registered"):
        MODULE_TYPES.register(Clash)
    assert {"LowRankLinear", "ColumnPreservingLowRank", "SharedBasisLinear"} <= set(MODULE_TYPES.names())
