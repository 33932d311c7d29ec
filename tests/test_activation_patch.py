"""activation_patch at scale: batched replicas equal one unit per forward, candidates, refusal, cost."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tl_transplant import ModelPair
from tl_transplant.arch.units import Neuron, parse_unit
from tl_transplant.models.hooks import HookRunner, capturer
from tl_transplant.scoring import Scores, ScoringError, score
from tl_transplant.scoring.accumulate import UnitTable
from tl_transplant.scoring.activation_patch import FULL_NEURON_LIMIT
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
    return word_tokenizer(tmp_path_factory.mktemp("patch_tok"))


@pytest.fixture(scope="module")
def f64_pair(tok) -> ModelPair:
    """gpt_neox in float64 (its HF code stays in float64), every tensor a little different."""
    tgt = tiny_model("gpt_neox", seed=0).double()
    return ModelPair.load((perturbed_copy(tgt, scale=0.05, seed=1), tok), (tgt, tok))


@pytest.fixture(scope="module")
def gqa_pair(tok) -> ModelPair:
    tgt = tiny_model("llama", seed=0)
    return ModelPair.load((perturbed_copy(tgt, scale=0.1, seed=1), tok), (tgt, tok))


def one_unit_per_forward(pair: ModelPair, task: Task, units: list, alpha: float) -> torch.Tensor:
    """The unbatched definition: all prompts in one batch, one forward per unit, each unit's
    patch from :meth:`Effects.delta` added at its write hooks."""
    enc = encode(pair.target.tokenizer, task.prompts, task.answers,
                 prepend_bos=pair.target.prepend_bos)
    table = UnitTable(units, pair.layout)
    vals = table.value_hooks()
    out = []
    with HookRunner(pair, vals + table.write_hooks()) as runner, torch.no_grad():
        src: dict[str, torch.Tensor] = {}
        tgt: dict[str, torch.Tensor] = {}
        runner.run(pair.source, enc.input_ids, {n: capturer(src, n) for n in vals})
        logits = runner.run(pair.target, enc.input_ids, {n: capturer(tgt, n) for n in vals})
        clean = answer_logprobs(logits, enc)
        effects = Effects(pair, table, src, tgt)
        for u in units:
            def patch(index, d):
                def h(t):
                    t = t.clone()
                    t[(slice(None), *index)] += alpha * d
                    return t
                return h
            handlers = {name: patch(index, d) for name, index, d in effects.delta(u)}
            patched = runner.run(pair.target, enc.input_ids, handlers)
            out.append(float((answer_logprobs(patched, enc) - clean).mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_batched_replicas_equal_one_unit_per_forward_in_float64(f64_pair):
    pair, task = f64_pair, make_task(6)
    units = (pair.units("head") + pair.units("kv_head") + pair.units("linear")
             + [Neuron(0, 3), Neuron(0, 40), Neuron(1, 7), Neuron(1, 29), Neuron(1, 30)])
    ref = one_unit_per_forward(pair, task, units, 0.7)
    assert ref.abs().min() > 1e-8  # every unit moves the metric
    for per_pass, bs in (("auto", 6), (1, 3), (7, 2), (len(units), 5)):
        s = score(pair, task, "activation_patch", units, batch_size=bs, progress=False,
                  alpha=0.7, units_per_pass=per_pass)
        torch.testing.assert_close(s.values, ref, rtol=1e-11, atol=1e-13,
                                   msg=f"units_per_pass={per_pass}, batch_size={bs}")
    # A tight memory budget gives smaller passes and the same scores.
    small = score(pair, task, "activation_patch", units, batch_size=6, progress=False,
                  alpha=0.7, max_pass_mb=1)
    assert small.meta["units_per_pass"] < len(units)
    torch.testing.assert_close(small.values, ref, rtol=1e-11, atol=1e-13)


def test_gqa_kv_groups_and_mixed_kinds_in_one_pass(gqa_pair):
    pair, task = gqa_pair, make_task(5)
    units = pair.units(("head", "kv_head")) + [Neuron(1, 7), parse_unit("L0.mlp.up_proj")]
    one = score(pair, task, "activation_patch", units, batch_size=1, units_per_pass=1,
                progress=False)
    many = score(pair, task, "activation_patch", units, batch_size=5, progress=False)
    assert many.meta["units_per_pass"] == len(units)
    torch.testing.assert_close(many.values, one.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(many.consistency, one.consistency)


def test_explicit_candidates_leave_the_rest_unscored(gqa_pair):
    pair, task = gqa_pair, make_task(5)
    full = score(pair, task, "activation_patch", ("head", "neuron"), progress=False)
    picks = ["L1.H2", "L0.N3", "L1.N7"]
    s = score(pair, task, "activation_patch", ("head", "neuron"), progress=False,
              candidates=picks)
    assert len(s) == len(full) and s.meta["n_patched"] == 3
    for u, v in s:
        if str(u) in picks:
            assert v == pytest.approx(full[u], rel=1e-5, abs=1e-7)
        else:
            assert math.isnan(v)
    assert set(map(str, s.top(10))) == set(picks)  # NaN units are skipped
    assert set(map(str, s.bottom(10))) == set(picks)
    assert s.consistency is not None and torch.isnan(s.consistency).sum() == len(s) - 3
    # a Scores (every unit it scored) and {"scores": ..., "top": N} are candidates too
    assert set(map(str, score(pair, task, "activation_patch", ("head", "neuron"),
                              progress=False, candidates=s).top(10))) == set(picks)
    ranked = score(pair, task, "attribution", ("head", "neuron"), progress=False)
    t2 = score(pair, task, "activation_patch", ("head", "neuron"), progress=False,
               candidates={"scores": ranked, "top": 2})
    assert set(t2.top(10)) == set(ranked.top(2, kinds="head") + ranked.top(2, kinds="neuron"))


def test_candidates_by_attribution_top_n_per_kind(gqa_pair):
    pair, task = gqa_pair, make_task(5)
    att = score(pair, task, "attribution", ("head", "neuron"), progress=False)
    s = score(pair, task, "activation_patch", ("head", "neuron"), progress=False,
              candidates={"method": "attribution", "top": 3})
    want = set(att.top(3, kinds="head") + att.top(3, kinds="neuron"))
    assert {u for u, v in s if not math.isnan(v)} == want
    assert s.meta["options"]["candidates"] == {"method": "attribution", "top": 3, "options": {}}
    full = score(pair, task, "activation_patch", list(want), progress=False)
    for u in want:
        assert s[u] == pytest.approx(full[u], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("cand,match", [
    ({"method": "nope", "top": 3}, "unknown scoring method 'nope'"),
    ({"method": "activation_patch", "top": 3}, "circular"),
    ({"method": "attribution", "top": 0}, "candidates"),
    ({"method": "attribution", "top": 3, "options": {"positions": "all"}}, "positions"),
    (["L0.H1", "L9.H0"], "candidates"),
    (["L0.N5"], "not among the units being scored"),
    ([], "candidates is empty"),
    (3, "candidates must be a list of units"),
])
def test_bad_candidates_are_named(gqa_pair, cand, match):
    with pytest.raises(ScoringError, match=match):
        score(gqa_pair, make_task(2), "activation_patch", "head", progress=False,
              candidates=cand)


def test_full_neuron_run_of_a_big_mlp_is_refused_unless_allowed(tok):
    per_layer = FULL_NEURON_LIMIT // 2 + 8
    tgt = tiny_model("llama", seed=0, intermediate_size=per_layer)
    pair = ModelPair.load((perturbed_copy(tgt, scale=0.1, seed=1), tok), (tgt, tok))
    task = make_task(2)
    with pytest.raises(ScoringError, match=r"candidates=\{'method': 'attribution'.*allow_full=True"):
        score(pair, task, "activation_patch", "neuron", progress=False)
    s = score(pair, task, "activation_patch", "neuron", progress=False,
              candidates={"method": "attribution", "top": 4})
    assert s.meta["n_patched"] == 4 and len(s.top(100)) == 4
    full = score(pair, task, "activation_patch", "neuron", progress=False, allow_full=True)
    assert not torch.isnan(full.values).any() and len(full) == 2 * per_layer
    for u in s.top(4):
        assert full[u] == pytest.approx(s[u], rel=1e-5, abs=1e-7)


def test_long_runs_report_their_cost(gqa_pair, caplog, capsys):
    pair, task = gqa_pair, make_task(4)
    with caplog.at_level(logging.INFO, logger="tl_transplant.scoring"):
        score(pair, task, "activation_patch", "neuron", batch_size=2, progress=True)
    notes = [r.getMessage() for r in caplog.records if r.name == "tl_transplant.scoring"]
    n = len(pair.units("neuron"))
    assert any(f"{n} units x 4 prompts = about {n + 2} forwards" in m for m in notes), notes
    assert any("first batch took" in m for m in notes), notes
    assert "forwards of the target per prompt" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tl_transplant.scoring"):
        score(pair, task, "activation_patch", ["L0.H1"], batch_size=4, progress=False)
    assert not [r for r in caplog.records if r.name == "tl_transplant.scoring"]


def test_units_per_pass_is_typed(gqa_pair):
    for bad in (0, "all", 2.0, True):
        with pytest.raises(ScoringError, match="units_per_pass"):
            score(gqa_pair, make_task(2), "activation_patch", "head", progress=False,
                  units_per_pass=bad)
    with pytest.raises(ScoringError, match="allow_full"):
        score(gqa_pair, make_task(2), "activation_patch", "head", progress=False,
              allow_full="yes")


def test_scores_with_unscored_units_survive_save_and_load(gqa_pair, tmp_path):
    s = score(gqa_pair, make_task(3), "activation_patch", "head", progress=False,
              candidates=["L0.H1"])
    back = Scores.load(s.save(tmp_path / "s.json"))
    assert back.top(5) == [parse_unit("L0.H1")]
    assert torch.isnan(back.values).sum() == len(s) - 1
