"""The embedded pairs: real capability gaps from training alone, and a retrain that reproduces one."""

from __future__ import annotations

import json

import pytest

from tl_transplant import evaluate, zoo
from tl_transplant.zoo.train import PRESETS, _WordIds, make_tokenizer, sample_examples, train_pair


@pytest.mark.parametrize("name", zoo.PAIR_NAMES)
def test_shipped_pair_has_a_gap_and_shared_retention(name):
    """No training here: the shipped weights are fixed and only evaluated, so only a near-tie
    logit could flip between CPUs. Test-split numbers were equal to 4 decimals on every kernel
    and thread count measured (see the table below): cross_generation gap 0.977 - 0.247 = 0.73
    (margin 0.23), retention 0.975 / 0.995 (margin 0.075); base_instruct gap 0.941 - 0.071 =
    0.87 (margin 0.37), retention 0.970 / 0.960 (margin 0.06).
    """
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


# Training dynamics differ across CPUs: the float path of a short run depends on the kernels
# (MKL/oneDNN AVX-512 vs AVX2 vs the default kernels), so thresholds below are properties that
# held on every setting measured, with a margin, not the figures of one machine. Measured
# (AMD EPYC, torch 2.13.0+cpu; ATEN_CPU_CAPABILITY=default / avx2 / unset = avx512, each with
# OMP_NUM_THREADS=1 and 2; the smoke preset pins torch to one thread, so 1 and 2 gave equal
# numbers) for the smoke retrain of cross_generation with seed 0, the test's:
#
#   probe accuracy      default  avx2  avx512 | seeds 1-3 x 3 kernels | assert   margin
#   gen1 add            0.56     0.98  0.65   | 0.71 .. 1.00          | >= 0.40  0.16
#   gen1 add - gen2 add 0.28     0.73  0.39   | 0.43 .. 0.78          | >= 0.15  0.13
#   gen2 add            0.28     0.25  0.26   | 0.20 .. 0.29          | <= 0.35  0.06 (*)
#   gen2 max            0.99     1.00  0.99   | 0.98 .. 1.00          | >= 0.80  0.18
#   gen2 copy           0.92     0.98  0.92   | 0.91 .. 1.00          | >= 0.80  0.11
#   gen2 steps (of 1200) 500     700   800    | 600 .. 850            | < 1200   350 steps
#
# (*) gen2 stops at the first probe with add <= 0.30 and max, copy >= 0.90 (its stop rule), so
# the bound on gen2 is the recipe's own, reached well before the step cap everywhere. gen1 is
# the fragile side: at 1200 smoke steps (lr 3e-3) it is sometimes mid-way through learning
# addition (default kernels: 0.32, 0.39, 0.44, 0.56 at steps 900..1200) or just after a loss
# spike (avx512: 0.95 at step 1100, 0.65 at 1200), hence "well above chance (1/13)", not 0.9.
SMOKE_MIN_SOURCE_ADD = 0.40
SMOKE_MIN_GAP = 0.15
SMOKE_MAX_TARGET_ADD = 0.35
SMOKE_MIN_RETENTION = 0.80


@pytest.mark.slow
def test_fast_retrain_reproduces_the_gap(tmp_path):
    """Retraining with the same recipe at smoke size gives a newer model that forgot addition.

    Asserts what held on every CPU kernel and thread count measured (table above): the
    source learned addition well above chance, the target stopped by its forgetting rule
    and is below the source by a margin, and the target kept list-max and copying.
    """
    smoke = PRESETS["smoke"]
    assert smoke.max_steps < PRESETS["full"].max_steps
    info = train_pair("cross_generation", tmp_path / "p", tmp_path / "t", preset="smoke",
                      log=lambda *_: None)
    assert info["preset"] == "smoke" and info["fast"]
    acc = info["probe_accuracy"]
    gen1, gen2 = acc["gen1"], acc["gen2"]
    assert gen1["add"] >= SMOKE_MIN_SOURCE_ADD, acc  # the source learned the skill
    assert gen1["add"] - gen2["add"] >= SMOKE_MIN_GAP, acc  # the target forgot it
    assert gen2["add"] <= SMOKE_MAX_TARGET_ADD, acc
    assert gen2["steps"] < smoke.max_steps, acc  # stopped by its rule, not by the step cap
    assert min(gen2["copy"], gen2["max"]) >= SMOKE_MIN_RETENTION, acc  # retention holds
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


def test_real_specs_are_valid_and_listed_everywhere() -> None:
    """Every real pair names known tasks and domains, and the CLI offers exactly these pairs."""
    from tl_transplant import cli
    from tl_transplant.zoo import real

    assert tuple(real.REAL_PAIRS) == zoo.REAL_PAIR_NAMES == cli.REAL_PAIRS
    for name, s in real.REAL_PAIRS.items():
        assert s.name == name and s.capability not in s.retention
        for task in (s.capability, *s.retention):
            assert task in real.TASK_GENERATORS, (name, task)
        if isinstance(s.recipe, real.ContinuedTraining):
            assert s.recipe.domain in real.DOMAINS
            assert s.recipe.steps > 0 and s.recipe.batch > 0 and s.recipe.seq_len > 1


@pytest.mark.parametrize("name", list(zoo.REAL_PAIR_NAMES))
def test_real_tasks_are_deterministic_and_dev_test_disjoint(name: str) -> None:
    from tl_transplant.zoo import real

    s = real.spec(name)
    for i, task in enumerate((s.capability, *s.retention)):
        dev, test = real.task_rows(task, s.n_dev, s.n_test, s.seed + i)
        assert (dev, test) == real.task_rows(task, s.n_dev, s.n_test, s.seed + i)
        assert len(dev) == s.n_dev and len(test) == s.n_test, task
        prompts = [p for p, _ in dev + test]
        assert len(set(prompts)) == len(prompts), f"{task}: repeated prompt"


def _times_fact(prompt: str) -> frozenset[int]:
    a, b = prompt.splitlines()[-1].split(" = ")[0].split(" * ")
    return frozenset((int(a), int(b)))


def test_times_and_aisles_share_no_item_between_dev_and_test() -> None:
    """Times tables: no unordered fact (7 * 12 vs 12 * 7) on both sides, none of the shots'.
    Aisles: no query SKU on both sides, and the query's department is never among the shots
    (its aisle is not in the prompt, so only the learned convention answers it)."""
    from tl_transplant.zoo import domain, real

    dev, test = real.task_rows("times", 40, 40, 0)
    dev_f, test_f = {_times_fact(p) for p, _ in dev}, {_times_fact(p) for p, _ in test}
    assert len(dev_f) == 40 and len(test_f) == 40 and not dev_f & test_f
    assert not (dev_f | test_f) & {frozenset(f) for f in real.TIMES_SHOTS}
    for p, a in dev + test:
        x, y = p.splitlines()[-1].split(" = ")[0].split(" * ")
        assert a == str(int(x) * int(y))[0], (p, a)
    dev_a, test_a = domain.aisle_rows(40, 40, 1)
    sku = [p.splitlines()[-1].split(" |")[0] for p, _ in dev_a + test_a]
    assert len(set(sku)) == 80
    for p, a in dev_a + test_a:
        *shots, query = p.splitlines()
        dept = query.split("dept: ")[1].split(" |")[0]
        assert a == f" {domain.AISLE[dept]}" and query.endswith("aisle:")
        assert all(f"dept: {dept} " not in s for s in shots), p
        assert all(s.endswith(domain.AISLE[s.split("dept: ")[1].split(" |")[0]]) for s in shots)


N_CATALOG_RECORDS = 5000  # checked records of the training text


def test_continued_training_text_shares_nothing_with_dev_and_test() -> None:
    """The catalog text the target is trained on never contains a dev/test item: held-out
    adjectives and SKUs, nor a times-table query, nor a general task's query line. Training
    records draw from disjoint lists by construction; checked here over 5000 records, more
    than the recipe consumes (tests/real/test_real_pair.py counts them with the tokenizer)."""
    from itertools import islice

    from tl_transplant.zoo import domain, real

    s = real.spec("smollm2_ct_catalog")
    assert isinstance(s.recipe, real.ContinuedTraining)
    assert not set(domain.TRAIN_ADJECTIVES) & set(domain.HELD_OUT_ADJECTIVES)
    assert domain.TRAIN_SKUS[1] < domain.EVAL_SKUS[0]
    text = "".join(islice(domain.records(s.recipe.seed), N_CATALOG_RECORDS))
    assert text == "".join(islice(domain.records(s.recipe.seed), N_CATALOG_RECORDS))  # seeded
    words = set(text.replace('"', " ").replace("(", " ").replace(")", " ").split())
    assert not words & set(domain.HELD_OUT_ADJECTIVES)
    assert " * " not in text and " = " not in text
    rows = {task: real.task_rows(task, s.n_dev, s.n_test, s.seed + i)
            for i, task in enumerate((s.capability, *s.retention))}
    for p, _ in (*rows["aisles"][0], *rows["aisles"][1]):
        for line in p.splitlines():
            assert line.split(" |")[0] not in text  # "SKU 12345" of every shot and query
    for task in ("antonyms", "capitals"):
        for p, _ in (*rows[task][0], *rows[task][1]):
            assert p.splitlines()[-1] not in text


def test_a_continued_training_build_is_refused_when_it_misses_its_gap() -> None:
    """The build-time dev check (training differs across CPUs, so it runs where the pair is
    built): a regression below the margin, or a domain not learned, refuses the build."""
    from tl_transplant.zoo.checks import CT_MIN_GAP, ZooBuildError, check_continued

    ok = check_continued({"times": 0.85, "aisles": 0.0}, {"times": 0.425, "aisles": 1.0},
                         "times", "aisles")
    assert ok["gap"] == pytest.approx(0.425) and ok["thresholds"]["min_gap"] == CT_MIN_GAP
    with pytest.raises(ZooBuildError, match="capability fell by 0.100"):
        check_continued({"times": 0.85, "aisles": 0.0}, {"times": 0.75, "aisles": 1.0},
                        "times", "aisles")
    with pytest.raises(ZooBuildError, match="reaches 0.500 on aisles"):
        check_continued({"times": 0.85, "aisles": 0.0}, {"times": 0.4, "aisles": 0.5},
                        "times", "aisles")
    with pytest.raises(ZooBuildError, match="source already reaches"):
        check_continued({"times": 0.85, "aisles": 0.9}, {"times": 0.4, "aisles": 1.0},
                        "times", "aisles")
