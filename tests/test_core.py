"""Pair loading, reversible transplants and exact HF export, for every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from tl_transplant import (
    ExportError,
    IncompatiblePairError,
    ModelLoadError,
    ModelPair,
    NonFiniteWeightsError,
    TransplantError,
    apply_transplant,
    export_hf,
    transplant,
)
from tl_transplant.testing import tiny_model, word_tokenizer

IDS = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41], [1, 60, 61, 62, 3, 4, 88, 90]])
UNIT_KINDS = ("head", "kv_head", "neuron")


def logits(side, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return side.bridge(ids, return_type="logits")


def snapshot(side) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in side.params.items()}


def assert_params_equal(side, snap) -> None:
    for k, v in side.params.items():
        assert torch.equal(v.detach(), snap[k]), f"{k} changed"
    for mirror, parts in side.mirrors:
        from tl_transplant.models.side import gather_slices

        assert torch.equal(mirror.detach(), gather_slices(side.params, parts))


def unit_only_pair(family: str, tok) -> ModelPair:
    """A pair whose source differs from the target only inside head/KV/neuron slices.

    Moving every such unit with alpha=1 must therefore turn the target into the source.
    """
    pair = ModelPair.load((tiny_model(family, seed=3), tok), (tiny_model(family, seed=3), tok))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for u in pair.units(UNIT_KINDS):
            for s in pair.layout.slices(u):
                view = pair.source.params[s.param].narrow(s.dim, s.start, s.size)
                view.add_(0.3 * torch.randn(view.shape, generator=gen))
    pair.source.refresh_mirrors()
    return pair


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def test_alpha_zero_is_identity(family, tok):
    pair = unit_only_pair(family, tok)
    base = logits(pair.target)
    with transplant(pair, pair.units(UNIT_KINDS + ("linear",)), alpha=0.0):
        assert torch.equal(logits(pair.target), base)


def test_alpha_one_over_all_units_gives_source(family, tok):
    pair = unit_only_pair(family, tok)
    src = logits(pair.source)
    snap = snapshot(pair.target)
    assert (logits(pair.target) - src).abs().max() > 1e-2  # the pair really differs
    with transplant(pair, pair.units(UNIT_KINDS), alpha=1.0):
        for u in pair.units(UNIT_KINDS):
            for s in pair.layout.slices(u):
                assert torch.equal(
                    pair.target.params[s.param].narrow(s.dim, s.start, s.size),
                    pair.source.params[s.param].narrow(s.dim, s.start, s.size),
                ), f"{u} slice {s}"
        torch.testing.assert_close(logits(pair.target), src, atol=1e-5, rtol=1e-5)
    assert_params_equal(pair.target, snap)


def test_linear_units_cover_whole_tensors(family, tok):
    pair = ModelPair.load((tiny_model(family, seed=1), tok), (tiny_model(family, seed=2), tok))
    with transplant(pair, pair.units("linear"), alpha=1.0):
        for n in pair.layout.unit_tensors():
            assert torch.equal(pair.target.params[n], pair.source.params[n]), n


def test_revert_is_bit_exact_even_after_exception(family, tok):
    pair = ModelPair.load((tiny_model(family, seed=1), tok), (tiny_model(family, seed=2), tok))
    snap = snapshot(pair.target)
    base = logits(pair.target)
    with pytest.raises(RuntimeError, match="boom"):
        with transplant(
            pair, ["L0.H1", "L1.N3", "L1.KV0", "L0." + pair.layout.linear_names()[0]], alpha=0.37
        ):
            assert not torch.equal(logits(pair.target), base)
            raise RuntimeError("boom")
    assert_params_equal(pair.target, snap)
    assert torch.equal(logits(pair.target), base)
    assert pair.active == []


def test_bridge_hf_and_export_agree_after_transplant(family, tok, tmp_path):
    pair = ModelPair.load((tiny_model(family, seed=1), tok), (tiny_model(family, seed=2), tok))
    base = logits(pair.target)
    m = apply_transplant(
        pair, ["L0.H1", "L1.N3", "L1." + pair.layout.linear_names()[-1]], alpha=0.6
    )
    bridged = logits(pair.target)
    assert (bridged - base).abs().max() > 1e-4

    # A plain HF model built from the exported tensors computes what the bridge computed.
    plain = AutoModelForCausalLM.from_config(pair.target.config, attn_implementation="eager").eval()
    plain.load_state_dict(pair.target.state_dict(), strict=False)
    plain.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, bridged, atol=1e-5, rtol=1e-5)

    out = export_hf(pair, tmp_path / "export")
    re = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.get_vocab() == tok.get_vocab()
    with torch.no_grad():
        diff = (re(IDS).logits - bridged).abs().max().item()
    print(f"export max|logit diff| {family}: {diff:.2e}")
    assert diff <= 1e-5
    manifest = json.loads((out / "transplant_manifest.json").read_text())
    rec = manifest["transplants"][0]
    assert rec["units"] == [str(u) for u in m.units] and rec["alpha"] == 0.6
    assert rec["kv_added"] == [str(pair.layout.kv_group_of(pair.validate("L0.H1")))]
    # The manifest hashes are the hashes of the tensors that were written.
    from safetensors.torch import load_file

    from tl_transplant.edit.edits import tensor_sha256

    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(f))
    for row in rec["tensors"]:
        assert tensor_sha256(written[row["name"]]) == row["sha256"]
        assert row["sha256"] != row["sha256_before"]

    # Loading the export as a pair side works too (round trip through a local dir).
    again = ModelPair.load(out, out)
    torch.testing.assert_close(logits(again.target), bridged, atol=1e-5, rtol=1e-5)


def test_kv_group_mode(tok):
    pair = ModelPair.load((tiny_model("llama", seed=1), tok), (tiny_model("llama", seed=2), tok))
    with transplant(pair, ["L1.H3"]) as t:
        assert [str(u) for u in t.plan.kv_added] == ["L1.KV1"]
        assert t.manifest().kv_added == ["L1.KV1"]
    with transplant(pair, ["L1.H3"], kv="none") as t:
        assert t.plan.kv_added == ()
        k = pair.layout.param_name(1, "attn.k_proj.weight")
        assert torch.equal(pair.target.params[k], pair.source.params[k]) is False
    with pytest.raises(TransplantError, match="kv must be 'group' or 'none'"):
        transplant(pair, ["L1.H3"], kv="all")


def test_overlapping_units_blend_once(tok):
    pair = ModelPair.load((tiny_model("llama", seed=1), tok), (tiny_model("llama", seed=2), tok))
    q = pair.layout.param_name(0, "attn.q_proj.weight")
    t0, s0 = pair.target.params[q].detach().clone(), pair.source.params[q].detach().clone()
    with transplant(pair, ["L0.H0", "L0.attn.q_proj"], alpha=0.5):
        expect = 0.5 * t0 + 0.5 * s0
        assert torch.equal(pair.target.params[q], expect)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), alpha=st.floats(0.0, 1.0, allow_nan=False))
def test_property_random_unit_sets(data, alpha, tok, neox_pair):
    pair = neox_pair
    all_units = pair.units(UNIT_KINDS + ("linear",))
    chosen = data.draw(st.lists(st.sampled_from(all_units), min_size=1, max_size=12, unique=True))
    snap = snapshot(pair.target)
    with transplant(pair, chosen, alpha=alpha, kv="none") as t:
        for name, mask in t.plan.masks.items():
            now = pair.target.params[name].detach()
            src = pair.source.params[name].detach()
            expect = (
                ((1 - alpha) * snap[name] + alpha * src)
                if 0 < alpha < 1
                else (src if alpha == 1 else snap[name])
            )
            assert torch.equal(now[mask], expect[mask])
            assert torch.equal(now[~mask], snap[name][~mask])
        # the bridge's NeoX q/k/v copies follow the edit
        for mirror, parts in pair.target.mirrors:
            from tl_transplant.models.side import gather_slices

            assert torch.equal(mirror.detach(), gather_slices(pair.target.params, parts))
    assert_params_equal(pair.target, snap)


@pytest.fixture(scope="module")
def neox_pair(tok):
    return ModelPair.load(
        (tiny_model("gpt_neox", seed=1), tok), (tiny_model("gpt_neox", seed=2), tok)
    )


# ---- bad input -----------------------------------------------------------------------------


def test_alpha_range(tok, neox_pair):
    with pytest.raises(TransplantError, match=r"outside \[0, 1\]; pass allow_extrapolation=True"):
        transplant(neox_pair, ["L0.H0"], alpha=1.5)
    with transplant(neox_pair, ["L0.H0"], alpha=1.5, allow_extrapolation=True):
        pass
    with pytest.raises(TransplantError, match="finite"):
        transplant(neox_pair, ["L0.H0"], alpha=float("nan"))


def test_nan_source_refused_before_any_change(tok):
    pair = ModelPair.load(
        (tiny_model("llama", seed=1), tok), (tiny_model("llama", seed=2), tok), check_finite=False
    )
    n = pair.layout.param_name(1, "mlp.down_proj.weight")
    with torch.no_grad():
        pair.source.params[n][0, 5] = float("nan")
    snap = snapshot(pair.target)
    with pytest.raises(TransplantError, match="NaN or inf.*refusing before any weight changes"):
        with transplant(pair, ["L0.H0", "L1.N5"]):
            pass
    assert_params_equal(pair.target, snap)


def test_nan_weights_refused_at_load(tok):
    bad = tiny_model("llama", seed=1)
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(
        NonFiniteWeightsError, match="source .*NaN or inf values in model.layers.0.mlp.up_proj"
    ):
        ModelPair.load((bad, tok), (tiny_model("llama", seed=2), tok))


def test_incompatible_pairs(tok, tmp_path):
    with pytest.raises(IncompatiblePairError, match="source is a gpt2 .* but target is a llama"):
        ModelPair.load((tiny_model("gpt2"), tok), (tiny_model("llama"), tok))
    with pytest.raises(
        IncompatiblePairError,
        match=r"model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\) in source but \(48, 32\)",
    ):
        ModelPair.load((tiny_model("llama", intermediate_size=64), tok), (tiny_model("llama"), tok))
    other = word_tokenizer(tmp_path / "other", words=[f"w{i}" for i in range(90)] + ["zz", "w91"])
    with pytest.raises(
        IncompatiblePairError, match=r"tokenizers differ at 1 token id\(s\).*id 94: 'w90' vs 'zz'"
    ):
        ModelPair.load((tiny_model("llama"), tok), (tiny_model("llama"), other))
    ModelPair.load((tiny_model("llama"), tok), (tiny_model("llama"), other), check_tokenizer=False)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelPair.load(str(tmp_path / "nope"), str(tmp_path / "nope2"))
    with pytest.raises(ModelLoadError, match="needs its tokenizer"):
        ModelPair.load(tiny_model("llama"), tiny_model("llama"))
    with pytest.raises(ModelLoadError, match="expected a hub id, a local directory"):
        ModelPair.load(42, 43)


def test_in_memory_tokenizer_is_round_tripped(tmp_path):
    """A tokenizer that exists only in memory would make the bridge fail (name_or_path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(92)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    mem = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    pair = ModelPair.load((tiny_model("llama"), mem), (tiny_model("llama", seed=4), mem))
    assert pair.target.bridge.to_tokens("w1 w2", prepend_bos=True).tolist() == [[1, 5, 6]]


def test_export_refuses_non_empty_dir_and_is_atomic(tok, tmp_path, monkeypatch):
    pair = ModelPair.load((tiny_model("llama", seed=1), tok), (tiny_model("llama", seed=2), tok))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(
        ExportError, match="not empty; choose a new directory or pass overwrite=True"
    ):
        export_hf(pair, out)
    import tl_transplant.io.export as ex

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(pair, out, overwrite=True)
    assert (out / "keep.txt").exists()  # the old directory is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp leftovers
    monkeypatch.undo()
    export_hf(pair, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_export_inside_context_records_the_live_transplant(tok, tmp_path):
    pair = ModelPair.load((tiny_model("llama", seed=1), tok), (tiny_model("llama", seed=2), tok))
    with transplant(pair, ["L0.N1"], alpha=0.5):
        live = logits(pair.target)
        out = export_hf(pair, tmp_path / "e")
    rec = json.loads((Path(out) / "transplant_manifest.json").read_text())["transplants"]
    assert rec[0]["units"] == ["L0.N1"] and rec[0]["reversible_context"] is True
    re = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (re(IDS).logits - live).abs().max() <= 1e-5
