"""bfloat16 and float16 end to end on the tiny families.

One blend rule (float32 arithmetic, one cast to the target's dtype) shared by the in-memory
and out-of-core paths; scores and statistics in float32 or wider; every stage (unit and
weight attribution, learned_mask, evaluation, generation, a sweep, a whole ``run``, export)
works in half precision, leaves the models bit-exact, and the export keeps the checkpoint's
dtype and reloads equal. Assertions are on exact properties (zero scores where source and
target are equal, bit equality, dtypes), never on how close half precision comes to float32.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

from tl_transplant import ModelPair, Task, score, transplant
from tl_transplant.edit.edits import apply_transplant, blend_values
from tl_transplant.evaluation.evaluator import evaluate
from tl_transplant.io import out_of_core
from tl_transplant.io.export import export_hf
from tl_transplant.io.out_of_core import apply_manifest_out_of_core
from tl_transplant.sweeps.protocol import sweep
from tl_transplant.testing import (
    same_state,
    save_tiny,
    snapshot_side,
    tiny_model,
    word_tokenizer,
)

HALF = (torch.bfloat16, torch.float16)
PLANTED = ("model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight")
TASK = Task(
    "t",
    ["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9 w10 w11 w12", "w3 w3", "w20 w21 w22"],
    [" w4", " w7", " w9", " w13", " w3", " w23"],
    metric="answer_logprob",
    prepend_bos=True,
)


def _stored(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, tuple[Path, Path]]:
    """Per half dtype: a llama (source, target) saved in that dtype, equal except two planted
    tensors of layer 1 (so every unit outside them has an exactly zero delta)."""
    root = tmp_path_factory.mktemp("dtypes")
    tok = word_tokenizer(root / "tok")
    target = tiny_model("llama", seed=0)
    source = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    params = dict(source.named_parameters())
    with torch.no_grad():
        for n in PLANTED:
            params[n].copy_(0.5 * torch.randn(params[n].shape, generator=g))
    out = {}
    for dt in HALF:
        name = str(dt).removeprefix("torch.")
        s = save_tiny(copy.deepcopy(source).to(dt), tok, root / name / "source")
        t = save_tiny(copy.deepcopy(target).to(dt), tok, root / name / "target")
        out[dt] = (s, t)
    return out


@pytest.fixture(scope="module", params=HALF, ids=["bfloat16", "float16"])
def half(request: pytest.FixtureRequest, dirs) -> tuple[torch.dtype, ModelPair, Path, Path]:
    dt = request.param
    s, t = dirs[dt]
    pair = ModelPair.load(s, t)  # dtype None: the checkpoint's
    return dt, pair, s, t


# ---- the blend rule -------------------------------------------------------------------


def test_one_blend_rule_float32_arithmetic_cast_once() -> None:
    assert out_of_core.blend_values is blend_values  # the out-of-core path uses the same rule
    g = torch.Generator().manual_seed(0)
    t32, s32 = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    for a in (0.3, 0.5, 0.7):
        # float32: bit-identical to the plain float32 formula (what it always computed)
        assert torch.equal(blend_values("x", t32, s32, a), (1.0 - a) * t32 + a * s32)
        for dt in HALF:
            t, s = t32.to(dt), s32.to(dt)
            want = ((1.0 - a) * t.float() + a * s.float()).to(dt)
            got = blend_values("x", t, s, a)
            assert got.dtype == dt and torch.equal(got, want)
    # alpha 1 copies the (float32) source cast once; alpha 0 keeps the target's bits
    for dt in HALF:
        t = t32.to(dt)
        assert torch.equal(blend_values("x", t, s32, 1.0), s32.to(dt))
        assert torch.equal(blend_values("x", t, s32, 0.0), t)


# ---- every stage in half precision ------------------------------------------------------


def test_loads_in_checkpoint_dtype_and_scores_are_float32(half) -> None:
    dt, pair, _, _ = half
    assert {p.dtype for p in pair.target.params.values()} == {dt}
    snap_t, snap_s = snapshot_side(pair.target), snapshot_side(pair.source)
    planted = set(PLANTED)

    # unit attribution: finite float64 scores, exactly zero on units that move no weight
    # (the source equals the target there), nonzero somewhere in the planted tensors
    s = score(pair, TASK, "attribution", units=("head", "neuron"), progress=False)
    assert s.values.dtype == torch.float64 and bool(torch.isfinite(s.values).all())
    touches = {
        str(u): any(sl.param in planted for sl in pair.layout.slices(u))
        for u in pair.units(("head", "neuron"))
    }
    for u, v in zip(s.units, s.values.tolist()):
        if not touches[str(u)]:
            assert v == 0.0, (u, v)
    assert any(v != 0.0 for v in s.values.tolist())

    # weight-level attribution: float32 tensors, zero outside the planted tensors
    ws = score(pair, TASK, "attribution", units="weight", progress=False)
    for n, v in ws.values.items():
        assert v.dtype == torch.float32 and bool(torch.isfinite(v).all()), n
        if n not in planted:
            assert not bool(v.any()), n
    assert any(bool(ws.values[n].any()) for n in planted)

    # learned_mask, few steps: units and single weights
    lm = score(pair, TASK, "learned_mask", units=("head", "neuron"), steps=2, progress=False)
    assert lm.values.dtype == torch.float64 and bool(torch.isfinite(lm.values).all())
    lw = score(pair, TASK, "learned_mask", units="weight", steps=2, progress=False)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all())
               for v in lw.values.values())
    # no weight of either model was written, in any dtype
    assert same_state(snap_t, snapshot_side(pair.target))
    assert same_state(snap_s, snapshot_side(pair.source))


def test_evaluation_and_generation(half) -> None:
    dt, pair, _, _ = half
    for metric in ("answer_logprob", "next_token_acc"):
        r = evaluate(pair.target, TASK.replace(metric=metric), progress=False, batch_size=4)
        assert r.scores.dtype == np.float64 and np.isfinite(r.scores).all()
        # batching does not change the per-example scores beyond half-precision noise
        one = evaluate(pair.target, TASK.replace(metric=metric), progress=False, batch_size=1)
        if metric == "answer_logprob":
            assert np.allclose(r.scores, one.scores, atol=0.25), (r.scores, one.scores)
    gen = TASK.replace(metric="exact_match", max_new_tokens=4)
    g = evaluate(pair.target, gen, progress=False, batch_size=3)
    assert g.generations is not None and len(g.generations) == len(TASK)
    assert set(g.scores.tolist()) <= {0.0, 1.0}
    # a transplant of the planted tensors turns the target's greedy output into the source's
    src = evaluate(pair.source, gen, progress=False, batch_size=1)
    units = ["L1.mlp.down_proj", "L1.attn.o_proj"]
    with transplant(pair, units, alpha=1.0):
        x = evaluate(pair.target, gen, progress=False, batch_size=1)
    assert x.generations == src.generations


def test_revert_bit_exact_alpha_zero_identity_and_sweep(half) -> None:
    dt, pair, _, _ = half
    snap = snapshot_side(pair.target)
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    with torch.no_grad():
        base = pair.target.bridge(ids, return_type="logits")
    units = ["L1.H1", "L1.N3", "L1.mlp.down_proj"]
    with transplant(pair, units, alpha=0.0):
        assert same_state(snap, snapshot_side(pair.target))
        with torch.no_grad():
            assert torch.equal(pair.target.bridge(ids, return_type="logits"), base)
    with transplant(pair, units, alpha=0.3):
        assert not same_state(snap, snapshot_side(pair.target))
        q = pair.target.params[PLANTED[0]]
        assert q.dtype == dt
    assert same_state(snap, snapshot_side(pair.target))

    s = score(pair, TASK, "weight_diff", units=("head", "neuron"), progress=False)
    res = sweep(pair, TASK, s, ks=[1, 2], alphas=[0.5, 1.0], n_boot=50, progress=False,
                control_tasks=[])
    assert res.best is not None and np.isfinite(res.best.metric)
    assert same_state(snap, snapshot_side(pair.target))


def test_export_keeps_dtype_reloads_equal_and_matches_out_of_core(half, tmp_path) -> None:
    dt, pair0, s_dir, t_dir = half
    pair = ModelPair.load(s_dir, t_dir)  # a fresh pair: this test edits the target
    apply_transplant(pair, ["L1.H1", "L1.N3", "L1.mlp.down_proj"], 0.5)
    mem = export_hf(pair, tmp_path / "mem")
    stored = _stored(mem)
    assert {v.dtype for v in stored.values()} == {dt}
    assert json.loads((mem / "config.json").read_text()).get("torch_dtype", "") in (
        str(dt).removeprefix("torch."), "")
    again = ModelPair.load(s_dir, mem)
    assert same_state(snapshot_side(pair.target), snapshot_side(again.target))
    ooc = apply_manifest_out_of_core(s_dir, t_dir, mem, tmp_path / "ooc")
    other = _stored(ooc)
    assert stored.keys() == other.keys()
    assert all(torch.equal(stored[k], other[k]) for k in stored)
    # the blend really moved half-precision weights, by the one rule
    name = "model.layers.1.mlp.down_proj.weight"
    t0 = _stored(t_dir)[name]
    s0 = _stored(s_dir)[name]
    assert torch.equal(stored[name], blend_values(name, t0, s0, 0.5))
    assert not torch.equal(stored[name], t0)


def test_run_in_bfloat16_from_float16_checkpoints(dirs, tmp_path) -> None:
    """``dtype: bfloat16`` in a config over float16 checkpoints: the whole pipeline runs in
    bfloat16 and exports bfloat16."""
    from tl_transplant import run

    s, t = dirs[torch.float16]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(
        json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(TASK.prompts * 2,
                                                                       TASK.answers * 2)))
    cfg = {
        "source": str(s), "target": str(t), "dtype": "bfloat16",
        "task": {"path": str(task), "prepend_bos": True, "metric": "answer_logprob"},
        "selection": {"methods": ["attribution"], "units": ["head", "neuron"],
                      "controls": ["random"]},
        "sweep": {"k": [2], "alpha": [1.0]},
        "export": True,
    }
    res = run(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    assert {p.dtype for p in res.pair.target.params.values()} == {torch.bfloat16}
    exported = _stored(tmp_path / "out" / "model")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["best"]["method"] == "attribution" and results["best"]["k"] == 2
    assert np.isfinite(res.sweep.best.metric)


def test_every_family_in_bfloat16(
    family: str, pair_dirs, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every model type, cast to bfloat16 at load: weight attribution (the functional forward,
    fused tensors included) gives finite float32 scores, a transplant reverts bit-exactly,
    alpha 0 is the identity, and the export keeps bfloat16 and reloads equal."""
    if family == "olmo2":
        request.applymarker(pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
            "TransformerLens's bridge attention (position_embeddings_attention) casts the "
            "pattern to its float32 pre-reshape q-norm output, then multiplies it with "
            "bfloat16 values: the bridge's own forward fails")))
    s_dir, t_dir = pair_dirs(family)
    # The saved word tokenizer as written (AutoTokenizer would pick e.g. Qwen2Tokenizer for
    # a qwen2 config, which reads "w1 w2" as no tokens at all).
    tok = PreTrainedTokenizerFast.from_pretrained(t_dir)
    pair = ModelPair.load((s_dir, tok), (t_dir, tok), dtype="bfloat16")
    assert {p.dtype for p in pair.target.params.values()} == {torch.bfloat16}
    snap = snapshot_side(pair.target)
    ws = score(pair, TASK, "attribution", units="weight", progress=False)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all())
               for v in ws.values.values())
    assert any(bool(v.any()) for v in ws.values.values())
    units = pair.units(("head", "neuron"))[::3]
    with transplant(pair, units, alpha=0.0):
        assert same_state(snap, snapshot_side(pair.target))
    with transplant(pair, ws.top_n(200), alpha=0.5):
        assert not same_state(snap, snapshot_side(pair.target))
    assert same_state(snap, snapshot_side(pair.target))
    apply_transplant(pair, units, 0.5)
    out = export_hf(pair, tmp_path / "out")
    assert {v.dtype for v in _stored(out).values()} == {torch.bfloat16}
    again = ModelPair.load((s_dir, tok), (out, tok))
    assert same_state(snapshot_side(pair.target), snapshot_side(again.target))
