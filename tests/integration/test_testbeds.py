"""Tests of the testbed-model recipe (harness.testbeds.trained, harness.testbeds.tokenizer)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.testbeds import trained as rm
from harness.testbeds.diagnostics import mean_token_nll
from harness.testbeds.tokenizer import (
    DATA_ENV,
    TRAINING_FILES,
    data_checksums,
    load_training_text,
    train_testbed_tokenizer,
    validation_windows,
)

FAMILIES = ("llama", "opt")


@pytest.fixture()
def fake_data_dir(tmp_path: Path) -> Path:
    """A miniature data pack: the two training files filled with seeded pseudo-text."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(150)] + ["the", "of", "and", ".", ","]
    for rel in TRAINING_FILES:
        lines = (" ".join(rng.choices(words, k=12)) for _ in range(800))
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("\n".join(lines) + "\n")
    return tmp_path


def _micro_spec() -> rm.TestbedSpec:
    return replace(
        rm.TESTBED_SPECS["tiny-llama"], name="micro-llama", hidden_size=32, num_layers=2, intermediate_size=64,
        max_positions=32, vocab_size=512, steps=6, batch_size=4, warmup_steps=2, eval_every=3,
    )  # fmt: skip


def test_cache_key_changes_with_seed_spec_and_data() -> None:
    spec = rm.TESTBED_SPECS["tiny-llama"]
    sums = {"a.txt": "0" * 64}
    key = rm.testbed_cache_key(spec, 0, sums)
    assert key == rm.testbed_cache_key(spec, 0, dict(sums))
    assert key != rm.testbed_cache_key(spec, 1, sums)
    assert key != rm.testbed_cache_key(replace(spec, steps=spec.steps + 1), 0, sums)
    assert key != rm.testbed_cache_key(spec, 0, {"a.txt": "1" * 64})


def test_specs_build_all_families() -> None:
    for name, spec in rm.TESTBED_SPECS.items():
        assert spec.name == name
        config = rm.build_model(replace(spec, num_layers=1)).config
        assert config.max_position_embeddings == spec.max_positions
        assert config.vocab_size == spec.vocab_size
    assert rm.TESTBED_SPECS["tiny-llama"].max_positions == 256
    assert rm.build_model(rm.TESTBED_SPECS["tiny-llama"]).config.num_key_value_heads == 4


def test_missing_data_dir_names_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        rm.ensure_testbed_model("tiny-llama", cache_dir=tmp_path)
    with pytest.raises(KeyError):
        rm.ensure_testbed_model("no-such-model", data_dir=tmp_path, cache_dir=tmp_path)


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(rm.CACHE_ENV, str(tmp_path))
    assert rm.default_cache_dir() == tmp_path / "testbeds"
    monkeypatch.delenv(rm.CACHE_ENV)
    assert rm.default_cache_dir() == Path.home() / ".cache" / "svdbench" / "testbeds"


def test_interrupted_training_leaves_no_model(
    monkeypatch: pytest.MonkeyPatch, fake_data_dir: Path, tmp_path: Path
) -> None:
    def killed(spec: rm.TestbedSpec, out_dir: Path, *args: object, **kwargs: object) -> dict:
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(rm, "train_testbed_model", killed)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        rm.ensure_testbed_model("tiny-llama", data_dir=fake_data_dir, cache_dir=cache)
    # Nothing that looks like a model is left; only the (empty) lock file of the trainer.
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_training_is_bitwise_deterministic(fake_data_dir: Path, tmp_path: Path) -> None:
    spec = _micro_spec()
    cards = [rm.train_testbed_model(spec, tmp_path / str(i), fake_data_dir, seed=0) for i in range(2)]
    assert cards[0]["best_val_loss"] == cards[1]["best_val_loss"]
    first, second = (AutoModelForCausalLM.from_pretrained(tmp_path / str(i)).state_dict() for i in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = rm.train_testbed_model(spec, tmp_path / "seed1", fake_data_dir, seed=1)
    assert other["best_val_loss"] != cards[0]["best_val_loss"]


@pytest.mark.integration
def test_tokenizer_training_is_deterministic(tiny_model_dirs: dict[str, Path]) -> None:
    train_text, _ = load_training_text()
    first, second = (train_testbed_tokenizer(train_text) for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    for path in tiny_model_dirs.values():
        assert AutoTokenizer.from_pretrained(path).get_vocab() == first.get_vocab()


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_bos_handling(tiny_model_dirs: dict[str, Path], family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    ids = tokenizer("abc").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids
    assert tokenizer("abc", add_special_tokens=False).input_ids == ids[1:]
    assert all(row[0] == tokenizer.bos_token_id for row in tokenizer(["a b", "c"]).input_ids)
    assert tokenizer.pad_token_id is not None and len(tokenizer) == model.config.vocab_size
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.backend_tokenizer.truncation is None  # nothing left over from training
    assert tokenizer.unk_token_id is None  # byte-level: any character encodes
    assert (
        tokenizer.decode(tokenizer("Ünïcode ✓ 日本").input_ids, skip_special_tokens=True) == "Ünïcode ✓ 日本"
    )


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_validation_loss_far_below_uniform(tiny_model_dirs: dict[str, Path], family: str) -> None:
    path = tiny_model_dirs[family]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, val_text = load_training_text()
    loss = mean_token_nll(
        model, validation_windows(tokenizer, val_text, model.config.max_position_embeddings)
    )
    assert loss < 0.7 * math.log(model.config.vocab_size)
    card = json.loads((path / rm.CARD_NAME).read_text())
    assert loss == pytest.approx(card["best_val_loss"], rel=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_card(tiny_model_dirs: dict[str, Path], family: str) -> None:
    path = tiny_model_dirs[family]
    card = json.loads((path / rm.CARD_NAME).read_text())
    assert card["name"] == f"tiny-{family}" and card["spec"]["family"] == family
    assert card["data_checksums"] == data_checksums()
    assert card["cache_key"].startswith(path.name.rsplit("-", 1)[1])
    assert 0 < card["best_step"] <= card["steps"] and card["train_seconds"] > 0
    report = card["outlier_report"]
    assert [row["block"] for row in report] == list(range(card["spec"]["num_layers"]))
    assert all(row["max_over_median"] >= 1.0 for row in report)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.integration
def test_cache_hit_reuses_directory(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["llama"]
    assert rm.ensure_testbed_model("tiny-llama", cache_dir=path.parent) == path
