"""Weight-level units: masks, top-k, and the scorers that rank single weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tl_transplant import ModelPair, Task, score, transplant
from tl_transplant.edit.edits import plan_transplant
from tl_transplant.edit.weights import (
    WeightMask,
    WeightMaskError,
    top_weights,
    unit_mask,
)
from tl_transplant.scoring import ScoringError
from tl_transplant.scoring.weight_scores import WeightScores
from tl_transplant.tasks.tokens import answer_logprobs, encode
from tl_transplant.testing import snapshot_side, tiny_model, word_tokenizer

WEIGHT_METHODS = ("attribution", "weight_diff", "magnitude", "random", "dare")
TASK = Task(prompts=["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9 w10 w11 w12"],
            answers=["w4", "w7", "w9", "w13"], metric="next_token_acc", name="t",
            prepend_bos=True)


def _planted_pair(tmp_path, family: str = "llama", n_planted: int = 30, dtype=torch.float32):
    """Source = target + a large delta on ``n_planted`` weights of L1's MLP output and a tiny
    delta (1e-4 relative) on every other block weight; returns (pair, planted mask)."""
    tok = word_tokenizer(tmp_path / "tok")
    target = tiny_model(family, seed=0).to(dtype)
    source = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    pair0 = ModelPair.load((copy.deepcopy(source), tok), (copy.deepcopy(target), tok))
    names = pair0.layout.unit_tensors()
    planted_name = next(n for n in names if ".1." in n and "down_proj.weight" in n)
    src_params = dict(source.named_parameters())
    with torch.no_grad():
        for n in names:
            p = src_params[n]
            p.add_(1e-4 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
        w = src_params[planted_name]
        flat = torch.randperm(w.numel(), generator=g)[:n_planted]
        w.view(-1)[flat] += 2.0 * torch.randn(n_planted, generator=g, dtype=w.dtype)
    planted = WeightMask({planted_name: flat}, {planted_name: tuple(w.shape)})
    return ModelPair.load((source, tok), (target, tok)), planted


def _recall(mask: WeightMask, planted: WeightMask) -> float:
    (name,) = planted.names
    got = set(mask.index.get(name, torch.empty(0, dtype=torch.long)).tolist())
    return len(got & set(planted.index[name].tolist())) / planted.n_params


def _metric(pair: ModelPair, task: Task) -> float:
    enc = encode(pair.target.tokenizer, task.prompts, task.answers, prepend_bos=True)
    with torch.no_grad():
        logits = pair.target.bridge(enc.input_ids, return_type="logits")
        return float(answer_logprobs(logits, enc).double().mean())


def test_a_planted_weight_delta_is_found_by_the_weight_level_scorers(tmp_path):
    pair, planted = _planted_pair(tmp_path)
    k = planted.n_params
    for m in ("weight_diff", "magnitude"):
        ws = score(pair, None, m, units="weight", progress=False)
        assert _recall(ws.top_n(k), planted) == 1.0, m
    ws = score(pair, TASK, "attribution", units="weight", progress=False)
    assert isinstance(ws, WeightScores) and ws.signed
    # Only the planted weights carry a delta big enough to matter to the metric.
    positive = ws.top_n(10 * k)  # per_param rule: gains > 0 only
    assert _recall(ws.top_n(k), planted) >= 0.4
    assert positive.n_params < 10 * k or _recall(positive, planted) > 0
    # Random weights find the planted ones only by chance (k of ~70k).
    rnd = score(pair, None, "random", units="weight", progress=False)
    assert _recall(rnd.top_n(k), planted) <= 0.1


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "phi3"])
def test_weight_attribution_predicts_the_first_order_change(tmp_path, family):
    """sum of gains * alpha == M(transplant of everything at alpha) - M(target) to first order,
    also through fused tensors the bridge copies (GPT-NeoX) or stores transposed (GPT-2)."""
    tok = word_tokenizer(tmp_path / "tok")
    target = tiny_model(family, seed=0).double()
    source = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    pair = ModelPair.load((source, tok), (target, tok))
    ws = score(pair, TASK, "attribution", units="weight", progress=False)
    predicted = sum(float(v.double().sum()) for v in ws.values.values())
    everything = [u for u in pair.units("linear")]
    alpha = 1e-4
    base = _metric(pair, TASK)
    with transplant(pair, everything, alpha):
        moved = _metric(pair, TASK)
    actual = (moved - base) / alpha
    assert math.isclose(predicted, actual, rel_tol=2e-2, abs_tol=1e-6), (predicted, actual)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_weight_scoring_changes_neither_model(tmp_path, method):
    pair, _ = _planted_pair(tmp_path)
    before = snapshot_side(pair.source), snapshot_side(pair.target)
    ws = score(pair, TASK, method, units="weight", progress=False)
    after = snapshot_side(pair.source), snapshot_side(pair.target)
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(torch.equal(b[n], a[n]) for n in b)
    assert set(ws.values) == set(pair.layout.unit_tensors())
    assert all(tuple(v.shape) == pair.layout.shapes[n] for n, v in ws.values.items())


def test_budgets_count_single_weights_and_random_is_seeded(tmp_path):
    pair, _ = _planted_pair(tmp_path)
    from tl_transplant.edit.budget import block_params

    total = block_params(pair.layout)
    assert total == sum(math.prod(pair.layout.shapes[n]) for n in pair.layout.unit_tensors())
    a = score(pair, None, "random", units="weight", seed=1, progress=False)
    b = score(pair, None, "random", units="weight", seed=1, progress=False)
    c = score(pair, None, "random", units="weight", seed=2, progress=False)
    for f in (0.0001, 0.01, 0.05):
        ma = a.within_budget(f, pair.layout)
        assert ma.n_params == math.floor(f * total + 1e-9)
        assert ma == b.within_budget(f, pair.layout)
        assert ma != c.within_budget(f, pair.layout) or ma.n_params == 0
    assert a.meta["budget_rule"] == "score"
    d = score(pair, None, "dare", units="weight", seed=1, progress=False)
    assert d.within_budget(0.01, pair.layout) == a.within_budget(0.01, pair.layout)
    assert d.meta["alpha_scale"] == "inverse_fraction"


def test_top_weights_equals_a_full_sort_and_the_sampled_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    vals = {"b": torch.randn(40, 30, generator=g), "a": torch.randn(500, generator=g)}
    vals["a"][:50] = 0.25  # ties at the threshold
    vals["b"][0, :3] = float("nan")
    flat = torch.cat([vals["a"].reshape(-1), vals["b"].reshape(-1)])
    flat = torch.nan_to_num(flat, nan=-math.inf)
    for k in (1, 17, 200, 600, 1700):
        got = top_weights(vals, k)
        n = sum(len(v) for v in got.values())
        assert n == min(k, int(torch.isfinite(flat).sum()))
        chosen = torch.cat([vals[name].reshape(-1)[i] for name, i in sorted(got.items())])
        kth = torch.sort(flat, descending=True).values[n - 1]
        assert bool((chosen >= kth).all())
        import tl_transplant.edit.weights as w

        monkeypatch.setattr(w, "_EXACT_TOPK_MAX", 10)
        sampled = top_weights(vals, k)
        monkeypatch.undo()
        assert {a: b.tolist() for a, b in sampled.items()} == {a: b.tolist() for a, b in got.items()}
    pos = top_weights({"a": torch.tensor([-1.0, 2.0, 0.0, 3.0])}, 3, positive_only=True)
    assert pos["a"].tolist() == [1, 3]


def test_unit_mask_is_the_unit_plan(family, pair_dirs):
    src, tgt = pair_dirs(family)
    pair = ModelPair.load(str(src), str(tgt))
    units = ["L0.H1", "L1.N3", "L1.attn.o_proj" if family != "gpt2" else "L1.attn.c_proj"]
    units = [u for u in units if u.split(".", 1)[1].split(".")[0] in ("H1", "N3")
             or u in [str(x) for x in pair.units("linear")]]
    m = unit_mask(pair.layout, units)
    plan = plan_transplant(pair, units)
    assert {k: v.tolist() for k, v in plan.index.items()} == \
        {k: v.tolist() for k, v in m.index.items()}
    assert m.n_params == plan.n_params
    counts = m.by_unit(pair.layout, ("head", "neuron"))
    assert counts[pair.validate("L0.H1")] == pair.n_params("L0.H1")
    assert counts[pair.validate("L1.N3")] == pair.n_params("L1.N3")


def test_mask_file_round_trip_and_tampering(tmp_path):
    shapes = {"x.weight": (4, 5), "y.bias": (7,)}
    m = WeightMask({"x.weight": [3, 1, 19, 3], "y.bias": []}, shapes)
    assert m.n_params == 3 and m.names == ["x.weight"]
    sha = m.save(tmp_path / "m.safetensors")
    back = WeightMask.load(tmp_path / "m.safetensors", sha256=sha)
    assert back == m and back.index["x.weight"].tolist() == [1, 3, 19]
    assert bool(back.to_bool("x.weight")[0, 1]) and not bool(back.to_bool("x.weight")[0, 0])
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightMaskError, match="SHA-256"):
        WeightMask.load(tmp_path / "bad.safetensors", sha256=sha)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightMaskError, match="cannot read"):
        WeightMask.load(tmp_path / "junk.safetensors")
    with pytest.raises(WeightMaskError, match="out of range"):
        WeightMask({"x.weight": [20]}, shapes)


def test_weight_grain_errors(engineered_pair):
    pair, _ = engineered_pair
    with pytest.raises(ScoringError, match="cannot score individual weights; weight-level"):
        score(pair, TASK, "activation_diff", units="weight", progress=False)
    with pytest.raises(ScoringError, match="scores individual weights only"):
        score(pair, None, "magnitude", units=("head",), progress=False)
    with pytest.raises(ScoringError, match="mixes 'weight'"):
        score(pair, TASK, "attribution", units=("head", "weight"), progress=False)
    ws = score(pair, None, "magnitude", units="weight", progress=False)
    with pytest.raises(TypeError, match="by parameter budget"):
        ws.top(3)


def test_unit_view_sums_weight_scores_per_unit(engineered_pair):
    pair, _ = engineered_pair
    ws = score(pair, None, "magnitude", units="weight", progress=False)
    view = ws.unit_view(pair.layout, ("head", "neuron"))
    # The engineered pair differs only in L1's mlp.down_proj and attn.o_proj.
    assert all(u.layer == 1 for u in view.top(5))
    h = pair.validate("L1.H0")
    expect = sum(float(ws.values[s.param].narrow(s.dim, s.start, s.size).double().sum())
                 for s in pair.layout.slices(h))
    assert math.isclose(view[h], expect, rel_tol=1e-9)
    assert view["L0.H0"] == 0.0
