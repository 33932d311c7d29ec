"""The embedded pairs: real capability gaps from training alone, and a retrain that reproduces one."""

from __future__ import annotations

import json

import pytest

from tl_transplant import evaluate, zoo
from tl_transplant.zoo.train import PRESETS, _WordIds, make_tokenizer, sample_examples, train_pair


@pytest.mark.parametrize("name", zoo.PAIR_NAMES)
def test_shipped_pair_has_a_gap_and_shared_retention(name):
    pair = zoo.load_pair(name)
    tasks = zoo.load_tasks(name)
    cap = tasks["task"].test
    ret = tasks["retention"].test
    src = evaluate(pair.source, cap, progress=False).mean
    tgt = evaluate(pair.target, cap, progress=False).mean
    assert src - tgt >= 0.5, (src, tgt)
    for side in (pair.source, pair.target):
        assert evaluate(side, ret, progress=False).mean >= 0.9
    info = zoo.pair_info(name)
    assert info["pair"] == name and not info["fast"]


def test_dev_and_test_prompts_are_disjoint():
    for name in zoo.PAIR_NAMES:
        for kind, sp in zoo.task_paths(name).items():
            dev = {json.loads(line)["prompt"] for line in sp.dev.read_text().splitlines()}
            test = {json.loads(line)["prompt"] for line in sp.test.read_text().splitlines()}
            assert dev and test and not dev & test, (name, kind)


def test_unknown_pair():
    with pytest.raises(ValueError, match="unknown zoo pair 'gpt5'; available: cross_generation"):
        zoo.load_pair("gpt5")


def test_training_word_ids_equal_the_tokenizer(tmp_path):
    """The training fast path tokenizes exactly as the saved tokenizer does."""
    tok = make_tokenizer(tmp_path / "tok")
    fast = _WordIds(tok)
    for task, chat in [("add", False), ("add", True), ("max", True), ("copy", False)]:
        for p, a in sample_examples(task, 30, seed=7, chat=chat):
            for text in (p, a, p + " zz"):  # an unknown word maps to <unk> in both
                assert fast(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="unknown preset 'tiny'; available: full, fast, smoke"):
        train_pair("cross_generation", tmp_path / "p", tmp_path / "t", preset="tiny")


@pytest.mark.slow
def test_fast_retrain_reproduces_the_gap(tmp_path):
    """Retraining with the same recipe at smoke size gives a newer model that forgot addition."""
    assert PRESETS["smoke"].max_steps < PRESETS["full"].max_steps
    info = train_pair("cross_generation", tmp_path / "p", tmp_path / "t", preset="smoke",
                      log=lambda *_: None)
    assert info["preset"] == "smoke" and info["fast"]
    acc = info["probe_accuracy"]
    assert acc["gen1"]["add"] >= 0.9, acc  # the source learned the skill
    assert acc["gen1"]["add"] - acc["gen2"]["add"] >= 0.4, acc  # the target forgot it
    assert acc["gen2"]["copy"] >= 0.8 and acc["gen2"]["max"] >= 0.8, acc
    assert (tmp_path / "p" / "gen2" / "model.safetensors").exists()


def test_finetune_pair_trains_on_rows_that_dev_and_test_never_see() -> None:
    """smollm2_ft_tens fine-tunes on capability rows disjoint from its dev/test rows."""
    from tl_transplant.zoo import real

    s = real.spec("smollm2_ft_tens")
    assert isinstance(s.recipe, real.FineTune)
    rows = real.training_rows(s, s.recipe.n_train, s.seed + 1000)
    dev, test = real.task_rows(s.capability, s.n_dev, s.n_test, s.seed)
    held = {p for p, _ in (*dev, *test)}
    assert len(rows) == s.recipe.n_train and len({p for p, _ in rows}) == len(rows)
    assert not held & {p for p, _ in rows}
    assert all(a.isdigit() and len(a) == 1 for _, a in rows)
