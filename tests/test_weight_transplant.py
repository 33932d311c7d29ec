"""Weight-mask transplants have every guarantee unit transplants have.

Per family: the blend ``w <- w_t + alpha*m*(w_s - w_t)`` is ``blend_values`` on the
masked weights and nothing elsewhere; the revert is bit-exact (also after an
exception); the export reloads to the evaluated logits; the out-of-core apply of the
exported manifest (mask file beside it) gives the same bits. Then: the manifest's
mask file (round trip, SHA-256 checks, tampering), compounding, sharded bfloat16
checkpoints read a few rows at a time, GPT-2's unprefixed names, the CLI, and
plans over whole tensors that keep no per-weight index.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_transplant import ModelPair, apply_transplant, export_hf, out_of_core, transplant
from tl_transplant.cli import main
from tl_transplant.edit.budget import block_params
from tl_transplant.edit.edits import TransplantError, blend_values, plan_transplant
from tl_transplant.edit.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MASK_FILE_RE,
    Manifest,
    ManifestError,
    read_manifest,
    write_manifest,
)
from tl_transplant.edit.weights import WeightMask, file_sha256, unit_mask
from tl_transplant.io.out_of_core import OutOfCoreError, apply_manifest_out_of_core
from tl_transplant.testing import (
    perturbed_copy,
    same_state,
    snapshot_side,
    tiny_model,
    word_tokenizer,
)

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 2]])


# ---- helpers ----------------------------------------------------------------------------


def _mask(pair: ModelPair, seed: int = 0, p: float = 0.1) -> WeightMask:
    """About ``p`` of every block tensor's weights, plus the last block tensor whole."""
    g = torch.Generator().manual_seed(seed)
    names = pair.layout.unit_tensors()
    bools = {n: torch.rand(pair.layout.shapes[n], generator=g) < p for n in names}
    bools[names[-1]] = torch.ones(pair.layout.shapes[names[-1]], dtype=torch.bool)
    return WeightMask.from_bool(bools)


def _logits(pair: ModelPair) -> torch.Tensor:
    with torch.no_grad():
        return pair.target.bridge(IDS, return_type="logits")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    """The model's stored tensors (the mask files beside the manifest left out)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        if not MASK_FILE_RE.match(f.name):
            out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_same_stored(a_dir: Path, b_dir: Path, touched: set[str]) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    for k in set(a) & set(b):
        assert _same_bits(a[k], b[k]), k
    assert touched <= set(a) & set(b)


def _reload(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def _mask_record(d: Path) -> dict:
    (rec,) = json.loads((d / MANIFEST_NAME).read_text())["transplants"]
    return rec


# ---- every family -------------------------------------------------------------------------


def test_mask_transplant_every_family(family: str, pair_dirs, tmp_path: Path) -> None:
    s_dir, t_dir = pair_dirs(family)
    pair = ModelPair.load(s_dir, t_dir)
    mask = _mask(pair)
    tgt, src = pair.target.params, pair.source.params
    orig = {n: tgt[n].detach().clone() for n in pair.layout.unit_tensors()}
    snap = snapshot_side(pair.target)
    base = _logits(pair)

    plan = plan_transplant(pair, mask)
    assert plan.n_params == mask.n_params and plan.requested == ()
    assert set(plan.index.full) == {pair.layout.unit_tensors()[-1]}  # the whole tensor
    for n in mask.names:
        assert torch.equal(plan.masks[n], mask.to_bool(n)), n

    with transplant(pair, mask, 0.0):
        assert same_state(snap, snapshot_side(pair.target))  # alpha 0: nothing moves
    with transplant(pair, mask, 1.0):  # source values on masked weights, target elsewhere
        for n, before in orig.items():
            m = mask.to_bool(n) if n in mask.index else torch.zeros_like(before, dtype=torch.bool)
            assert torch.equal(tgt[n][m], src[n][m].to(before.dtype)), n
            assert torch.equal(tgt[n][~m], before[~m]), n
    with transplant(pair, mask, 0.37):  # the blend is blend_values, elementwise
        for n in mask.names:
            m = mask.to_bool(n)
            want = orig[n].clone()
            want[m] = blend_values(n, orig[n][m], src[n][m], 0.37)
            assert _same_bits(tgt[n].detach(), want), n
        moved = _logits(pair)
        assert (moved - base).abs().max() > 1e-4
    assert same_state(snap, snapshot_side(pair.target))
    with pytest.raises(RuntimeError, match="boom"), transplant(pair, mask, 0.8):
        raise RuntimeError("boom")
    assert same_state(snap, snapshot_side(pair.target))  # reverted after the exception

    # Permanent: the export reloads to the bridge's logits, with its mask file beside it.
    m = apply_transplant(pair, mask, 0.37)
    bridged = _logits(pair)
    torch.testing.assert_close(bridged, moved, atol=0, rtol=0)
    mem = export_hf(pair, tmp_path / "mem")
    with torch.no_grad():
        diff = (_reload(mem)(IDS).logits - bridged).abs().max().item()
    assert diff <= 1e-5, f"{family}: export max|logit diff| {diff:.2e}"
    rec = _mask_record(mem)
    assert rec["units"] == [] and rec["weights"] == m.weights
    assert file_sha256(mem / rec["weights"]["file"]) == rec["weights"]["sha256"]
    assert read_manifest(mem).manifests()[0].mask == mask

    # Out of core on the checkpoints: the same bits, hashes verified, the mask carried.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ooc = apply_manifest_out_of_core(s_dir, t_dir, mem, tmp_path / "ooc")
    _assert_same_stored(mem, ooc, {r["name"] for r in m.tensors})
    assert (ooc / rec["weights"]["file"]).read_bytes() == (mem / rec["weights"]["file"]).read_bytes()
    out_rec = _mask_record(ooc)
    assert out_rec["weights"] == rec["weights"]
    assert out_rec["extra"]["out_of_core"]["hash_notes"] == []


# ---- sharded bfloat16 checkpoints, compounding, chunked reads ------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("wt_tok"))


def test_sharded_bf16_sequential_and_compounding(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 source, bf16 target in 20KB shards; mask, units, then an overlapping mask."""
    monkeypatch.setattr(out_of_core, "CHUNK_BYTES", 100)  # a few rows per read
    base = tiny_model("qwen2")
    s = perturbed_copy(base, 0.2, 1)
    s.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    base.to(torch.bfloat16).save_pretrained(tmp_path / "t", max_shard_size="20KB")
    for d in ("s", "t"):
        tok.save_pretrained(tmp_path / d)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) >= 3
    pair = ModelPair.load(tmp_path / "s", tmp_path / "t")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert pair.target.params[q].dtype == torch.bfloat16

    m1 = _mask(pair, seed=1, p=0.05)
    apply_transplant(pair, m1, 0.5)
    with pytest.warns(UserWarning, match=r"weight\(s\) that earlier"):
        mu = apply_transplant(pair, ["L0.H1", "L1.N3"], 0.25)
    want = unit_mask(pair.layout, ["L0.H1", "L1.N3"]).index
    n_common = sum(int(torch.isin(m1.index[n], i).sum()) for n, i in want.items() if n in m1.index)
    assert mu.extra["compounds_with"] == [{"transplant": 0, "weights": n_common, "alpha": 0.5}]
    m2 = _mask(pair, seed=2, p=0.05)
    with pytest.warns(UserWarning, match="compound"):
        m3 = apply_transplant(pair, m2, 1.0)
    both = sum(int(torch.isin(m2.index[n], i).sum()) for n, i in m1.index.items() if n in m2.index)
    assert m3.extra["compounds_with"][0] == {"transplant": 0, "weights": both, "alpha": 0.5}
    assert m3.extra["compounds_with"][1]["transplant"] == 1

    mem = export_hf(pair, tmp_path / "mem")
    doc = json.loads((mem / MANIFEST_NAME).read_text())
    assert [bool(r["units"]) for r in doc["transplants"]] == [False, True, False]
    assert len(list(mem.glob("weights-*.safetensors"))) == 2
    ooc = apply_manifest_out_of_core(tmp_path / "s", tmp_path / "t", mem, tmp_path / "ooc")
    _assert_same_stored(mem, ooc, {q})
    assert sorted(p.name for p in ooc.glob("weights-*")) == sorted(
        p.name for p in mem.glob("weights-*")
    )
    # The output's own manifest, applied to the output, is refused: its hashes say the
    # tensors were already moved (no silent compounding).
    with pytest.raises(OutOfCoreError, match="strict=False"):
        apply_manifest_out_of_core(tmp_path / "s", ooc, ooc, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_checkpoint_without_base_prefix(tok, tmp_path: Path) -> None:
    """GPT-2 stores ``h.0...``: the mask is over HF model names, mapped to stored names."""
    dirs = {}
    base = tiny_model("gpt2")
    for role, model in (("source", perturbed_copy(base, 0.2, 3)), ("target", base)):
        d = tmp_path / role
        model.save_pretrained(d)
        tok.save_pretrained(d)
        sd = load_file(d / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in sd.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs[role] = d
    pair = ModelPair.load(dirs["source"], dirs["target"])
    mask = _mask(pair, seed=4)
    assert "transformer.h.0.attn.c_attn.weight" in mask.index
    mem = export_hf(pair, tmp_path / "mem", apply_transplant(pair, mask, 0.6))
    ooc = apply_manifest_out_of_core(dirs["source"], dirs["target"], mem, tmp_path / "ooc")
    assert "h.0.attn.c_attn.weight" in _weights(ooc)
    sa, sb = _reload(mem).state_dict(), _reload(ooc).state_dict()
    assert all(_same_bits(sa[k], sb[k]) for k in sa)


# ---- the manifest's mask file -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(pair_dirs):
    s, t = pair_dirs("llama")
    return s, t, ModelPair.load(s, t)


def test_manifest_round_trip_and_bad_files(llama, tmp_path: Path) -> None:
    _, _, pair = llama
    mask = _mask(pair, seed=5)
    with transplant(pair, mask, 0.5) as t:
        m = t.manifest()
    assert m.mask is mask and m.units == [] and m.kv_added == []
    assert m.n_params_moved == mask.n_params and m.n_units_by_kind == {"weight": mask.n_params}
    assert sum(r["n_changed"] for r in m.tensors) == mask.n_params
    w = m.weights
    assert w is not None
    assert w == {"file": f"weights-{mask.sha256[:16]}.safetensors", "sha256": mask.file_sha256,
                 "mask_sha256": mask.sha256, "n_params": mask.n_params,
                 "tensors": mask.counts()}
    assert "mask" not in m.to_dict()  # the mask lives in its file, not in the JSON

    d = tmp_path / "a"
    d.mkdir()
    p = write_manifest(d, m)
    f = d / w["file"]
    assert f.is_file() and file_sha256(f) == w["sha256"]
    back = Manifest.load(p)
    assert back.mask == mask and back.weights == w and back.to_dict() == m.to_dict()
    assert read_manifest(p).masks == {mask.sha256: mask}
    (tmp_path / "bare").mkdir()
    m.save(tmp_path / "bare" / "one.json")
    assert Manifest.load(tmp_path / "bare" / "one.json").mask == mask

    # Missing or altered mask file: a clear error naming it and what to do.
    moved = shutil.copytree(d, tmp_path / "copy")
    (moved / w["file"]).unlink()
    with pytest.raises(ManifestError, match=rf"mask file {w['file']} is missing.*Put the"):
        read_manifest(moved)
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    (moved / w["file"]).write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"does not match the SHA-256.*Restore the original"):
        Manifest.load(moved / MANIFEST_NAME)
    # A dict record carries no mask: writing it refuses rather than naming a missing file.
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ManifestError, match="not at hand"):
        write_manifest(tmp_path / "fresh", m.to_dict())
    assert not (tmp_path / "fresh" / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"units": ["L0.H0"]}, "names units and a weight mask"),
        ({"weights": None}, "names no units"),
        ({"weights": "x"}, "weights must be an object"),
        ({"weights": {"file": "../w.safetensors", "sha256": "a", "mask_sha256": "b"}},
         "bare file name"),
        ({"weights": {"file": "w.safetensors"}}, "lacks sha256, mask_sha256"),
    ],
)
def test_bad_weight_records(change: dict, match: str) -> None:
    rec = {"format": MANIFEST_FORMAT, "units": [], "alpha": 0.5,
           "weights": {"file": "w.safetensors", "sha256": "a", "mask_sha256": "b"}}
    rec.update(change)
    with pytest.raises(ManifestError, match=match):
        read_manifest(rec)


def test_compounding_warnings(llama) -> None:
    s, t, _ = llama
    pair = ModelPair.load(s, t)
    m1 = _mask(pair, seed=6, p=0.02)
    apply_transplant(pair, ["L1.mlp.down_proj"], 0.5)
    with pytest.warns(UserWarning, match="compound") as rec:
        got = apply_transplant(pair, m1, 0.25)
    assert len(rec) == 1
    down = m1.counts()["model.layers.1.mlp.down_proj.weight"]
    assert got.extra["compounds_with"] == [{"transplant": 0, "weights": down, "alpha": 0.5}]
    # A mask disjoint from every earlier transplant: no warning, nothing recorded.
    other = WeightMask({"model.layers.0.mlp.up_proj.weight": [0]},
                       {"model.layers.0.mlp.up_proj.weight":
                        pair.layout.shapes["model.layers.0.mlp.up_proj.weight"]})
    assert 0 not in m1.index.get("model.layers.0.mlp.up_proj.weight", torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "compounds_with" not in apply_transplant(pair, other, 0.5).extra


def test_cli_apply_and_dict_without_mask(llama, tmp_path: Path, capsys) -> None:
    s, t, _ = llama
    pair = ModelPair.load(s, t)
    mask = _mask(pair, seed=7)
    mem = export_hf(pair, tmp_path / "mem", apply_transplant(pair, mask, 0.75))
    man = mem / MANIFEST_NAME
    args = ["apply", "--source", str(s), "--target", str(t), "--manifest", str(man)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "tensors blended" in capsys.readouterr().out
    _assert_same_stored(mem, tmp_path / "o", set(mask.names))
    assert read_manifest(tmp_path / "o").manifests()[0].mask == mask
    # A record dict without its mask file at hand: a clear error, nothing written.
    rec = _mask_record(mem)
    with pytest.raises(OutOfCoreError, match="not at hand"):
        apply_manifest_out_of_core(s, t, rec, tmp_path / "x")
    # The manifest copied away from its mask file: the file is named.
    lone = tmp_path / "lone.json"
    shutil.copy(man, lone)
    assert main([*args[:-1], str(lone), "--out", str(tmp_path / "y")]) == 2
    assert rec["weights"]["file"] in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---- plans over whole tensors --------------------------------------------------------------


def test_whole_tensor_plans_keep_no_index(llama) -> None:
    _, _, pair = llama
    plan = plan_transplant(pair, pair.units("linear"))
    assert plan.index.partial == {} and set(plan.index) == set(pair.layout.unit_tensors())
    assert plan.n_params == block_params(pair.layout)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(plan.index[q], torch.arange(math.prod(pair.layout.shapes[q])))
    assert bool(plan.masks[q].all())
    # Every neuron of a layer covers up/gate rows and down columns whole; heads do not.
    heads = plan_transplant(pair, [u for u in pair.units("head") if u.layer == 0], kv="none")
    neurons = plan_transplant(pair, [u for u in pair.units("neuron") if u.layer == 1])
    assert set(neurons.index.full) >= {"model.layers.1.mlp.down_proj.weight",
                                      "model.layers.1.mlp.up_proj.weight"}
    assert q in heads.index.full and "model.layers.0.self_attn.k_proj.weight" not in heads.index
    snap = snapshot_side(pair.target)
    with transplant(pair, pair.units("linear"), 0.5) as t:
        m = t.manifest()
        assert all(r["n_changed"] == math.prod(r["shape"]) for r in m.tensors)
        assert all(r["sha256"] != r["sha256_before"] for r in m.tensors)
    assert same_state(snap, snapshot_side(pair.target))


def test_refusal_mid_plan_leaves_the_model_untouched(llama) -> None:
    s, t, _ = llama
    pair = ModelPair.load(s, t)
    last = pair.layout.unit_tensors()[-1]  # edited after the layer-0 tensors (name order)
    with torch.no_grad():
        pair.source.params[last].view(-1)[3] = float("nan")
    snap = snapshot_side(pair.target)
    for sel in (pair.units("linear"), _mask(pair, seed=8)):
        with pytest.raises(TransplantError, match="NaN or inf"):
            transplant(pair, sel, 0.5).apply()
        assert same_state(snap, snapshot_side(pair.target)) and not pair.active
