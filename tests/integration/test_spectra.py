"""The whitened spectrum dump agrees with compression: svd-llm's per-layer calibration error is
exactly the energy of the dropped whitened singular values (truncation-awareness, end to end)."""

from __future__ import annotations

import json
import math

import pytest

from harness.runs import RunConfig, Session, prepare
from harness.runs.loop import run_cell
from harness.runs.spectra import dump_spectra
from tests.utils import DATA, make_tiny_model_dir

pytestmark = pytest.mark.integration


def test_whitened_tail_energy_equals_svd_llm_layer_error(tmp_path):
    model_dir = make_tiny_model_dir("llama", tmp_path / "m")
    cfg = RunConfig(model=str(model_dir), methods=("svd-llm",), ratios=(0.4,), evals=(),
                    calib=f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", calib_samples=8, calib_seqlen=64,
                    results=str(tmp_path / "r"))
    session = Session(prepare(cfg))
    spectra = {e["layer"]: e for e in json.loads(dump_spectra(session, tmp_path / "s.json", 0.4).read_text())}
    record = json.loads(run_cell(session, "svd-llm", 0.4).read_text())
    from harness.engine.models import get_module
    from methods._linalg import output_energy

    for layer in record["layers"]:
        entry = spectra[layer["name"]]
        k = entry["rank"]
        assert k == layer["rank"]
        tail = math.sqrt(sum(s * s for s in entry["whitened"][k:]))
        weight = get_module(session.model, layer["name"]).weight.detach().double()
        energy = output_energy(weight, session.statistics().load_all()[layer["name"]].gram)
        assert layer["calib_rel_error"] == pytest.approx(tail / energy, rel=1e-6)
