"""Unit strings and layout tables: parsing, validation, and that slices mean what they say."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tl_transplant import Head, KVHead, Linear, ModelPair, Neuron, UnitError, parse_unit, transplant
from tl_transplant.arch.model_layout import bind_layout
from tl_transplant.arch.registry import family_for
from tl_transplant.arch.schema import UnsupportedArchitectureError
from tl_transplant.arch.units import normalize_kinds, parse_units
from tl_transplant.testing import tiny_model, word_tokenizer

names = st.from_regex(r"(attn|mlp)\.[a-z_][a-z0-9_]{0,12}", fullmatch=True)
units_st = st.one_of(
    st.builds(Head, st.integers(0, 999), st.integers(0, 9999)),
    st.builds(KVHead, st.integers(0, 999), st.integers(0, 9999)),
    st.builds(Neuron, st.integers(0, 999), st.integers(0, 10**6)),
    st.builds(Linear, st.integers(0, 999), names),
)


@given(units_st)
def test_unit_string_round_trip(u):
    assert parse_unit(str(u)) == u
    assert str(parse_unit(str(u))) == str(u)


def test_unit_forms():
    assert str(Head(3, 5)) == "L3.H5"
    assert str(KVHead(3, 1)) == "L3.KV1"
    assert str(Neuron(2, 1024)) == "L2.N1024"
    assert str(Linear(4, "mlp.down_proj")) == "L4.mlp.down_proj"
    assert parse_units("L0.H1, L1.N2") == [Head(0, 1), Neuron(1, 2)]


@pytest.mark.parametrize("bad", ["L3H5", "H5", "L-1.H2", "L1.X3", "L1.foo.bar", "", "L1.attn."])
def test_bad_unit_strings(bad):
    with pytest.raises(UnitError, match="cannot parse unit"):
        parse_unit(bad)


def test_bad_kind():
    with pytest.raises(UnitError, match="valid kinds are: head, kv_head, neuron, linear"):
        normalize_kinds("layer")


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    tok = word_tokenizer(tmp_path_factory.mktemp("tok"))
    return ModelPair.load((tiny_model("llama", seed=0), tok), (tiny_model("llama", seed=1), tok))


@pytest.mark.parametrize(
    "unit, message",
    [
        ("L2.H0", r"valid layers are 0\.\.1"),
        ("L0.H4", r"valid heads are 0\.\.3"),
        ("L0.KV2", r"valid groups are 0\.\.1"),
        ("L1.N48", r"valid neurons are 0\.\.47"),
        ("L0.mlp.fc1", r"valid names: attn.q_proj, attn.k_proj"),
    ],
)
def test_unit_out_of_range(llama_pair, unit, message):
    with pytest.raises(UnitError, match=message):
        llama_pair.validate(unit)


def test_enumeration_and_param_counts(llama_pair):
    d = llama_pair.layout.dims
    assert len(llama_pair.units("head")) == d.n_layers * d.H
    assert len(llama_pair.units("kv_head")) == d.n_layers * d.KV
    assert len(llama_pair.units("neuron")) == d.n_layers * d.I
    assert len(llama_pair.units("linear")) == d.n_layers * 7
    # A head is q rows + o columns; a gated neuron is gate row + up row + down column.
    assert llama_pair.n_params("L0.H0") == 2 * d.dh * d.D
    assert llama_pair.n_params("L0.KV0") == 2 * d.dh * d.D
    assert llama_pair.n_params("L0.N0") == 3 * d.D
    assert llama_pair.n_params("L0.attn.q_proj") == d.H * d.dh * d.D


def test_unsupported_architecture_lists_supported():
    from transformers import BloomConfig

    with pytest.raises(UnsupportedArchitectureError, match="Supported model types: .*gpt2.*llama"):
        bind_layout(BloomConfig(), {})
    with pytest.raises(UnsupportedArchitectureError, match="bloom"):
        family_for("bloom")


# ---- semantic checks: a unit's slices are exactly that unit in the hooked model -----------


def _random_pair(family: str, tok) -> ModelPair:
    """Source and target are independent random inits of the same architecture."""
    return ModelPair.load((tiny_model(family, seed=11), tok), (tiny_model(family, seed=12), tok))


def _cache(side, ids, layer, ablate=None):
    hooks = []
    if ablate is not None:
        name, idx = ablate

        def zero(t, hook):
            t = t.clone()
            if t.ndim == 4:  # [batch, pos, head, d_head]
                t[:, :, idx, :] = 0.0
            else:  # [batch, pos, neuron]
                t[..., idx] = 0.0
            return t

        hooks.append((name, zero))
    names = {f"blocks.{layer}.attn.hook_{x}" for x in ("q", "k", "v", "out")} | {
        f"blocks.{layer}.mlp.hook_post",
        f"blocks.{layer}.mlp.hook_out",
    }
    names |= {f"blocks.{layer}.{rel}" for rel in side.layout.family.joint_norms.values()}
    store = {}

    def saver(name):
        def save(t, hook):
            store[name] = t.detach().clone()

        return save

    with torch.no_grad():
        side.bridge.run_with_hooks(ids, fwd_hooks=hooks + [(n, saver(n)) for n in names])
    return store


def _differs(a, b, dim):
    """Indices along ``dim`` where a and b differ."""
    d = (a - b).abs().movedim(dim, 0).reshape(a.shape[dim], -1).amax(-1)
    return set(torch.nonzero(d > 1e-6).flatten().tolist())


def _check_joint_norm(before, after, n_units: int, moved: int) -> None:
    """A norm shared by the layer's units (``FamilyLayout.joint_norms``): moving unit
    ``moved`` changes its own normalised slice, and every other unit's slice by one
    common factor per position (the shared RMS), not by nothing and not arbitrarily."""
    b = before.reshape(*before.shape[:2], n_units, -1)  # [batch, pos, unit, d]
    a = after.reshape(*after.shape[:2], n_units, -1)
    assert (a[:, :, moved] - b[:, :, moved]).abs().max() > 1e-4
    others = [u for u in range(n_units) if u != moved]
    bo, ao = b[:, :, others].flatten(2), a[:, :, others].flatten(2)
    scale = ao.norm(dim=-1, keepdim=True) / bo.norm(dim=-1, keepdim=True)  # [batch, pos, 1]
    assert (scale - 1).abs().max() > 1e-6, "the table declares a joint norm, but none couples"
    torch.testing.assert_close(ao, scale * bo, atol=1e-5, rtol=1e-5)


def test_head_slices_are_that_head(family, tokenizer_dir):
    from transformers import AutoTokenizer

    pair = _random_pair(family, AutoTokenizer.from_pretrained(tokenizer_dir))
    joint = pair.layout.family.joint_norms.get("head")
    ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33]])
    layer, h = 1, 2
    before = _cache(pair.target, ids, layer)
    with transplant(pair, [Head(layer, h)], kv="none"):
        after = _cache(pair.target, ids, layer)
        abl_after = _cache(pair.target, ids, layer, ablate=(f"blocks.{layer}.attn.hook_z", h))
    abl_before = _cache(pair.target, ids, layer, ablate=(f"blocks.{layer}.attn.hook_z", h))
    q = f"blocks.{layer}.attn.hook_q"
    assert _differs(before[q], after[q], 2) == {h}
    for kv in ("k", "v"):
        n = f"blocks.{layer}.attn.hook_{kv}"
        assert _differs(before[n], after[n], 2) == set()
    out = f"blocks.{layer}.attn.hook_out"
    assert (before[out] - after[out]).abs().max() > 1e-4
    if joint is not None:
        # Head h's q rows change the shared q norm, so every head's normalised q (and so
        # the other heads' z) moves: what holds is the common rescale, checked here.
        n = f"blocks.{layer}.{joint}"
        _check_joint_norm(before[n], after[n], pair.layout.dims.H, h)
        assert (abl_before[out] - abl_after[out]).abs().max() > 0
        return
    # With head h's z zeroed, nothing else in the attention output may differ: the o-columns
    # we moved are exactly head h's.
    torch.testing.assert_close(abl_before[out], abl_after[out], atol=1e-5, rtol=1e-5)


def test_kv_and_neuron_slices_are_that_unit(family, tokenizer_dir):
    from transformers import AutoTokenizer

    pair = _random_pair(family, AutoTokenizer.from_pretrained(tokenizer_dir))
    joint = pair.layout.family.joint_norms.get("kv_head")
    ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33]])
    layer = 0
    g = pair.layout.dims.KV - 1
    before = _cache(pair.target, ids, layer)
    with transplant(pair, [KVHead(layer, g)]):
        after = _cache(pair.target, ids, layer)
    assert (
        _differs(before[f"blocks.{layer}.attn.hook_q"], after[f"blocks.{layer}.attn.hook_q"], 2)
        == set()
    )
    assert _differs(
        before[f"blocks.{layer}.attn.hook_k"], after[f"blocks.{layer}.attn.hook_k"], 2
    ) == {g}
    assert _differs(
        before[f"blocks.{layer}.attn.hook_v"], after[f"blocks.{layer}.attn.hook_v"], 2
    ) == {g}
    if joint is not None:  # the k rows of group g change the k norm every group shares
        n = f"blocks.{layer}.{joint}"
        _check_joint_norm(before[n], after[n], pair.layout.dims.KV, g)

    i = 7
    post = f"blocks.{layer}.mlp.hook_post"
    with transplant(pair, [Neuron(layer, i)]):
        after = _cache(pair.target, ids, layer)
        abl_after = _cache(pair.target, ids, layer, ablate=(post, i))
    abl_before = _cache(pair.target, ids, layer, ablate=(post, i))
    assert _differs(before[post], after[post], 2) == {i}
    out = f"blocks.{layer}.mlp.hook_out"
    torch.testing.assert_close(abl_before[out], abl_after[out], atol=1e-5, rtol=1e-5)


def test_joint_norms_are_declared_where_norms_span_units(family):
    """A q/k norm whose weight spans more than one head is joint: the table must say so
    (``joint_norms``), or the isolation tests above would pass on pre-norm hooks only."""
    model = tiny_model(family)
    layout = bind_layout(model.config, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    joint = layout.family.joint_norms
    for kind, norm in (("head", "q_norm"), ("kv_head", "k_norm")):
        name = layout.prefix(0) + f"self_attn.{norm}.weight"
        if name not in layout.shapes:
            assert kind not in joint, f"{family}: joint_norms[{kind!r}] but no {norm}"
            continue
        spans = layout.shapes[name][0] > layout.dims.dh
        assert spans == (kind in joint), f"{family}: {name} {layout.shapes[name]} vs joint_norms"
