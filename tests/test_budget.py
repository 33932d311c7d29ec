"""Parameter budgets: distinct-weight counting, the two fill rules, never over budget, monotone."""

from __future__ import annotations

import random

import pytest
import torch

from tl_transplant.arch.units import Head, KVHead, Neuron
from tl_transplant.edit.budget import (
    ParamCounter,
    block_params,
    budget_cap,
    check_fraction,
    count_params,
    fill_budget,
    selection_size,
)
from tl_transplant.edit.edits import plan_transplant
from tl_transplant.edit.weights import WeightMask, WeightMaskError, unit_mask
from tl_transplant.scoring.scores import Scores
from tl_transplant.scoring.weight_scores import WeightScores
from tl_transplant.sweeps.protocol import RankedUnits


@pytest.fixture(scope="module")
def pair(engineered_pair):
    return engineered_pair[0]


def test_block_params_and_distinct_counts_match_plan(pair):
    lay = pair.layout
    names = lay.unit_tensors()
    assert block_params(lay) == sum(pair.target.params[n].numel() for n in names)
    units = pair.units(None)
    rng = random.Random(0)
    for _ in range(60):
        us = rng.sample(units, rng.randint(1, 10))
        for kv in ("group", "none"):
            assert count_params(lay, us, kv) == plan_transplant(pair, us, kv).n_params
    # Overlaps count once: a head inside its whole q/o linears adds only the linears' rest.
    h = Head(0, 1)
    c = ParamCounter(lay, kv="none")
    c.add(h)
    assert c.cost(h) == 0 and c.cost("L0.attn.q_proj") == lay.n_params("L0.attn.q_proj") - (
        lay.n_params(h) - lay.dims.dh * lay.dims.D
    )


def _scores(pair, values, meta=None):
    units = pair.units(("head", "neuron"))
    return Scores(units, values, method="t", meta=meta or {})


def test_budget_never_exceeded_and_monotone(pair):
    units = pair.units(("head", "neuron"))
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(len(units), generator=g, dtype=torch.float64)
    total = block_params(pair.layout)
    for rule in ("per_param", "score"):
        s = _scores(pair, vals, {"budget_rule": rule})
        assert s.budget_rule == rule
        prev = -1
        for f in [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]:
            pick = s.budget_pick(f, pair.layout)
            assert pick.n_params <= f * total and pick.n_params >= prev
            if pick.units:
                assert pick.n_params == plan_transplant(pair, pick.units).n_params
            assert pick.units == s.within_budget(f, pair.layout)
            prev = pick.n_params
        if rule == "per_param":  # only positive scores are ever bought
            assert all(s[u] > 0 for u in s.within_budget(1.0, pair.layout))
            n_pos = int((vals > 0).sum())
            assert len(s.within_budget(1.0, pair.layout)) == n_pos
        else:  # the score rule walks the whole ranking: at 100% every unit fits
            assert len(s.within_budget(1.0, pair.layout)) == len(units)


def test_rules_differ_heads_vs_neurons_and_kv_counts(pair):
    lay = pair.layout
    units = pair.units(("head", "neuron"))
    # Heads score 2, neurons 1: per weight a neuron (96) beats a head (512 + its KV group).
    vals = [2.0 if isinstance(u, Head) else 1.0 for u in units]
    head_cost = lay.n_params(Head(0, 0)) + lay.n_params(KVHead(0, 0))
    frac = head_cost / block_params(lay)
    per = _scores(pair, vals).within_budget(frac, lay)
    assert per and all(isinstance(u, Neuron) for u in per)
    assert len(per) == head_cost // lay.n_params(Neuron(0, 0))
    by_score = _scores(pair, vals, {"budget_rule": "score"}).within_budget(frac, lay)
    assert by_score == [Head(0, 0)]  # walks the ranking: the top head fills the budget
    # The KV group counts: one weight short of head + group, the head does not fit
    short = (head_cost - 1) / block_params(lay)
    assert Head(0, 0) not in _scores(pair, vals, {"budget_rule": "score"}).within_budget(short, lay)
    # ... but without KV groups it does.
    assert Head(0, 0) in _scores(pair, vals, {"budget_rule": "score"}).within_budget(
        short, lay, kv="none"
    )
    # The second head of the same KV group costs only its own q rows and o columns.
    c = ParamCounter(lay)
    assert c.add(Head(0, 0)) == head_cost and c.cost(Head(0, 1)) == lay.n_params(Head(0, 1))


def test_skips_what_does_not_fit_and_plain_rankings_use_score_rule(pair):
    lay = pair.layout
    ranked = ["L0.mlp.down_proj", "L0.N1", "L1.N2"]
    f = 2 * lay.n_params(Neuron(0, 1)) / block_params(lay)
    pick = fill_budget(ranked, lay, f, rule="score")
    assert [str(u) for u in pick.units] == ["L0.N1", "L1.N2"] and pick.rule == "score"
    assert [str(u) for u in RankedUnits(ranked).within_budget(f, lay)] == ["L0.N1", "L1.N2"]
    assert RankedUnits(ranked).within_budget(f, lay, kinds="linear") == []
    with pytest.raises(ValueError, match="needs the scores"):
        fill_budget(ranked, lay, f)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_fractions_are_refused(pair, bad):
    with pytest.raises(ValueError, match=r"fraction of the block parameters in \(0, 1\]"):
        check_fraction(bad)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        _scores(pair, torch.ones(len(pair.units(("head", "neuron"))))).within_budget(
            bad, pair.layout
        )


def test_unknown_rule_is_refused(pair):
    s = _scores(pair, torch.ones(len(pair.units(("head", "neuron")))), {"budget_rule": "magic"})
    with pytest.raises(ValueError, match="budget_rule must be one of per_param, score"):
        s.within_budget(0.1, pair.layout)


def _reference_fill(order, lay, cap, kv):
    """The rule with no shortcuts: try every unit, in order, with its exact marginal cost."""
    c = ParamCounter(lay, kv)
    for u in order:
        if c.n_params + c.cost(u) <= cap:
            c.add(u)
    return c.units


def test_fill_matches_the_plain_rule_on_mixed_kinds(pair):
    lay = pair.layout
    units = pair.units(None)  # heads, KV groups, neurons and whole linears
    total = block_params(lay)
    rng = random.Random(3)
    for trial in range(20):
        order = rng.sample(units, len(units))
        kinds = rng.choice([None, ("head", "neuron"), ("head", "kv_head")])
        if kinds is not None:
            order = [u for u in order if u.kind in kinds]
        f = rng.choice([0.01, 0.05, 0.1, 0.3])
        kv = rng.choice(["group", "none"])
        got = fill_budget(order, lay, f, rule="score", kv=kv)
        assert got.units == _reference_fill(order, lay, int(f * total), kv), (trial, f, kv)
        assert got.n_params == count_params(lay, got.units, kv) <= f * total


def test_weight_masks_count_their_weights(pair):
    """A mask costs its weights, on the same denominator and cap as units."""
    lay = pair.layout
    total = block_params(lay)
    units = ["L0.H1", "L1.N3"]
    mask = unit_mask(lay, units)  # the weights those units (and L0.H1's KV group) cover
    assert count_params(lay, mask) == mask.n_params == count_params(lay, units)
    assert plan_transplant(pair, mask).n_params == mask.n_params
    assert selection_size(lay, mask) == (mask.n_params, mask.n_params / total)
    assert selection_size(lay, units, kv="none") == (
        lay.n_params(Head(0, 1)) + lay.n_params(Neuron(1, 3)),
        (lay.n_params(Head(0, 1)) + lay.n_params(Neuron(1, 3))) / total,
    )
    g = torch.Generator().manual_seed(2)
    ws = WeightScores({n: torch.rand(lay.shapes[n], generator=g) + 0.1
                       for n in lay.unit_tensors()}, method="t")
    for f in (0.001, 0.01, 0.3, 1.0):
        cap = budget_cap(lay, f)
        assert cap == fill_budget(pair.units("neuron"), lay, f, rule="score").budget_params
        assert ws.budget_mask(f, lay).n_params == cap  # every score > 0: the cap is filled
    foreign = WeightMask({"model.embed_tokens.weight": [0]},
                         {"model.embed_tokens.weight": pair.target.params[
                             "model.embed_tokens.weight"].shape})
    with pytest.raises(WeightMaskError, match="not a block linear"):
        count_params(lay, foreign)
