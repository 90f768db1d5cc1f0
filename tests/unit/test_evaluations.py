"""The evaluation registry: one object per evaluation, read by the run engine and the reports."""

from __future__ import annotations

import pytest

from harness.evaluations import EVALUATIONS, MetricSpec, preflight, resolve_options
from harness.report.metrics import metric_columns, resolve_metric


def test_built_in_evaluations_register_in_paper_column_order() -> None:
    assert EVALUATIONS.names()[:6] == ["wikitext2", "ptb", "c4", "zeroshot", "embed-fidelity", "efficiency"]
    columns = ["efficiency.decode.speedup", "embed-fidelity.mean_cos", "zeroshot.average", "zeroshot.tasks.copa.value",
               "zeroshot.tasks.piqa.value", "zeroshot.tasks.piqa.acc", "c4.ppl", "wikitext2.ppl", "wikitext2.protocol",
               "wikitext2.nonfinite_windows", "oldset.ppl"]
    assert metric_columns(columns) == [
        "wikitext2.ppl", "c4.ppl", "oldset.ppl", "zeroshot.tasks.piqa.value", "zeroshot.tasks.copa.value",
        "zeroshot.average", "embed-fidelity.mean_cos", "efficiency.decode.speedup",
    ]
    assert "zeroshot.tasks.piqa.acc" in metric_columns(columns, include_task_variants=True)


def test_metric_direction_and_label_come_from_the_owning_evaluation() -> None:
    assert resolve_metric("wt2") == EVALUATIONS.get("wikitext2").metrics[0]
    assert not resolve_metric("wikitext2").higher_is_better
    assert resolve_metric("piqa").higher_is_better and resolve_metric("piqa").label == "PIQA"
    assert resolve_metric("embed").key == "embed-fidelity.mean_cos"
    spec = resolve_metric("wikitext2.nonfinite_windows")  # shown only when asked for
    assert spec.kind == "count" and not spec.higher_is_better and not spec.in_tables


def test_a_metric_must_belong_to_its_evaluation() -> None:
    from harness.evaluations import Evaluation

    with pytest.raises(ValueError, match="must start with 'toy.'"):
        Evaluation("toy", lambda m, t, s: {}, metrics=(MetricSpec("other.x", "x", True, "score"),))


def test_options_are_checked_against_the_declaration() -> None:
    assert resolve_options(["wikitext2"], {}) == {"wikitext2": {}}
    with pytest.raises(ValueError, match="has no option 'n'"):
        resolve_options(["wikitext2"], {"wikitext2": {"n": 1}})
    with pytest.raises(ValueError, match="does not evaluate"):
        resolve_options(["wikitext2"], {"zeroshot": {"n": 1}})


def test_causal_only_evaluations_are_refused_for_encoders() -> None:
    with pytest.raises(ValueError, match="needs a causal LM"):
        preflight(["wikitext2"], encoder=True)
    assert not EVALUATIONS.get("embed-fidelity").needs_causal_lm
    assert EVALUATIONS.get("wikitext2").streamable and not EVALUATIONS.get("zeroshot").streamable


def test_embed_fidelity_text_set_is_an_option_named_in_the_protocol_id() -> None:
    from harness.evaluations.embedding import protocol_of

    assert protocol_of({}).protocol_id == "embed-fidelity@wikitext2-test-paragraphs-512x128"
    resolved = resolve_options(["embed-fidelity"], {"embed-fidelity": {"n_texts": 128}})["embed-fidelity"]
    assert protocol_of(resolved).protocol_id == "embed-fidelity@wikitext2-test-paragraphs-128x128"
    for bad in (0, -3, "many", 2.5):
        with pytest.raises(ValueError, match="embed-fidelity.n_texts must be a positive integer"):
            preflight(["embed-fidelity"], encoder=True, options={"embed-fidelity": {"n_texts": bad}})


def test_chance_average_of_the_offline_task_set() -> None:
    from harness.evaluations.zeroshot_tasks import TASK_SETS, chance_average

    assert chance_average(TASK_SETS["offline-default"]) == pytest.approx((3 * 0.5 + 2 * 0.25) / 5)
    assert chance_average(["piqa", "arc_easy"]) is None  # ARC's number of choices varies
    assert chance_average([]) is None
