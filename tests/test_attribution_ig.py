"""attribution_ig: reduces to attribution at the target, completeness, single units -> exact patch."""

from __future__ import annotations

import pytest
import torch

from tl_transplant import ModelPair
from tl_transplant.arch.units import Neuron, parse_unit
from tl_transplant.models.hooks import HookRunner, capturer
from tl_transplant.scoring import ScoringError, score
from tl_transplant.scoring.accumulate import UnitTable
from tl_transplant.scoring.attribution_ig import path_points, total_delta
from tl_transplant.scoring.effects import Effects
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import answer_logprobs, encode
from tl_transplant.testing import perturbed_copy, tiny_model, word_tokenizer


def make_task(n: int = 6) -> Task:
    prompts = [" ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(2 + i % 4)) for i in range(n)]
    answers = [" ".join(f"w{(i * 5 + j) % 90}" for j in range(1 + i % 2)) for i in range(n)]
    return Task("t", prompts, answers, metric="answer_logprob")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("ig_tok"))


@pytest.fixture(scope="module")
def pair(tok) -> ModelPair:
    """Tiny llama (GQA 4/2), every tensor nudged: patching is clearly nonlinear, not wildly so."""
    tgt = tiny_model("llama", seed=0)
    return ModelPair.load((perturbed_copy(tgt, scale=0.03, seed=1), tok), (tgt, tok))


MIXED = ["L0.H1", "L1.H2", "L0.KV1", "L1.N7", "L0.N30", "L1.mlp.up_proj", "L0.attn.v_proj"]


def joint_patch_effect(pair: ModelPair, task: Task, units: list) -> float:
    """Mean over prompts of metric(target + sum_u delta_u at once) - metric(target), with every
    delta_u from :meth:`Effects.delta` (independent of attribution_ig's batched sum)."""
    units = [parse_unit(u) for u in units]
    enc = encode(pair.target.tokenizer, task.prompts, task.answers,
                 prepend_bos=pair.target.prepend_bos)
    table = UnitTable(units, pair.layout)
    vals = table.value_hooks()
    with HookRunner(pair, vals + table.write_hooks()) as runner, torch.no_grad():
        src: dict[str, torch.Tensor] = {}
        tgt: dict[str, torch.Tensor] = {}
        runner.run(pair.source, enc.input_ids, {n: capturer(src, n) for n in vals})
        logits = runner.run(pair.target, enc.input_ids, {n: capturer(tgt, n) for n in vals})
        clean = answer_logprobs(logits, enc)
        effects = Effects(pair, table, src, tgt)
        parts = [p for u in units for p in effects.delta(u)]

        def h(name):
            def f(t):
                t = t.clone()
                for n, index, d in parts:
                    if n == name:
                        t[(slice(None), *index)] += d.to(t.dtype)
                return t
            return f

        patched = runner.run(pair.target, enc.input_ids, {n: h(n) for n, _, _ in parts})
        return float((answer_logprobs(patched, enc) - clean).mean())


def test_path_points():
    assert path_points(4, "right") == [0.25, 0.5, 0.75, 1.0]
    assert path_points(4, "left") == [0.0, 0.25, 0.5, 0.75]
    assert path_points(2, "midpoint") == [0.25, 0.75]


def test_total_delta_is_the_sum_of_each_units_delta(pair):
    units = [parse_unit(u) for u in MIXED] + [parse_unit("L1.H0"), parse_unit("L1.KV0")]
    enc = encode(pair.target.tokenizer, make_task(3).prompts, prepend_bos=True)
    table = UnitTable(units, pair.layout)
    vals = table.value_hooks()
    with HookRunner(pair, vals) as runner, torch.no_grad():
        src: dict[str, torch.Tensor] = {}
        tgt: dict[str, torch.Tensor] = {}
        runner.run(pair.source, enc.input_ids, {n: capturer(src, n) for n in vals})
        runner.run(pair.target, enc.input_ids, {n: capturer(tgt, n) for n in vals})
    effects = Effects(pair, table, src, tgt)
    total = total_delta(effects)
    ref: dict[str, torch.Tensor] = {}
    for u in units:
        for name, index, d in effects.delta(u):
            ref.setdefault(name, torch.zeros_like(total[name]))[(slice(None), *index)] += d
    assert set(total) == set(ref) == set(table.write_hooks())
    for name in ref:
        assert ref[name].abs().max() > 0
        torch.testing.assert_close(total[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_left_rule_with_one_step_is_attribution(pair):
    """At a = 0 the path forward is the clean target, so the score is attribution's."""
    task = make_task(6)
    att = score(pair, task, "attribution", MIXED, batch_size=4, progress=False)
    ig = score(pair, task, "attribution_ig", MIXED, batch_size=4, progress=False,
               steps=1, rule="left")
    assert att.values.abs().min() > 1e-6
    assert torch.equal(ig.values, att.values)
    assert torch.equal(ig.consistency, att.consistency)
    # Any other point of the path gives something else.
    right = score(pair, task, "attribution_ig", MIXED, batch_size=4, progress=False,
                  steps=1, rule="right")
    assert not torch.allclose(right.values, att.values, rtol=1e-2)


def test_sum_of_scores_approaches_the_joint_patching_effect(pair):
    """Completeness: sum_u score_u -> f(1) - f(0), the effect of patching all units together;
    the error shrinks as steps grows (like 1/steps for "right", 1/steps^2 for "midpoint") and
    ends far below plain attribution's."""
    task = make_task(6)
    units = pair.units("head") + [Neuron(0, 3), Neuron(1, 7), Neuron(1, 29)]
    exact = joint_patch_effect(pair, task, units)
    att = score(pair, task, "attribution", units, progress=False)
    att_err = abs(float(att.values.sum()) - exact)
    assert att_err > 0.1 * abs(exact) > 1e-3  # the first-order estimate is visibly off here
    for rule in ("right", "midpoint"):
        errs = []
        for steps in (1, 2, 4, 8, 16):
            ig = score(pair, task, "attribution_ig", units, progress=False, steps=steps,
                       rule=rule, steps_per_pass=8)
            assert ig.meta["path_effect"] == pytest.approx(exact, rel=1e-4, abs=1e-6)
            errs.append(abs(float(ig.values.sum()) - exact))
        assert all(a > b for a, b in zip(errs, errs[1:])), (rule, errs)
        assert errs[-1] < (0.2 if rule == "right" else 0.01) * att_err, (rule, errs, att_err)


def test_single_unit_scores_approach_the_exact_patch(pair):
    """Scored alone, a unit's path is its own patch: the score tends to activation_patch's."""
    task = make_task(6)
    units = ["L0.H1", "L1.H2", "L1.KV0", "L1.N7", "L0.mlp.up_proj"]
    patch = score(pair, task, "activation_patch", units, progress=False)
    att = score(pair, task, "attribution", units, progress=False)
    att_err = (att.values - patch.values).abs()
    errs = []
    for steps in (1, 4):
        ig = torch.cat([score(pair, task, "attribution_ig", [u], progress=False,
                              steps=steps).values for u in units])
        errs.append((ig - patch.values).abs())
    assert float(errs[1].sum()) < float(errs[0].sum()) < float(att_err.sum())
    assert float(errs[1].sum()) < 0.05 * float(att_err.sum()), (errs, att_err)
    assert (errs[1] <= att_err).all(), (errs[1], att_err)


def test_replicas_and_batches_do_not_change_the_scores(pair):
    task = make_task(5)
    one = score(pair, task, "attribution_ig", MIXED, batch_size=1, progress=False, steps=4,
                steps_per_pass=1)
    many = score(pair, task, "attribution_ig", MIXED, batch_size=5, progress=False, steps=4,
                 steps_per_pass=3)
    auto = score(pair, task, "attribution_ig", MIXED, batch_size=2, progress=False, steps=4)
    tight = score(pair, task, "attribution_ig", MIXED, batch_size=5, progress=False, steps=4,
                  max_pass_mb=1)
    assert (one.meta["steps_per_pass"], many.meta["steps_per_pass"]) == (1, 3)
    assert auto.meta["steps_per_pass"] == 4  # a tiny model: every step in one pass
    assert tight.meta["steps_per_pass"] < 4
    for s in (many, auto, tight):
        torch.testing.assert_close(s.values, one.values, rtol=1e-4, atol=1e-6)
    assert one.meta["points"] == [0.125, 0.375, 0.625, 0.875]
    assert one.meta["method"] == "attribution_ig" and one.meta["signed"] is True


@pytest.mark.parametrize("opts,match", [
    ({"steps": 0}, r"steps must be an int >= 1"),
    ({"rule": "trapezoid"}, r"rule must be one of right, left, midpoint"),
    ({"steps_per_pass": 1.5}, r"steps_per_pass must be an int >= 1 or one of auto"),
    ({"max_pass_mb": 0}, r"max_pass_mb must be an int >= 1"),
])
def test_bad_options_are_named(pair, opts, match):
    with pytest.raises(ScoringError, match=match):
        score(pair, make_task(2), "attribution_ig", "head", progress=False, **opts)


def test_needs_answers(pair):
    with pytest.raises(ScoringError, match="attribution_ig needs answers"):
        score(pair, ["w1 w2"], "attribution_ig", "head", progress=False)
