"""iterative: ranking = pick order, plain ranking when units do not interact, budgets, restore."""

from __future__ import annotations

import math

import pytest
import torch

from tl_transplant import ModelPair
from tl_transplant.arch.units import Head, KVHead, parse_unit
from tl_transplant.scoring import RawScores, Scorer, Scores, ScoringError, register, score
from tl_transplant.tasks.task import Task
from tl_transplant.testing import perturbed_copy, snapshot_side, tiny_model, word_tokenizer


def make_task(n: int = 5) -> Task:
    prompts = [" ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(2 + i % 4)) for i in range(n)]
    answers = [" ".join(f"w{(i * 5 + j) % 90}" for j in range(1 + i % 2)) for i in range(n)]
    return Task("t", prompts, answers, metric="answer_logprob")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("iter_tok"))


@pytest.fixture(scope="module")
def pair(tok) -> ModelPair:
    tgt = tiny_model("llama", seed=0)
    return ModelPair.load((perturbed_copy(tgt, scale=0.05, seed=1), tok), (tgt, tok))


def ranking(s) -> list[str]:
    return [str(u) for u in s.top(len(s))]


def assert_same(snap: dict[str, torch.Tensor], pair: ModelPair) -> None:
    now = snapshot_side(pair.target)
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k
    assert not pair.active


@register
class _Flaky(Scorer):
    """Test scorer: weight_diff-like scores (data-free) that raise in the given round."""

    name = "_iterative_test_flaky"
    needs_data = False
    fail_in_round = 2
    calls = 0
    active_when_failing = 0

    def run(self, units, data):
        type(self).calls += 1
        if type(self).calls == self.fail_in_round:
            type(self).active_when_failing = len(self.ctx.pair.active)
            raise RuntimeError("boom in round 2")
        return RawScores(torch.arange(len(units), dtype=torch.float64))


def test_non_interacting_units_give_the_plain_ranking(pair):
    """weight_diff of a unit does not change when other units are transplanted (their slices
    are disjoint), so re-scoring keeps the order: the iterative ranking is the plain one."""
    units = pair.units(("head", "neuron"))
    snap = snapshot_side(pair.target)
    plain = score(pair, None, "weight_diff", units, progress=False)
    it = score(pair, None, "iterative", units, progress=False, inner="weight_diff", chunk=7)
    assert_same(snap, pair)
    assert ranking(it) == ranking(plain)
    info = it.meta["iterative"]
    assert info["n_rounds"] == math.ceil(len(units) / 7) and info["stop"] == "all units picked"
    assert it.meta["budget_rule"] == "score"
    assert sorted(it.values.tolist()) == list(range(1, len(units) + 1))
    # score_at_pick: the picked unit's weight_diff (unchanged by the earlier rounds' edits).
    torch.testing.assert_close(it.columns["score_at_pick"], plain.values, rtol=0, atol=0)
    first = [str(u) for u in plain.top(7)]
    assert it.meta["rounds"][0]["picked"] == first
    assert all(it.columns["round"][it.units.index(parse_unit(u))] == 1 for u in first)


def test_one_round_is_the_inner_ranking_and_later_rounds_see_the_edit(pair):
    task = make_task()
    units = pair.units("head") + [parse_unit(u) for u in ("L0.N3", "L1.N7", "L1.N29")]
    plain = score(pair, task, "attribution", units, progress=False)
    snap = snapshot_side(pair.target)
    once = score(pair, task, "iterative", units, progress=False, chunk=len(units))
    assert ranking(once) == ranking(plain)
    torch.testing.assert_close(once.columns["last_score"], plain.values)
    it = score(pair, task, "iterative", units, progress=False, chunk=2)
    assert_same(snap, pair)
    assert ranking(it)[:2] == ranking(plain)[:2]
    later = [i for i, r in enumerate(it.columns["round"].tolist()) if r >= 2]
    assert later
    # Re-scored against the edited target: the scores at pick differ from the plain ones.
    diff = (it.columns["score_at_pick"][later] - plain.values[later]).abs()
    assert float(diff.max()) > 1e-3
    again = score(pair, task, "iterative", units, progress=False, chunk=2)
    assert torch.equal(again.values, it.values)  # deterministic
    assert torch.equal(again.columns["score_at_pick"], it.columns["score_at_pick"])


def test_k_and_budget_stop_the_loop(pair, tmp_path):
    units = pair.units(("head", "neuron"))
    block = sum(pair.layout.n_params(u) for u in pair.units("linear"))
    it = score(pair, None, "iterative", units, progress=False, inner="weight_diff", k=5, chunk=2)
    info = it.meta["iterative"]
    assert info["n_picked"] == 5 and info["stop"] == "k units picked" and info["n_rounds"] == 3
    assert int((~it.columns["round"].isnan()).sum()) == 5
    assert info["block_params"] == block
    plain = score(pair, None, "weight_diff", units, progress=False)
    assert ranking(it) == ranking(plain)  # unpicked units follow by their last score
    b = score(pair, None, "iterative", units, progress=False, inner="weight_diff",
              budget=0.05, chunk=3)
    info = b.meta["iterative"]
    picked = [u for u, r in zip(b.units, b.columns["round"].tolist()) if not math.isnan(r)]
    groups = {pair.layout.kv_group_of(u) for u in picked if isinstance(u, Head)}
    moved = sum(pair.layout.n_params(u) for u in picked) + sum(
        pair.layout.n_params(g) for g in groups)
    assert info["params_used"] == moved <= 0.05 * block
    assert info["stop"] == "budget spent"
    back = Scores.load(b.save(tmp_path / "it.json"))  # NaN columns, nested meta
    assert ranking(back) == ranking(b) and back.meta["rounds"] == b.meta["rounds"]
    assert torch.equal(back.columns["round"].isnan(), b.columns["round"].isnan())
    # Nothing left would still fit.
    left = [u for u in units if u not in picked]
    assert all(moved + pair.layout.n_params(u)
               + (pair.layout.n_params(pair.layout.kv_group_of(u))
                  if isinstance(u, Head) and pair.layout.kv_group_of(u) not in groups else 0)
               > 0.05 * block for u in left)
    # kv="none" does not pay for KV groups: here a head (512 weights, its group 512 more)
    # now fits the budget of 768 and, having the largest weight_diff, is picked first.
    bn = score(pair, None, "iterative", units, progress=False, inner="weight_diff",
               budget=0.05, chunk=3, kv="none")
    picked_n = [u for u, r in zip(bn.units, bn.columns["round"].tolist()) if not math.isnan(r)]
    assert isinstance(bn.top(1)[0], Head) and not any(isinstance(u, Head) for u in picked)
    assert bn.meta["iterative"]["params_used"] == sum(pair.layout.n_params(u) for u in picked_n)


def test_kv_group_moved_along_is_ranked_after_its_head(pair):
    units = pair.units(("head", "kv_head"))
    it = score(pair, None, "iterative", units, progress=False, inner="weight_diff", chunk=1)
    top = it.top(len(it))
    first_head = next(i for i, u in enumerate(top) if isinstance(u, Head))
    g = pair.layout.kv_group_of(top[first_head])
    if not any(u == g for u in top[:first_head]):  # not picked on its own before the head
        assert top[first_head + 1] == g
        assert math.isnan(it.columns["score_at_pick"][it.units.index(g)])
    along = [u for u in it.units
             if isinstance(u, KVHead) and math.isnan(it.columns["score_at_pick"][it.units.index(u)])]
    assert along  # some group came along with its head (here L0.KV1 after L0.H3)
    assert all(not math.isnan(it.columns["round"][it.units.index(u)]) for u in along)
    assert sum(isinstance(u, KVHead) for u in top) == pair.layout.dims.KV * 2


def test_as_activation_patch_candidate_ranker(pair):
    """Built from the registry without score() (as activation_patch's candidates rule does)."""
    task = make_task(3)
    s = score(pair, task, "activation_patch", "head", progress=False,
              candidates={"method": "iterative", "top": 3,
                          "options": {"inner": "weight_diff", "chunk": 2}})
    wd = score(pair, None, "weight_diff", "head", progress=False)
    assert {u for u in s.units if not math.isnan(s[u])} == set(wd.top(3))


def test_target_is_restored_after_an_error(pair):
    snap = snapshot_side(pair.target)
    _Flaky.calls = 0
    with pytest.raises(RuntimeError, match="boom in round 2"):
        score(pair, None, "iterative", "head", progress=False, inner=_Flaky.name, chunk=2)
    assert _Flaky.calls == 2 and _Flaky.active_when_failing == 1  # round 1's edit was on
    assert_same(snap, pair)


@pytest.mark.parametrize("opts,match", [
    ({"inner": "no_such_method"}, r"iterative: inner='no_such_method': unknown scoring method"),
    ({"inner": "iterative"}, r"would nest the loop"),
    ({"inner": "attribution", "inner_options": {"alpha": 2.0}},
     r"attribution does not take option\(s\) 'alpha'"),
    ({"chunk": 2, "chunk_fraction": 0.5}, r"chunk or chunk_fraction, not both"),
    ({"budget": 1.5}, r"budget must be"),
    ({"k": 0}, r"k must be"),
])
def test_bad_options_are_named(pair, opts, match):
    with pytest.raises(ScoringError, match=match):
        score(pair, make_task(2), "iterative", "head", progress=False, **opts)


def test_inner_needs_are_checked(pair):
    with pytest.raises(ScoringError, match="iterative: attribution needs answers"):
        score(pair, ["w1 w2"], "iterative", "head", progress=False)
    with pytest.raises(ScoringError, match="iterative: attribution needs data"):
        score(pair, None, "iterative", "head", progress=False)
    # contrast= is refused before any round runs (iterative declares needs_data=False, its
    # inner method deciding; score() takes that as "not data-based").
    with pytest.raises(ScoringError, match="contrast= needs a data-based method"):
        score(pair, make_task(2), "iterative", "head", progress=False, contrast=make_task(2))
