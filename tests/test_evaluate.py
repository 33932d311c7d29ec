"""Evaluation: metrics on hand-made logits, batching, generation, interventions, CIs, retention."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import numpy as np
import pytest
import torch

from tl_transplant import ModelPair, ModelSide, transplant
from tl_transplant.evaluation.evaluator import (
    EvalResult,
    evaluate,
    evaluate_transplant,
    retention,
    transplant_metrics,
)
from tl_transplant.evaluation.stats import UndefinedMetricWarning, bootstrap_means, recovery, tir
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.task import Task
from tl_transplant.testing import same_state, snapshot_side, tiny_model, word_tokenizer

V = 96  # vocab of the tiny models / word tokenizer (4 specials + w0..w91)
TRUE_UNITS = ["L1.mlp.down_proj", "L1.attn.o_proj"]  # the units where source != target


class ShiftModel(torch.nn.Module):
    """Hand-made logits: ``scale`` on token ``id + shift`` at every position, 0 elsewhere."""

    def __init__(self, shift: int, scale: float = 5.0) -> None:
        super().__init__()
        self.shift, self.scale = shift, scale
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids.clone())
        return self.scale * torch.nn.functional.one_hot((ids + self.shift) % V, V).float()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def _labels(side: ModelSide, prompts: list[str], next_ids) -> list[str]:
    """The side's argmax word after each ``<bos> prompt``."""
    out = next_ids(side, prompts)
    return [side.tokenizer.convert_ids_to_tokens(i) if i >= 4 else "" for i in out]


def engineered(pair: ModelPair, next_ids, n: int = 40):
    """Tasks on the shared pair (equal except TRUE_UNITS): one the source solves, one the target."""
    rng = np.random.default_rng(0)
    pool = [
        " ".join(f"w{i}" for i in rng.integers(0, 92, size=int(rng.integers(2, 7))))
        for _ in range(3 * n)
    ]
    ls, lt = _labels(pair.source, pool, next_ids), _labels(pair.target, pool, next_ids)
    keep = [i for i in range(len(pool)) if ls[i] and lt[i]][: 2 * n]
    src = Task(
        "src", [pool[i] for i in keep[:n]], [" " + ls[i] for i in keep[:n]], prepend_bos=True
    )
    ctl = Task(
        "ctl", [pool[i] for i in keep[n:]], [" " + lt[i] for i in keep[n:]], prepend_bos=True
    )
    return pair, src, ctl


@pytest.fixture(scope="module")
def eng(engineered_pair, next_ids):
    return engineered(engineered_pair[0], next_ids)


_snapshot = snapshot_side
_same = same_state


# ---- metrics on hand-made logits ----------------------------------------------------------


def test_logit_metrics_on_hand_made_logits(tok):
    t = builtin_task("successor", n=12, seed=0)
    lse = math.log(math.exp(5.0) + V - 1)
    right, wrong = ShiftModel(1), ShiftModel(0)  # predicts the successor / repeats the input

    def ev(model, metric, task=t):
        return evaluate(
            model, task.replace(metric=metric), tokenizer=tok, progress=False, batch_size=5
        )

    assert ev(right, "next_token_acc").scores.tolist() == [1.0] * 12
    assert ev(wrong, "next_token_acc").mean == 0.0
    np.testing.assert_allclose(ev(right, "answer_logprob").scores, 5.0 - lse, rtol=1e-6)
    np.testing.assert_allclose(ev(wrong, "answer_logprob").scores, -lse, rtol=1e-6)
    # wrong answer = the last prompt word: the repeat model prefers it by exactly 5.
    np.testing.assert_allclose(ev(right, "logit_diff").scores, 5.0)
    np.testing.assert_allclose(ev(wrong, "logit_diff").scores, -5.0)
    # Two-token answers: the teacher-forced sum counts both answer positions.
    t2 = builtin_task("successor", n=6, n_answer=2)
    np.testing.assert_allclose(ev(right, "answer_logprob", t2).scores, 2 * (5.0 - lse), rtol=1e-6)


def test_padding_and_bos_rule(tok):
    # Prompts of different lengths in one batch; right padding must not change any score.
    prompts = ["w1", "w1 w2 w3 w4 w5", "w7 w8", "w3 w4 w5"]
    answers = [" w2", " w6", " w1", " w6 w7"]  # the third is wrong
    t = Task("mixed", prompts, answers, metric="answer_logprob")
    m = ShiftModel(1)
    lse = math.log(math.exp(5.0) + V - 1)
    for bos in (True, False):
        r = evaluate(m, t, tokenizer=tok, prepend_bos=bos, batch_size=4, progress=False)
        assert r.prepend_bos is bos
        np.testing.assert_allclose(
            r.scores, [(5 - lse), (5 - lse), (-lse), 2 * (5 - lse)], rtol=1e-6
        )
        first = m.seen[-1][:, 0]
        assert bool((first == tok.bos_token_id).all()) is bos
    # "auto" on a bare model follows the tokenizer (which adds no BOS); the task can force it.
    assert evaluate(m, t, tokenizer=tok, progress=False).prepend_bos is False
    assert evaluate(m, t.replace(prepend_bos=True), tokenizer=tok, progress=False).prepend_bos


def test_logit_diff_rejects_shared_first_token(tok):
    t = Task("t", ["w1"], [" w2 w3"], metric="logit_diff", wrong_answers=[[" w2 w4"]])
    with pytest.raises(ValueError, match="example 0: wrong answer ' w2 w4' starts with the same"):
        evaluate(ShiftModel(1), t, tokenizer=tok, progress=False)


# ---- real tiny models ----------------------------------------------------------------------


def test_batched_logit_metrics_equal_unbatched(eng):
    pair, src, _ = eng
    for metric in ("answer_logprob", "logit_diff", "next_token_acc"):
        t = builtin_task("induction", n=15, metric=metric, length=5, repeat=2, n_answer=2)
        t = t.subset(range(15)).replace(
            prompts=[p if i % 3 else p + " w0" for i, p in enumerate(t.prompts)]
        )  # mixed lengths
        a = evaluate(pair.target, t, batch_size=1, progress=False)
        b = evaluate(pair.target, t, batch_size=7, progress=False)
        c = evaluate(pair.target, t, batch_size=7, progress=False, forward="hf")
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(b.scores, c.scores, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_generation_equals_one_by_one(tok, family):
    side = ModelSide.from_hf(tiny_model(family, seed=3), tok, name=family)
    rng = np.random.default_rng(1)
    prompts = [
        " ".join(f"w{i}" for i in rng.integers(0, 92, size=n)) for n in [1, 5, 3, 8, 2, 5, 7, 3, 1]
    ]
    t = Task("gen", prompts, [" w0"] * len(prompts), metric="exact_match", max_new_tokens=6)
    probe = evaluate(side, t, batch_size=len(prompts), progress=False)  # generations only
    # Make half the answers right, so the scores themselves are not all zero.
    answers = [g if i % 2 and g.strip() else " w0" for i, g in enumerate(probe.generations or [])]
    t = t.replace(answers=answers)
    one = evaluate(side, t, batch_size=1, progress=False)
    left = evaluate(side, t, batch_size=4, progress=False)
    grouped = evaluate(side, t, batch_size=4, progress=False, generation="by_length")
    assert one.generations == left.generations == grouped.generations
    assert one.scores.tolist() == left.scores.tolist() == grouped.scores.tolist()
    assert 0 < one.mean < 1
    assert left.meta["generation"] == "left_pad" and left.meta["max_new_tokens"] == 6


def test_exact_match_agrees_with_next_token_acc_on_single_token_task(eng):
    pair, src, _ = eng
    em = src.replace(metric="exact_match", max_new_tokens=1)
    for side in (pair.source, pair.target):
        a = evaluate(side, src, progress=False, batch_size=8)
        b = evaluate(side, em, progress=False, batch_size=8)
        assert a.scores.tolist() == b.scores.tolist()
    assert evaluate(pair.source, src, progress=False).mean == 1.0
    assert 0.0 < evaluate(pair.target, em, progress=False).mean < 0.6


def test_intervention_context_and_factory(eng):
    pair, src, _ = eng
    before = _snapshot(pair.target)
    src_scores = evaluate(pair.source, src, progress=False).scores
    # A transplant is a context manager: entered around the forwards it makes target == source.
    x = evaluate(pair.target, src, progress=False, intervention=transplant(pair, TRUE_UNITS, 1.0))
    assert x.scores.tolist() == src_scores.tolist()
    assert _same(before, _snapshot(pair.target))

    calls: list[torch.Tensor] = []

    @contextlib.contextmanager
    def per_batch(ids):
        calls.append(ids)
        yield

    evaluate(pair.target, src, progress=False, batch_size=16, intervention=per_batch)
    assert len(calls) == math.ceil(len(src) / 16) and calls[0].shape[0] == 16
    gen = src.replace(metric="exact_match", max_new_tokens=1)
    calls.clear()
    evaluate(pair.target, gen, progress=False, batch_size=32, intervention=per_batch)
    assert len(calls) == 2


def test_evaluate_inputs_and_progress(eng, capsys):
    pair, src, _ = eng
    with pytest.raises(ValueError, match="side='source' or side='target'"):
        evaluate(pair, src)
    r = evaluate(pair, src, side="source", progress=True)
    assert r.mean == 1.0 and r.model == pair.source.name and r.prepend_bos is True
    assert "src" in capsys.readouterr().err  # tqdm bar
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(pair.target, src, batch_size=0)
    with pytest.raises(TypeError, match="evaluate"):
        evaluate(object(), src)
    d = r.to_dict()
    assert d["n"] == len(src) and len(d["scores"]) == len(src)


# ---- transplant metrics -----------------------------------------------------------------


def test_transplant_metrics_hand_checked():
    t, x, s = [0, 1, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]
    m = transplant_metrics(np.array(t), np.array(x), np.array(s), n_boot=500, seed=0)
    assert (m.target, m.transplanted, m.source) == (0.25, 0.75, 1.0)
    assert m.delta == 0.5 and m.tir == 3.0 and m.recovery == pytest.approx(2 / 3)
    assert tir(0.6, 0.3) == pytest.approx(2.0)
    assert recovery(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery(0.9, 0.2, 0.1) == pytest.approx(-7.0)  # source worse: sign says so
    # TIR is for accuracies only
    lp = transplant_metrics(
        np.array([-2.0, -1.0]),
        np.array([-1.0, -1.0]),
        np.array([0.0, 0.0]),
        metric="answer_logprob",
        n_boot=100,
    )
    assert lp.tir is None and lp.recovery == pytest.approx(0.5 / 1.5)


def test_recovery_undefined_on_zero_gap():
    t = np.array([1.0, 0, 1, 0])
    with pytest.warns(UndefinedMetricWarning, match="recovery undefined"):
        m = transplant_metrics(t, np.array([1.0, 1, 1, 0]), t.copy(), n_boot=200)
    assert m.recovery is None and m.ci["recovery"] is None and m.tir == 1.5
    assert any("recovery undefined" in n for n in m.notes)
    with pytest.warns(UndefinedMetricWarning):
        assert recovery(0.9, 0.5, 0.5 + 1e-9) is None  # never a huge number
    with pytest.warns(UndefinedMetricWarning, match="TIR undefined"):
        z = transplant_metrics(np.zeros(4), np.ones(4), np.ones(4), n_boot=100)
    assert z.tir is None and z.ci["tir"] is None and z.recovery == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recovery(0.9, 0.5, 0.5, warn=False) is None


def test_bootstrap_seeded_contains_point_and_narrows():
    rng = np.random.default_rng(0)
    t = (rng.random(60) < 0.3).astype(float)
    x = np.maximum(t, (rng.random(60) < 0.4).astype(float))
    s = np.maximum(x, (rng.random(60) < 0.5).astype(float))
    a = transplant_metrics(t, x, s, seed=1, n_boot=1000)
    b = transplant_metrics(t, x, s, seed=1, n_boot=1000)
    c = transplant_metrics(t, x, s, seed=2, n_boot=1000)
    assert a.ci == b.ci and a.ci != c.ci
    for k in ("delta", "tir", "recovery"):
        lo, hi = a.ci[k]
        assert lo <= getattr(a, k) <= hi, k
    big = transplant_metrics(np.tile(t, 8), np.tile(x, 8), np.tile(s, 8), seed=1, n_boot=1000)
    for k in ("delta", "tir", "recovery"):
        assert big.ci[k][1] - big.ci[k][0] < 0.6 * (a.ci[k][1] - a.ci[k][0]), k
    # Paired: identical arrays give a zero-width delta CI.
    same = transplant_metrics(t, t.copy(), s, n_boot=200)
    assert same.ci["delta"] == (0.0, 0.0)
    means = bootstrap_means([t, x], n_boot=7, seed=3)
    assert means.shape == (7, 2)
    with pytest.raises(ValueError, match="equal lengths"):
        bootstrap_means([t, x[:5]])
    d = a.to_dict()
    assert d["bootstrap"]["seed"] == 1 and d["bootstrap"]["kind"] == "paired percentile"


def test_retention_drop():
    before = EvalResult("c", "next_token_acc", "m", np.array([1.0, 1, 1, 0]), True)
    after = EvalResult("c", "next_token_acc", "m", np.array([1.0, 0, 1, 0]), True)
    r = retention(before, after, n_boot=300)
    assert (r.before, r.after, r.drop) == (0.75, 0.5, 0.25)
    assert r.relative == pytest.approx(2 / 3)
    assert r.ci_drop is not None and r.ci_drop[0] <= 0.25 <= r.ci_drop[1]
    other = EvalResult("d", "next_token_acc", "m", np.array([1.0]), True)
    with pytest.raises(ValueError, match="same control task"):
        retention(before, other)


def test_evaluate_transplant_end_to_end(eng):
    pair, src, ctl = eng
    before = _snapshot(pair.target)
    rep = evaluate_transplant(
        pair, src, TRUE_UNITS, 1.0, control_tasks=[ctl], n_boot=300, progress=False
    )
    m = rep.metrics
    assert m.source == 1.0 and m.target < 0.6 and m.transplanted == 1.0
    assert m.recovery == 1.0 and m.tir == pytest.approx(1.0 / m.target)
    lo, hi = m.ci["delta"]
    assert 0 < lo <= m.delta <= hi
    (ret,) = rep.retention
    assert ret.task == "ctl" and ret.before == 1.0 and ret.drop > 0.3
    assert rep.prepend_bos is True and rep.units == TRUE_UNITS
    assert _same(before, _snapshot(pair.target))
    half = evaluate_transplant(
        pair,
        src,
        TRUE_UNITS,
        0.5,
        n_boot=100,
        progress=False,
        baselines={"source": rep.source, "target": rep.target},
    )
    assert half.source is rep.source and half.metrics.transplanted <= 1.0
    d = rep.to_dict()
    assert d["metrics"]["recovery"] == 1.0 and d["retention"][0]["task"] == "ctl"


def test_generate_sees_transplanted_weights(eng):
    pair, src, _ = eng
    em = src.replace(metric="exact_match", max_new_tokens=3)
    s = evaluate(pair.source, em, progress=False, batch_size=16)
    t = evaluate(pair.target, em, progress=False, batch_size=16)
    with transplant(pair, TRUE_UNITS, 1.0):
        x = evaluate(pair.target, em, progress=False, batch_size=16)
    assert x.generations == s.generations != t.generations
    assert evaluate(pair.target, em, progress=False).generations == t.generations


def test_every_family_forward_paths_agree(tok, family):
    side = ModelSide.from_hf(tiny_model(family, seed=1), tok, name=family)
    t = builtin_task("induction", n=12, metric="answer_logprob")
    a = evaluate(side, t, progress=False, batch_size=12)
    b = evaluate(side, t, progress=False, batch_size=1, forward="hf")
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert a.prepend_bos is side.prepend_bos
    nt = evaluate(side, t.replace(metric="next_token_acc"), progress=False, batch_size=5)
    em = evaluate(side, t.replace(metric="exact_match"), progress=False, batch_size=5)
    assert nt.scores.tolist() == em.scores.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_multi_token_generation_matches_a_plain_greedy_loop(family, tmp_path):
    """exact_match decodes several tokens exactly as an un-hooked HF model's greedy loop."""

    from tl_transplant import ModelPair, Task, evaluate
    from tl_transplant.testing import tiny_model, word_tokenizer

    tok = word_tokenizer(tmp_path / "tok")
    model = tiny_model(family, seed=21)
    with torch.no_grad():  # sharper, less repetitive outputs so a broken cache would show
        for p in model.parameters():
            p.mul_(6.0)
    plain = copy.deepcopy(model).eval()
    pair = ModelPair.load((model, tok), (tiny_model(family, seed=22), tok))
    prompts = ["w1 w2 w3", "w40 w7", "w9 w9 w12 w30 w31"]
    task = Task("gen", prompts, ["w0"] * 3, metric="exact_match", max_new_tokens=6,
                prepend_bos=True)
    res = evaluate(pair.source, task, progress=False)
    distinct = 0
    for prompt, text in zip(prompts, res.generations):
        ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            for _ in range(6):
                nxt = plain(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
                if int(nxt) == tok.eos_token_id:
                    break
        want = tok.decode(ids[0, -6:] if int(ids[0, -1]) != tok.eos_token_id else ids[0, -6:-1],
                          skip_special_tokens=True)
        assert text.split() == want.split(), (prompt, text, want)
        distinct = max(distinct, len(set(want.split())))
    assert distinct > 1  # the check has teeth: some output is not one repeated token
