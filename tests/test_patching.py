"""patch_activations: exact substitution semantics, generation, evaluate/sweep integration."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tl_transplant import ModelPair, transplant
from tl_transplant.edit.edits import plan_transplant
from tl_transplant.edit.patching import PatchError, patch_activations
from tl_transplant.evaluation.evaluator import evaluate
from tl_transplant.sweeps.protocol import sweep
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import encode
from tl_transplant.testing import tiny_model, word_tokenizer

IDS = torch.tensor([[1, 5, 9, 7, 22, 13, 40], [1, 8, 8, 30, 6, 40, 41]])


def surgical_pair(family: str, tok, units: list[str], scale: float = 1.0, seed: int = 3,
                  kv: str = "group") -> ModelPair:
    """Source = target with Gaussian noise on exactly the weights of ``units``."""
    target = tiny_model(family, seed=0)
    pair = ModelPair.load((copy.deepcopy(target), tok), (target, tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mask in plan_transplant(pair, units, kv=kv).masks.items():
            p = pair.source.params[name]
            p.data[mask] += scale * torch.randn(int(mask.sum()), generator=g)
        pair.source.refresh_mirrors()
    return pair


def q_only_pair(tok, layer: int = 0, head: int = 1, scale: float = 2.0) -> ModelPair:
    """Llama pair differing only in the q rows of one head (so only that head's z differs)."""
    target = tiny_model("llama", seed=0)
    source = copy.deepcopy(target)
    with torch.no_grad():
        q = source.model.layers[layer].self_attn.q_proj.weight
        dh = q.shape[0] // 4
        rows = slice(head * dh, (head + 1) * dh)
        q[rows] += scale * torch.randn(dh, q.shape[1], generator=torch.Generator().manual_seed(1))
    return ModelPair.load((source, tok), (target, tok))


def hooks_left(pair: ModelPair) -> int:
    n = len(pair.target.hf._forward_pre_hooks)
    for side in pair.sides():
        n += sum(len(hp._forward_hooks) for hp in side.bridge.hook_dict.values())
    return n


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qpair(tok):
    return q_only_pair(tok)


def logits(side, ids=IDS):
    with torch.inference_mode():
        return side.bridge(ids, return_type="logits")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_mode_equals_weight_transplant_when_only_those_units_differ(tok, family):
    units = ["L1.H1", "L1.N3"]
    pair = surgical_pair(family, tok, units)
    src, tgt = logits(pair.source), logits(pair.target)
    assert (src - tgt).abs().max() > 0.05  # the edit matters
    with patch_activations(pair, units, mode="output", kv="group") as p:
        out = logits(pair.target)
        with torch.inference_mode():
            hf = pair.target.hf(IDS).logits
    torch.testing.assert_close(out, src, atol=2e-5, rtol=0)
    torch.testing.assert_close(hf, src, atol=2e-5, rtol=0)
    assert p.n_source_runs == 2
    with transplant(pair, units):
        torch.testing.assert_close(logits(pair.target), src, atol=2e-5, rtol=0)
    # activation mode keeps the target's W_O / W_out, which differ here
    with patch_activations(pair, units, mode="activation", kv="group"):
        assert (logits(pair.target) - src).abs().max() > 1e-3
    torch.testing.assert_close(logits(pair.target), tgt, atol=0, rtol=0)
    assert hooks_left(pair) == 0


def test_activation_mode_is_exact_when_only_the_activation_differs(qpair):
    src, tgt = logits(qpair.source), logits(qpair.target)
    assert (src - tgt).abs().max() > 0.05
    with patch_activations(qpair, "L0.H1"):
        torch.testing.assert_close(logits(qpair.target), src, atol=2e-5, rtol=0)
    with patch_activations(qpair, "L0.H0"):  # an identical head: no effect
        torch.testing.assert_close(logits(qpair.target), tgt, atol=2e-5, rtol=0)
    with patch_activations(qpair, "L0.H1", alpha=0.0):
        torch.testing.assert_close(logits(qpair.target), tgt, atol=0, rtol=0)


def test_blend_and_each_unit_kind_substitutes_at_its_hook(tok):
    pair = surgical_pair("llama", tok, ["L0.H1", "L0.KV1", "L1.N3", "L1.N4"])
    names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
             "blocks.1.mlp.hook_post", "blocks.0.attn.q.hook_out"]

    def cache(side):
        with torch.inference_mode():
            _, c = side.bridge.run_with_cache(IDS, names_filter=lambda n: n in names)
        return {n: c[n].clone() for n in names}

    s, t = cache(pair.source), cache(pair.target)
    z, post = "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"
    assert not torch.allclose(s[z][:, :, 1], t[z][:, :, 1])
    assert not torch.allclose(s[post][:, :, 4], t[post][:, :, 4])
    with patch_activations(pair, "L0.H1", alpha=0.5):
        x = cache(pair.target)
    torch.testing.assert_close(x[z][:, :, 1], 0.5 * (s[z][:, :, 1] + t[z][:, :, 1]))
    torch.testing.assert_close(x[z][:, :, [0, 2, 3]], t[z][:, :, [0, 2, 3]])
    with patch_activations(pair, ["L0.KV1"]):
        x = cache(pair.target)
    for n in ("blocks.0.attn.hook_k", "blocks.0.attn.hook_v"):
        assert not torch.allclose(s[n][:, :, 1], t[n][:, :, 1])
        torch.testing.assert_close(x[n][:, :, 1], s[n][:, :, 1])
        torch.testing.assert_close(x[n][:, :, 0], t[n][:, :, 0])
    with patch_activations(pair, ["L1.N3"]):
        x = cache(pair.target)
    torch.testing.assert_close(x[post][:, :, 3], s[post][:, :, 3])
    torch.testing.assert_close(x[post][:, :, 4], t[post][:, :, 4])  # only neuron 3 moves
    with patch_activations(pair, ["L0.attn.q_proj"]):
        x = cache(pair.target)
    q = "blocks.0.attn.q.hook_out"
    assert not torch.allclose(s[q], t[q])
    torch.testing.assert_close(x[q], s[q])


def test_source_forward_stops_after_the_last_patched_layer(qpair):
    seen = []
    with qpair.source.bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_z",
                                               lambda t, hook: seen.append(1) or t)]):
        with patch_activations(qpair, "L0.H1") as p:
            logits(qpair.target)
        assert seen == [] and p.n_source_runs == 1
        with patch_activations(qpair, "L1.H1"):
            logits(qpair.target)
        assert seen == [1]
    assert hooks_left(qpair) == 0


def test_generate_and_evaluate_follow_the_patch(qpair, tok):
    pair = qpair
    ids = torch.tensor([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    for use_cache in (True, False):
        with torch.no_grad():
            s = pair.source.hf.generate(ids, use_cache=use_cache, **kw)
            with patch_activations(pair, "L0.H1") as p:
                x = pair.target.hf.generate(ids, use_cache=use_cache, **kw)
        assert x.tolist() == s.tolist() and p.n_source_runs == 5  # hooks fire at every step
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(2 + i % 4)) for i in range(12)]
    em = Task("gen", prompts, ["w1"] * 12, metric="exact_match", max_new_tokens=4,
              prepend_bos=True)
    es = evaluate(pair.source, em, progress=False, batch_size=5)  # left-padded batches
    et = evaluate(pair.target, em, progress=False, batch_size=5)
    ex = evaluate(pair.target, em, progress=False, batch_size=5,
                  intervention=patch_activations(pair, "L0.H1"))
    assert es.generations != et.generations  # the check below is not vacuous
    assert ex.generations == es.generations
    lp = em.replace(metric="answer_logprob")
    a = evaluate(pair.source, lp, progress=False, batch_size=5).scores
    b = evaluate(pair.target, lp, progress=False, batch_size=5,
                 intervention=patch_activations(pair, "L0.H1")).scores
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert hooks_left(pair) == 0


@pytest.mark.filterwarnings("ignore::tl_transplant.evaluation.evaluator.UndefinedMetricWarning")
def test_sweep_compares_activation_and_weight_transplant(tok):
    pair = surgical_pair("llama", tok, ["L1.H1", "L1.N3"], scale=2.0)
    pool = builtin_task("induction", n=40, seed=0).prompts
    enc = encode(tok, pool, None, prepend_bos=True)
    with torch.inference_mode():
        out = pair.source.bridge(enc.input_ids)
    pred = out[torch.arange(len(pool)), enc.prompt_len - 1].argmax(-1).tolist()
    keep = [i for i, t in enumerate(pred) if t >= 4]
    task = Task("src", [pool[i] for i in keep],
                [" " + tok.convert_ids_to_tokens(pred[i]) for i in keep], prepend_bos=True)
    ranking = ["L0.H0", "L1.H1", "L1.N3"]
    kw = dict(ks=[1, 3], alphas=[1.0], progress=False, n_boot=100)
    weight = sweep(pair, task, ranking, **kw)
    act = sweep(pair, task, ranking,
                edit=lambda p, u, a: patch_activations(p, u, a, mode="output", kv="group"), **kw)
    w = {r.k: r.metric for r in weight.rows}
    x = {r.k: r.metric for r in act.rows}
    assert w[3] == x[3] == 1.0 and x[3] > act.baselines["dev"]["target"].mean
    plain = sweep(pair, task, ranking, edit=patch_activations, **kw)  # activation mode
    assert plain.rows[0].units == ["L0.H0"] and plain.best is not None
    assert hooks_left(pair) == 0 and pair.active == []


def test_bad_input_and_cleanup(qpair):
    with pytest.raises(PatchError, match="alpha"):
        patch_activations(qpair, "L0.H1", float("nan"))
    with pytest.raises(PatchError, match="mode"):
        patch_activations(qpair, "L0.H1", mode="z")  # type: ignore[arg-type]
    with pytest.raises(PatchError, match="kv"):
        patch_activations(qpair, "L0.H1", kv="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        patch_activations(qpair, "L9.H0")
    p = patch_activations(qpair, ["L0.H1", "L1.N2"], kv="group")
    assert [str(u) for u in p.units] == ["L0.H1", "L0.KV0", "L1.N2"]
    with pytest.raises(RuntimeError, match="boom"), p:
        with pytest.raises(PatchError, match="already active"):
            p.__enter__()
        raise RuntimeError("boom")
    assert hooks_left(qpair) == 0
    with p:  # reusable after exit
        logits(qpair.target)
    assert "L0.H1" in repr(p)
