from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.report.entries import LimitedRecordsError
from harness.report.plots import PLOT_KINDS, _pick_ratio, plot
from harness.report.spectra import load_spectra
from harness.report.store import load_store
from harness.report.style import METHOD_STYLES, OKABE_ITO, method_style

SHA = "deadbeefcafe"


def _check_outputs(paths: list[Path], sweep: str | None = "sweep-7") -> None:
    pdfs = [p for p in paths if p.suffix == ".pdf"]
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pdfs and len(pdfs) == len(pngs)
    for pdf in pdfs:
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF") and len(data) > 1000
        assert b"/FontFile2" in data, "fonts must be embedded as TrueType (pdf.fonttype 42)"
        assert b"/Type3" not in data
        assert f"git_sha={SHA}".encode() in data
        if sweep:
            assert f"sweep_id={sweep}".encode() in data
    for png in pngs:
        with Image.open(png) as im:
            assert im.text["git_sha"] == SHA
            assert round(im.info["dpi"][0]) == 300
            assert im.width > 300


@pytest.mark.parametrize("kind", ["ppl-vs-ratio", "zeroshot-vs-ratio", "rank-allocation"])
def test_plots_write_pdf_and_png(kind: str, clean_store_dir: Path, tmp_path: Path) -> None:
    paths = plot(clean_store_dir, kind, tmp_path / "figs", git_sha=SHA, sweep_id="sweep-7")
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    assert all(p.exists() for p in paths)
    _check_outputs(paths)


def test_ppl_plot_is_paper_column_wide(clean_store_dir: Path, tmp_path: Path) -> None:
    (_, png) = plot(clean_store_dir, "ppl-vs-ratio", tmp_path, metric="ptb", git_sha=SHA)
    assert png.name == "ppl-vs-ratio_ptb_toy-llama.png"
    with Image.open(png) as im:
        assert 2.8 <= im.width / 300 <= 3.4  # ~3.25 in at 300 dpi (tight bbox trims a little)


def test_rank_allocation_ratio_choice(clean_store_dir: Path, tmp_path: Path) -> None:
    # 0.4 has the most methods with per-layer data, so it is the default.
    assert _pick_ratio(load_store(clean_store_dir)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no per-layer data"):
        plot(clean_store_dir, "rank-allocation", tmp_path, ratio=0.9, git_sha=SHA)


def test_spectra_from_json_and_npz(spectra_file: Path, tmp_path: Path) -> None:
    paths = plot(None, "spectra", tmp_path / "figs", spectra=spectra_file, git_sha=SHA)
    _check_outputs(paths, sweep=None)
    npz = tmp_path / "spectra.npz"
    np.savez(npz, **{"plain:model.layers.0.mlp.up_proj": np.linspace(5, 1, 16),
                     "whitened:model.layers.0.mlp.up_proj": np.geomspace(50, 0.01, 16),
                     "rank:model.layers.0.mlp.up_proj": np.array(4)})  # fmt: skip
    (entry,) = load_spectra(npz)
    assert entry["rank"] == 4 and entry["whitened"][0] == pytest.approx(50)
    assert entry["plain"][0] == pytest.approx(5) and len(entry["plain"]) == 16


def test_plots_refuse_limited_records(store_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LimitedRecordsError):
        plot(store_dir, "ppl-vs-ratio", tmp_path, git_sha=SHA)
    assert len(plot(load_store(store_dir), "ppl-vs-ratio", tmp_path, git_sha=SHA, allow_limited=True)) == 2


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown plot kind"):
        plot(None, "histogram", "/tmp/x")
    assert "spectra" in PLOT_KINDS


def test_method_styles_are_fixed_and_deterministic() -> None:
    assert method_style("svd-llm") == METHOD_STYLES["svd-llm"]
    assert method_style("svd-llm").color == OKABE_ITO["sky_blue"]
    # Nine methods, seven non-black Okabe-Ito colours: every shipped method has its own colour and marker pair,
    # and its label is the reports' display name.
    pairs = [(s.color, s.marker) for m, s in METHOD_STYLES.items() if m != "dense"]
    assert len(set(pairs)) == len(pairs) and len({marker for _, marker in pairs}) == len(pairs)
    assert METHOD_STYLES["dense"].label == "Original" and METHOD_STYLES["svd-llm-v2"].label == "SVD-LLM V2"
    unknown = method_style("my-new-method")
    assert unknown == method_style("my-new-method") and unknown.label == "my-new-method"
    variant = method_style("svd-llm+adacomp")
    assert variant.color == METHOD_STYLES["svd-llm"].color and variant.linestyle != "-"
    assert variant.label == "SVD-LLM+adacomp"


def test_git_sha_of_this_checkout() -> None:
    from harness.report.style import git_sha

    sha = git_sha()
    assert sha == "unknown" or len(sha.removesuffix("-dirty")) == 40


def test_narrow_log_axis_labels_sit_at_their_ticks():
    """Perplexities within a few percent of each other: every tick label is the tick's value."""
    import matplotlib.pyplot as plt

    from harness.report.plots import _plain_number, _readable_log_y

    assert _plain_number(202.5) == "202.5" and _plain_number(200.0) == "200" and _plain_number(20000.0) == "20,000"
    fig, ax = plt.subplots()
    ax.plot([0.2, 0.8], [198.9, 218.4])
    ax.set_yscale("log")
    _readable_log_y(ax)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert len(ticks) >= 3
    for tick, label in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True):
        if lo <= tick <= hi:
            assert float(label.get_text().replace(",", "")) == pytest.approx(tick)
    plt.close(fig)


def test_projection_panels_follow_architecture_order():
    from harness.report.plots import _kind_rank

    kinds = ["mlp.down_proj", "self_attn.v_proj", "mlp.gate_proj", "self_attn.q_proj", "mlp.up_proj",
             "self_attn.o_proj", "self_attn.k_proj", "custom.thing"]
    assert sorted(kinds, key=_kind_rank) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                            "custom.thing"]


def test_zeroshot_figure_has_dense_chance_and_footnoted_labels(tmp_path: Path) -> None:
    from report_fixtures import make_record

    from harness.report.metrics import resolve_metric
    from harness.report.plots import CHANCE_STYLE, _metric_vs_ratio
    from harness.report.store import records_to_frame

    method = "asvd[asvd-sensitivity.n_sequences=1,asvd-sensitivity.step=0.2]"
    recs = [make_record("dense", 0.0)]
    recs += [make_record(m, r, s) for m in ("svd-llm", method) for r in (0.2, 0.4) for s in (0, 1)]
    frame = records_to_frame(recs)
    fig = _metric_vs_ratio(frame, "toy-llama", resolve_metric("average"), "acc", log_y=False, chance=0.3)
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert list(lines["Chance"].get_ydata()) == pytest.approx([30.0, 30.0])
    assert lines["Chance"].get_linestyle() == ":" and CHANCE_STYLE["linestyle"] == ":"
    assert list(lines["Original"].get_ydata())[0] == pytest.approx(100 * sum([0.442, 0.7626, 0.4625, 0.6993, 0.76, 0.7916]) / 6)
    assert "ASVD¹" in lines and "SVD-LLM" in lines  # the table's display names and footnote marks
    assert lines["ASVD¹"].get_color() == method_style("asvd").color  # the method's colour, another line style
    assert lines["ASVD¹"].get_linestyle() != method_style("asvd").linestyle
    (_, png) = plot(frame, "zeroshot-vs-ratio", tmp_path, git_sha=SHA, chance=0.3)
    assert png.name == "zeroshot-vs-ratio_average_toy-llama.png"
    with Image.open(png) as im:
        assert im.text["chance"] == "0.3" and im.text["protocol"] == "zeroshot@lm-eval-0.4.13"
        assert im.text["methods"] == f"¹ {method}"
    with pytest.raises(ValueError, match="fraction in"):
        plot(frame, "zeroshot-vs-ratio", tmp_path, git_sha=SHA, chance=30)
    with pytest.raises(ValueError, match="needs an accuracy figure"):
        plot(frame, "ppl-vs-ratio", tmp_path, git_sha=SHA, chance=0.3)
