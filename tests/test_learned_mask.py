"""learned_mask: exact at binary gates, finds planted units and planted weights, deterministic
(minibatch steps seeded, batch-size free), exact gate gradients, never edits weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tl_transplant import ModelPair, transplant
from tl_transplant.arch.units import Linear, parse_unit
from tl_transplant.edit.edits import plan_transplant
from tl_transplant.scoring import ScoringError, score
from tl_transplant.scoring.learned_mask import GatedTarget
from tl_transplant.tasks.task import Task
from tl_transplant.testing import (
    perturbed_copy,
    same_state,
    snapshot_side,
    tiny_model,
    word_tokenizer,
)

#: Units whose target weights are damaged in the planted pair (a head and three neurons).
PLANTED = ("L1.H2", "L0.N5", "L1.N17", "L1.N30")
IDS = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41], [1, 8, 8, 3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("mask_tok"))


@pytest.fixture(scope="module")
def family_pairs(tok):
    """Tiny (source, target) pairs: llama (GQA 4/2), gpt2 (Conv1D, fused c_attn) and gpt_neox
    (fused interleaved query_key_value, of which the bridge holds q/k/v copies)."""
    out = {}
    for fam in ("llama", "gpt2", "gpt_neox"):
        t = tiny_model(fam, seed=0)
        out[fam] = ModelPair.load((perturbed_copy(t, scale=0.2, seed=1), tok), (t, tok))
    return out


@pytest.fixture(scope="module")
def planted(tok) -> tuple[ModelPair, Task]:
    """Llama pair: the target is the source with every unit tensor nudged (10% of its std)
    and the PLANTED units' slices replaced by -3x the source's; the task's answers are the
    source's argmax next words, so the target's gap sits mostly in the planted units."""
    src = tiny_model("llama", seed=0)
    with torch.no_grad():  # a peakier next-token distribution than the default init gives
        src.model.norm.weight.mul_(20.0)
    pair = ModelPair.load((src, tok), (copy.deepcopy(src), tok))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in pair.layout.unit_tensors():
            t = pair.target.params[name]
            t.add_(0.1 * t.std() * torch.randn(t.shape, generator=gen))
        for u in PLANTED:
            for s in pair.layout.slices(parse_unit(u)):
                src_vals = pair.source.params[s.param].narrow(s.dim, s.start, s.size)
                pair.target.params[s.param].narrow(s.dim, s.start, s.size).copy_(-3 * src_vals)
    pair.target.refresh_mirrors()
    g2 = torch.Generator().manual_seed(2)
    prompts = [
        " ".join(f"w{int(x)}" for x in torch.randint(0, 90, (6,), generator=g2))
        for _ in range(16)
    ]
    ids = torch.tensor([[1, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts])
    with torch.no_grad():
        best = pair.source.bridge(ids, return_type="logits")[:, -1, 4:].argmax(-1) + 4
    answers = [tok.decode([int(a)]) for a in best]
    return pair, Task("planted", prompts, answers, metric="answer_logprob")


def small_task(n: int = 6) -> Task:
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(3 + i % 3)) for i in range(n)]
    answers = [f"w{(5 * i + 1) % 90}" for i in range(n)]
    return Task("small", prompts, answers, metric="answer_logprob")


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize(
    "kinds", [("head", "neuron"), ("head", "kv_head", "neuron"), ("head", "linear")]
)
def test_binary_gates_equal_transplant(family_pairs, fam, kinds):
    pair = family_pairs[fam]
    units = pair.units(kinds)
    gated = GatedTarget(pair, units)
    gen = torch.Generator().manual_seed(len(kinds))
    on = torch.rand(len(units), generator=gen) < 0.4
    chosen = [u for u, c in zip(units, on.tolist()) if c]
    assert chosen
    with torch.no_grad():
        base = pair.target.bridge(IDS, return_type="logits")
        got = gated.forward_gates(IDS, on.double())
        closed = gated.forward_gates(IDS, torch.zeros(len(units)))
        with transplant(pair, chosen, alpha=1.0):
            want = pair.target.bridge(IDS, return_type="logits")
    assert (want - base).abs().max() > 1e-2  # the transplant does change the logits
    assert torch.equal(got, want)  # bit-exact, KV groups brought along included
    assert torch.equal(closed, base)
    frac = plan_transplant(pair, chosen).n_params / gated.block_params
    assert gated.moved_fraction(on.double()) == pytest.approx(frac, rel=1e-6)


def test_kv_none_and_fractional_gate(family_pairs):
    pair = family_pairs["llama"]
    heads = [parse_unit("L0.H1"), parse_unit("L1.H3")]
    gated = GatedTarget(pair, heads, kv="none")
    with torch.no_grad():
        got = gated.forward_gates(IDS, torch.ones(2))
        with transplant(pair, heads, kv="none"):
            want = pair.target.bridge(IDS, return_type="logits")
        lin = [Linear(1, "mlp.up_proj")]
        half = GatedTarget(pair, lin).forward_gates(IDS, torch.tensor([0.3]))
        with transplant(pair, lin, alpha=0.3):
            want_half = pair.target.bridge(IDS, return_type="logits")
    assert torch.equal(got, want)
    assert torch.allclose(half, want_half, atol=1e-5, rtol=1e-5)


def test_planted_units_on_top(planted):
    pair, task = planted
    s = score(pair, task, "learned_mask", progress=False, batch_size=16, steps=100, lr=0.3,
              lam_ret=0.1, lam_sparse=1.0)
    top = {str(u) for u in s.top(len(PLANTED))}
    assert top == set(PLANTED)
    suggested = set(s.meta["suggested"])
    assert "L1.H2" in suggested and suggested <= set(PLANTED)
    assert s.meta["budget_rule"] == "score"
    assert torch.equal(s.columns["gate"], s.values)
    assert torch.allclose(torch.sigmoid(s.columns["theta"]), s.values)
    assert set(s.meta["loss"]) == {"total", "task", "retention", "sparsity"}
    assert len(s.meta["loss_history"]) == 100
    frac = plan_transplant(pair, sorted(suggested)).n_params / s.meta["block_params"]
    assert s.meta["suggested_frac_params"] == pytest.approx(frac, rel=1e-6)


def test_deterministic_batch_size_free_and_weights_untouched(family_pairs):
    pair = family_pairs["gpt_neox"]
    task = small_task()
    before_t, before_s = snapshot_side(pair.target), snapshot_side(pair.source)
    kw = dict(progress=False, steps=6, lr=0.3)
    a = score(pair, task, "learned_mask", batch_size=2, seed=4, **kw)
    b = score(pair, task, "learned_mask", batch_size=2, seed=4, **kw)
    c = score(pair, task, "learned_mask", batch_size=6, seed=4, **kw)
    assert torch.equal(a.values, b.values)
    assert a.meta["loss_history"] == b.meta["loss_history"]
    assert torch.allclose(a.values, c.values, rtol=1e-4, atol=1e-6)  # a step is a full pass
    assert a.meta["loss"]["total"] == pytest.approx(c.meta["loss"]["total"], rel=1e-5)
    assert not torch.allclose(a.values, torch.full_like(a.values, a.values[0]))  # gates moved
    assert a.meta["loss_history"][-1] < a.meta["loss_history"][0]
    assert same_state(before_t, snapshot_side(pair.target))
    assert same_state(before_s, snapshot_side(pair.source))


def test_retention_prompts(family_pairs):
    pair = family_pairs["llama"]
    s = score(pair, small_task(), "learned_mask", ("kv_head", "linear"), progress=False,
              steps=4, lr=0.5, retention_prompts=["w1 w2 w3", "w40 w41"])
    assert s.meta["loss"]["retention"] > 0
    assert {u.kind for u in s.units} == {"kv_head", "linear"}


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"lam_sparse": float("nan")}, "lam_sparse"),
        ({"kv": "all"}, "kv"),
        ({"sparsity": 1.0}, "does not take"),
        ({"retention_prompts": []}, "retention_prompts"),
    ],
)
def test_options_rejected(family_pairs, options, needle):
    with pytest.raises(ScoringError, match=needle):
        score(family_pairs["llama"], small_task(), "learned_mask", progress=False, **options)


def test_needs_answers(family_pairs):
    with pytest.raises(ScoringError, match="answers"):
        score(family_pairs["llama"], ["w1 w2"], "learned_mask", progress=False)


def test_contrast_subtracts_gates(family_pairs):
    pair = family_pairs["llama"]
    kw = dict(progress=False, steps=3, lr=0.5)
    s = score(pair, small_task(), "learned_mask", ("head",), contrast=small_task(4), lam=0.5,
              **kw)
    assert torch.allclose(s.values, s.columns["score_task"] - 0.5 * s.columns["score_contrast"])
    assert s.meta["suggested"] == [str(u) for u, v in zip(s.units, s.values.tolist()) if v > 0.5]


# ---- minibatch steps ----------------------------------------------------------------------


def test_minibatch_steps_seeded_and_batch_size_free(family_pairs):
    """Minibatch steps: the same seed gives the same gates whatever the batch size; another
    seed draws other minibatches; a minibatch of every prompt is the full-pass run."""
    pair = family_pairs["llama"]
    task = small_task(8)
    kw = dict(progress=False, steps=6, lr=0.3, minibatch=3)
    a = score(pair, task, "learned_mask", batch_size=2, seed=4, **kw)
    b = score(pair, task, "learned_mask", batch_size=3, seed=4, **kw)
    c = score(pair, task, "learned_mask", batch_size=2, seed=5, **kw)
    assert torch.allclose(a.values, b.values, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.values, c.values, rtol=1e-4, atol=1e-6)
    assert a.meta["options"]["minibatch"] == 3
    full = dict(progress=False, steps=4, lr=0.3)
    d = score(pair, task, "learned_mask", batch_size=4, minibatch=8, **full)
    e = score(pair, task, "learned_mask", batch_size=4, minibatch=None, **full)
    assert torch.equal(d.values, e.values)


def test_minibatch_schedule_covers_every_prompt_each_epoch():
    from tl_transplant.scoring.gate_training import minibatches

    picks = list(minibatches(10, 4, 5, seed=0))
    assert all(len(p) == 4 for p in picks)
    flat = [i for p in picks for i in p]
    assert sorted(flat[:10]) == list(range(10))  # first epoch: each prompt once
    assert sorted(flat[10:20]) == list(range(10))
    assert list(minibatches(10, 4, 5, seed=0)) == picks
    assert list(minibatches(3, 4, 2, seed=0)) == [[0, 1, 2], [0, 1, 2]]


# ---- single weights -----------------------------------------------------------------------


def _random_candidates(pair: ModelPair, frac: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in pair.layout.unit_tensors():
        numel = pair.target.params[n].numel()
        out[n] = torch.nonzero(torch.rand(numel, generator=gen) < frac).reshape(-1)
    return out


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gpt_neox"])
def test_binary_weight_gates_equal_mask_transplant(family_pairs, fam):
    from tl_transplant.edit.weights import WeightMask
    from tl_transplant.scoring.gates import WeightGates

    pair = family_pairs[fam]
    gates = WeightGates(pair, _random_candidates(pair, 0.3, seed=1))
    on = torch.rand(gates.n, generator=torch.Generator().manual_seed(2)) < 0.5
    vals = gates.scatter(on.float())
    mask = WeightMask({n: (v.reshape(-1) > 0.5).nonzero().reshape(-1) for n, v in vals.items()},
                      {n: tuple(v.shape) for n, v in vals.items()})
    assert mask.n_params == int(on.sum())
    with torch.no_grad():
        base = pair.target.bridge(IDS, return_type="logits")
        got = gates.forward_gates(IDS, on.double())
        closed = gates.forward_gates(IDS, torch.zeros(gates.n))
        with transplant(pair, mask, alpha=1.0):
            want = pair.target.bridge(IDS, return_type="logits")
    assert (want - base).abs().max() > 1e-2
    assert torch.equal(got, want)
    assert torch.equal(closed, base)


@pytest.fixture(scope="module")
def planted_weights(tok) -> tuple[ModelPair, Task, dict[str, torch.Tensor]]:
    """Llama pair: the source is the target plus a large delta on 24 weights of L1's MLP
    output projection and a tiny one (1e-4 relative) on every other block weight; the task's
    answers are the source's argmax next words, so the gap sits in the planted weights."""
    target = tiny_model("llama", seed=0)
    with torch.no_grad():
        target.model.norm.weight.mul_(20.0)
    source = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    params = dict(source.named_parameters())
    probe = ModelPair.load((copy.deepcopy(source), tok), (copy.deepcopy(target), tok))
    names = probe.layout.unit_tensors()
    planted_name = next(n for n in names if ".1." in n and "down_proj.weight" in n)
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.add_(1e-4 * p.abs().mean() * torch.randn(p.shape, generator=g))
        w = params[planted_name]
        flat = torch.randperm(w.numel(), generator=g)[:24]
        w.view(-1)[flat] += 3.0 * torch.randn(24, generator=g)
    pair = ModelPair.load((source, tok), (target, tok))
    g2 = torch.Generator().manual_seed(2)
    prompts = [" ".join(f"w{int(x)}" for x in torch.randint(0, 90, (6,), generator=g2))
               for _ in range(16)]
    ids = torch.tensor([[1, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts])
    with torch.no_grad():
        best = pair.source.bridge(ids, return_type="logits")[:, -1, 4:].argmax(-1) + 4
    task = Task("planted_w", prompts, [tok.decode([int(a)]) for a in best],
                metric="answer_logprob")
    return pair, task, {planted_name: flat.sort().values}


def test_weight_mask_finds_planted_weights_and_writes_nothing(planted_weights):
    from tl_transplant.edit.weights import WeightMask
    from tl_transplant.scoring.weight_scores import WeightScores

    pair, task, planted = planted_weights
    (pname, pidx), = planted.items()
    before = snapshot_side(pair.target), snapshot_side(pair.source)
    kw = dict(progress=False, steps=30, lr=0.3, lam_ret=0.1, candidates=0.02, seed=1)
    ws = score(pair, task, "learned_mask", units="weight", batch_size=16, **kw)
    assert isinstance(ws, WeightScores)
    assert same_state(before[0], snapshot_side(pair.target))
    assert same_state(before[1], snapshot_side(pair.source))
    assert ws.meta["budget_rule"] == "per_param"
    n_cand = ws.meta["n_candidates"]
    assert sum(int((v > 0).sum()) for v in ws.values.values()) == n_cand
    assert all(float(v.max()) <= 1.0 and float(v.min()) >= 0.0 for v in ws.values.values())
    top = ws.top_n(len(pidx))
    hit = set(top.index.get(pname, torch.empty(0)).tolist()) & set(pidx.tolist())
    assert len(hit) >= len(pidx) // 2  # planted weights rank on top
    sug = ws.suggested
    assert isinstance(sug, WeightMask) and sug.n_params > 0
    assert ws.meta["suggested"]["n_params"] == sug.n_params
    inside = set(sug.index.get(pname, torch.empty(0)).tolist()) & set(pidx.tolist())
    assert len(inside) >= sug.n_params // 2  # the suggested set is mostly planted weights
    again = score(pair, task, "learned_mask", units="weight", batch_size=5, **kw)
    for n, v in ws.values.items():
        assert torch.allclose(v, again.values[n], rtol=1e-4, atol=1e-6)
    # a budget never buys weights outside the candidates
    assert ws.budget_mask(0.5, pair.layout).n_params == n_cand


def test_weight_mask_options(family_pairs):
    with pytest.raises(ScoringError, match="candidates"):
        score(family_pairs["llama"], small_task(), "learned_mask", units="weight",
              progress=False, candidates=0.0)


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gpt_neox"])
def test_gate_gradients_equal_autograd(family_pairs, fam):
    """The direct gate gradients (vjp) equal autograd through the relaxed weights, for unit
    gates (one gated dim, and heads + whole linears overlapping) and weight gates."""
    from tl_transplant.scoring.gates import GatedTarget, WeightGates

    pair = family_pairs[fam]
    gen = torch.Generator().manual_seed(0)
    for gates in (GatedTarget(pair, pair.units(("head", "kv_head", "neuron"))),
                  GatedTarget(pair, pair.units(("head", "linear"))),
                  WeightGates(pair, _random_candidates(pair, 0.2, seed=3))):
        n = len(gates.units) if isinstance(gates, GatedTarget) else gates.n
        theta = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).float()
        theta.requires_grad_(True)
        relaxed, moved = gates.relax(theta)
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in relaxed.items()}
        torch.autograd.backward(list(relaxed.values()), [grads[k] for k in relaxed])
        want = theta.grad.clone()
        got = gates.vjp(theta.detach(), grads)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        th = theta.detach().requires_grad_(True)
        (g1,) = torch.autograd.grad(gates.moved(th), th)
        (g2,) = torch.autograd.grad(gates.relax(th)[1], th)
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gpt_neox"])
def test_gates_on_a_subset_are_compact_and_exact(family_pairs, fam):
    """Gates on some units only (a candidate set): only the gated rows/columns are stored,
    binary gates still equal the transplant bit for bit, and the gradients collected at the
    gated positions (leaves) give the same gate gradients as autograd through whole tensors."""
    from tl_transplant.scoring.gates import GatedTarget

    pair = family_pairs[fam]
    pool = pair.units(("head", "neuron"))
    gen = torch.Generator().manual_seed(11)
    units = [pool[i] for i in torch.randperm(len(pool), generator=gen)[: len(pool) // 4]]
    gated = GatedTarget(pair, units)
    compact = [g for g in gated.tensors if g.upos is not None and g.ts.shape != g.shape]
    assert compact  # some tensors keep only their gated positions
    for g in compact:
        assert g.ts.numel() < math.prod(g.shape) and g.ts.dtype == g.dtype
    on = torch.rand(len(units), generator=gen) < 0.5
    chosen = [u for u, c in zip(units, on.tolist()) if c]
    with torch.no_grad():
        got = gated.forward_gates(IDS, on.double())
        with transplant(pair, chosen, alpha=1.0):
            want = pair.target.bridge(IDS, return_type="logits")
    assert torch.equal(got, want)
    theta = (torch.randn(len(units), generator=gen) * 2).requires_grad_(True)
    relaxed, _ = gated.relax(theta)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in relaxed.items()}
    torch.autograd.backward(list(relaxed.values()), [grads[k] for k in relaxed])
    leaves = gated.leaves(theta)
    whole = gated.assemble(leaves)
    for k, v in whole.items():
        assert torch.equal(v.detach(), relaxed[k].detach())
    torch.autograd.backward(list(whole.values()), [grads[k] for k in whole])
    got_g = gated.vjp(theta.detach(), {k: leaf.grad for k, leaf in leaves.items()})
    want_g = theta.grad
    assert torch.allclose(got_g, want_g, rtol=1e-4, atol=1e-5 * float(want_g.abs().max()))


def test_unit_candidates_gate_the_top_attribution_units(planted, tmp_path, monkeypatch):
    """unit_candidates: only the units with the largest attribution get gates (the others
    score 0, theta NaN); 'auto' gates every unit on a
    small model and a share above the size threshold; the scores save and reload."""
    from tl_transplant.scoring import learned_mask as lm
    from tl_transplant.scoring.scores import Scores

    pair, task = planted
    kw = dict(progress=False, batch_size=16, steps=100, lr=0.3, lam_ret=0.1, lam_sparse=1.0)
    s = score(pair, task, "learned_mask", unit_candidates=0.2, **kw)
    n = s.meta["n_candidates"]
    assert 0 < n < len(s.units) and s.meta["unit_candidates"] == 0.2
    att = score(pair, task, "attribution", progress=False, batch_size=16)
    gated = {str(u) for u, t in zip(s.units, s.columns["theta"].tolist()) if t == t}
    assert gated == {str(u) for u in att.top(n)}  # the candidates: attribution's top n
    off = [i for i, t in enumerate(s.columns["theta"].tolist()) if t != t]
    assert all(s.values[i] == 0 for i in off)
    assert str(s.top(1)[0]) in gated and float(s.values.max()) > 0
    back = Scores.load(s.save(tmp_path / "lm.json"))
    assert torch.equal(back.values, s.values)
    auto = score(pair, task, "learned_mask", progress=False, steps=2)
    assert auto.meta["n_candidates"] == len(auto.units) and auto.meta["unit_candidates"] is None
    monkeypatch.setattr(lm, "AUTO_ALL_UNITS_MAX_PARAMS", 1000)
    big = score(pair, task, "learned_mask", progress=False, steps=2)
    assert big.meta["unit_candidates"] == lm.AUTO_UNIT_CANDIDATES
    assert big.meta["n_candidates"] < len(big.units)
