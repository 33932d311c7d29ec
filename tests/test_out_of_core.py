"""Out-of-core apply on sharded checkpoints, and multi-device (device_map) loading.

Every family: ``apply_manifest_out_of_core`` on checkpoints saved in several
shards gives the same bits as ``apply_transplant`` + ``export_hf``, tensor by
tensor and in the logits after reloading. Bad inputs fail with clear messages
and leave nothing behind.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_transplant import (
    ModelPair,
    TransplantError,
    apply_transplant,
    export_hf,
    out_of_core,
    transplant,
)
from tl_transplant.cli import add_apply_command, main
from tl_transplant.io.export import MANIFEST_NAME, ExportError
from tl_transplant.io.out_of_core import OutOfCoreError, apply_manifest_out_of_core
from tl_transplant.testing import TINY_FAMILIES, perturbed_copy, tiny_model, word_tokenizer

SHARD = "20KB"
IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 2]])


# ---- helpers ----------------------------------------------------------------------------


def _save(model, tok, path: Path, **kw) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD, **kw)
    tok.save_pretrained(path)
    return path


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _reload(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def _assert_same_model(a_dir: Path, b_dir: Path) -> None:
    """Equal bits in every shared stored tensor, and after reloading, every tensor and logit."""
    a, b = _tensors(a_dir), _tensors(b_dir)
    for k in set(a) & set(b):
        assert _same_bits(a[k], b[k]), k
    # Names may differ only by the checkpoint's own spelling (GPT-NeoX embed_out = lm_head).
    assert len(set(a) ^ set(b)) <= 2, sorted(set(a) ^ set(b))
    ma, mb = _reload(a_dir), _reload(b_dir)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert _same_bits(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(ma(IDS).logits, mb(IDS).logits)


def _no_tmp_left(parent: Path) -> bool:
    return not any(".tmp-" in p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("ooc_tok"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, tok):
    """Factory: (source_dir, target_dir) of a family saved in several shards, built once."""
    root = tmp_path_factory.mktemp("ooc")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            tgt = tiny_model(family)
            src = perturbed_copy(tgt, scale=0.2, seed=1)
            cache[family] = (
                _save(src, tok, root / family / "source"),
                _save(tgt, tok, root / family / "target"),
            )
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llama_run(sharded, tmp_path_factory: pytest.TempPathFactory):
    """A llama in-memory transplant exported with its manifest (for the error tests)."""
    s, t = sharded("llama")
    pair = ModelPair.load(s, t)
    m = apply_transplant(pair, ["L0.H1", "L1.N5"], 0.5)
    out = export_hf(pair, tmp_path_factory.mktemp("llama_mem") / "out", m)
    return s, t, out / MANIFEST_NAME


def _units(pair: ModelPair) -> list[str]:
    return ["L0.H1", "L1.N5", f"L1.{pair.layout.linear_names()[-1]}", "L0.KV0"]


# ---- bit-identity with the in-memory path -------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_matches_in_memory(
    family: str, sharded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, t = sharded(family)
    shards = sorted(p.name for p in t.glob("*.safetensors"))
    assert len(shards) >= 3
    pair = ModelPair.load(s, t)
    m = apply_transplant(pair, _units(pair), 0.37)
    mem = export_hf(pair, tmp_path / "mem", m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hashes must verify: no mismatch warning
        ooc = apply_manifest_out_of_core(s, t, mem / MANIFEST_NAME, tmp_path / "ooc")
    _assert_same_model(mem, ooc)

    # Same shard layout and index as the target; untouched shards are byte-for-byte copies.
    assert sorted(p.name for p in ooc.glob("*.safetensors")) == shards
    idx = json.loads((ooc / "model.safetensors.index.json").read_text())
    assert (
        idx["weight_map"]
        == json.loads((t / "model.safetensors.index.json").read_text())["weight_map"]
    )
    touched = {r["name"] for r in m.tensors}
    touched_files = {idx["weight_map"][n] for n in touched}
    for f in shards:
        assert filecmp.cmp(t / f, ooc / f, shallow=False) == (f not in touched_files), f
    after, before = _tensors(ooc), _tensors(t)
    assert all(not torch.equal(after[n], before[n]) for n in touched)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ooc / f).read_bytes() == (t / f).read_bytes()
    doc = json.loads((ooc / MANIFEST_NAME).read_text())
    (rec,) = doc["transplants"]
    assert rec["units"] == m.units and rec["alpha"] == 0.37
    assert rec["extra"]["out_of_core"]["tensors_blended"] == len(touched)
    assert rec["extra"]["out_of_core"]["hash_notes"] == []

    # Blending a few rows at a time (as big tensors are) gives the same bytes, hashes included.
    monkeypatch.setattr(out_of_core, "CHUNK_BYTES", 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = apply_manifest_out_of_core(s, t, mem / MANIFEST_NAME, tmp_path / "rows")
    for f in shards:
        assert filecmp.cmp(ooc / f, rows / f, shallow=False), f
    assert _no_tmp_left(tmp_path)


def test_sequential_transplants_mixed_dtypes(
    sharded, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two transplants in a row (overlapping), bf16 target and fp32 source: same bits."""
    monkeypatch.setattr(out_of_core, "CHUNK_BYTES", 100)
    s, _ = sharded("qwen2")
    t = _save(tiny_model("qwen2").to(torch.bfloat16), tok, tmp_path / "t_bf16")
    pair = ModelPair.load(s, t)
    assert pair.target.params["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    apply_transplant(pair, ["L0.H0", "L1.H3", "L1.N2"], 1.0)
    with pytest.warns(UserWarning, match="compound"):
        apply_transplant(pair, ["L1.mlp.up_proj", "L0.KV1", "L0.H0"], 0.25, kv="none")
    mem = export_hf(pair, tmp_path / "mem")  # writes both records
    assert len(json.loads((mem / MANIFEST_NAME).read_text())["transplants"]) == 2
    ooc = apply_manifest_out_of_core(s, t, mem, tmp_path / "ooc")  # a directory works too
    _assert_same_model(mem, ooc)


def test_alpha_zero_copies_every_shard_byte_for_byte(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    rec = json.loads(man.read_text())["transplants"][0]
    rec = {**rec, "alpha": 0.0, "tensors": []}
    out = apply_manifest_out_of_core(s, t, rec, tmp_path / "out")
    for f in t.glob("*.safetensors"):
        assert filecmp.cmp(f, out / f.name, shallow=False)


def test_hand_written_manifest_adds_kv_groups(sharded, tmp_path: Path) -> None:
    """Only format, units and alpha: KV groups come along as with ``kv="group"`` in memory."""
    s, t = sharded("mistral")
    pair = ModelPair.load(s, t)
    mem = export_hf(pair, tmp_path / "mem", apply_transplant(pair, ["L1.H3", "L0.N4"], 0.8))
    rec = {"format": "tl_transplant.edit.manifest/1", "units": ["L1.H3", "L0.N4"], "alpha": 0.8}
    ooc = apply_manifest_out_of_core(s, t, rec, tmp_path / "ooc")
    _assert_same_model(mem, ooc)


def test_checkpoint_without_base_prefix(tok, tmp_path: Path) -> None:
    """GPT-2 checkpoints on the hub store ``h.0...`` for ``transformer.h.0...``."""
    dirs = {}
    base = tiny_model("gpt2")
    for role, model in (("source", perturbed_copy(base, 0.2, 3)), ("target", base)):
        d = tmp_path / role
        model.save_pretrained(d)
        tok.save_pretrained(d)
        sd = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        save_file(
            {k.removeprefix("transformer."): v for k, v in sd.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        dirs[role] = d
    pair = ModelPair.load(dirs["source"], dirs["target"])
    mem = export_hf(pair, tmp_path / "mem", apply_transplant(pair, ["L1.H2", "L0.N7"], 0.6))
    ooc = apply_manifest_out_of_core(dirs["source"], dirs["target"], mem, tmp_path / "ooc")
    assert "h.1.attn.c_attn.weight" in _tensors(ooc)
    ma, mb = _reload(mem), _reload(ooc)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(_same_bits(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(ma(IDS).logits, mb(IDS).logits)


def test_config_dims_checked_against_shapes(tok, tmp_path: Path) -> None:
    """A config.json that leaves a dim to the class default falls back to AutoConfig."""
    base = tiny_model("gemma", head_dim=256)  # GemmaConfig's default; not hidden // heads
    dirs = {}
    for role, model in (("source", perturbed_copy(base, 0.2, 3)), ("target", base)):
        d = _save(model, tok, tmp_path / role)
        cfg = json.loads((d / "config.json").read_text())
        del cfg["head_dim"]
        (d / "config.json").write_text(json.dumps(cfg))
        dirs[role] = d
    pair = ModelPair.load(dirs["source"], dirs["target"])
    assert pair.layout.dims.dh == 256
    mem = export_hf(pair, tmp_path / "mem", apply_transplant(pair, ["L1.H3", "L0.N2"], 0.5))
    ooc = apply_manifest_out_of_core(dirs["source"], dirs["target"], mem, tmp_path / "ooc")
    _assert_same_model(mem, ooc)

    bad = tmp_path / "bad"
    shutil.copytree(dirs["target"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OutOfCoreError, match=r"d_mlp=40\) reach 40 of the 48 entries"):
        apply_manifest_out_of_core(dirs["source"], bad, mem, tmp_path / "x")


# ---- clear errors -----------------------------------------------------------------------


def _record(man: Path) -> dict:
    return json.loads(man.read_text())["transplants"][0]


def test_unit_the_checkpoint_lacks(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    rec = {**_record(man), "units": ["L7.H0"], "kv_added": [], "tensors": []}
    with pytest.raises(OutOfCoreError, match=r"'L7.H0'.*lacks.*layer 7 does not exist"):
        apply_manifest_out_of_core(s, t, rec, tmp_path / "out")
    rec = {**_record(man), "units": ["L0.mlp.nope"], "kv_added": [], "tensors": []}
    with pytest.raises(OutOfCoreError, match="no linear named 'mlp.nope'"):
        apply_manifest_out_of_core(s, t, rec, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_tmp_left(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"transplants": []}', "holds no transplants"),
        ('{"format": "other/1", "units": [], "alpha": 1}', "not a tl_transplant manifest"),
        ('{"format": "tl_transplant.edit.manifest/1", "alpha": 1}', "lacks units"),
        (
            '{"format": "tl_transplant.edit.manifest/1", "units": ["L0.H0"], "alpha": "x"}',
            "not a number",
        ),
        (
            '{"format": "tl_transplant.edit.manifest/1", "units": ["L0.H0"], "alpha": NaN}',
            "must be finite",
        ),
    ],
)
def test_bad_manifest(llama_run, tmp_path: Path, content: str, match: str) -> None:
    s, t, _ = llama_run
    p = tmp_path / "m.json"
    p.write_text(content)
    with pytest.raises(OutOfCoreError, match=match):
        apply_manifest_out_of_core(s, t, p, tmp_path / "out")
    with pytest.raises(OutOfCoreError, match="does not exist"):
        apply_manifest_out_of_core(s, t, tmp_path / "nope.json", tmp_path / "out")


def test_manifest_for_another_model(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    rec = _record(man)
    bad = {**rec, "tensors": [{**rec["tensors"][0], "shape": [3, 3]}]}
    with pytest.raises(OutOfCoreError, match="stores it with shape"):
        apply_manifest_out_of_core(s, t, bad, tmp_path / "out")
    bad = {
        **rec,
        "tensors": [
            {**rec["tensors"][0], "name": "model.layers.1.mlp.up_proj.weight"},
            *rec["tensors"][1:],
        ],
    }
    bad["units"] = ["L0.H1"]
    bad["kv_added"] = []
    with pytest.raises(OutOfCoreError, match="units do not touch it"):
        apply_manifest_out_of_core(s, t, bad, tmp_path / "out")
    bad = {**rec, "target": {**rec["target"], "family": "gpt2"}}
    with pytest.raises(OutOfCoreError, match="made for a gpt2-family model"):
        apply_manifest_out_of_core(s, t, bad, tmp_path / "out")


def test_hash_mismatch_fails_unless_allowed(llama_run, tmp_path: Path) -> None:
    s, _, man = llama_run
    t2 = tmp_path / "t2"
    shutil.copytree(s, t2)  # the source as target: shapes fit, hashes do not
    with pytest.raises(OutOfCoreError, match="strict=False"):  # the default is strict
        apply_manifest_out_of_core(s, t2, man, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and _no_tmp_left(tmp_path)
    with pytest.warns(UserWarning, match="do not match the manifest's hashes"):
        out = apply_manifest_out_of_core(s, t2, man, tmp_path / "out", strict=False)
    notes = _record(out / MANIFEST_NAME)["extra"]["out_of_core"]["hash_notes"]
    assert notes and "sha256_before" in notes[0]


def test_shapes_differ(tok, llama_run, tmp_path: Path) -> None:
    _, t, man = llama_run
    wide = _save(tiny_model("llama", intermediate_size=64), tok, tmp_path / "wide")
    with pytest.raises(OutOfCoreError, match=r"shapes differ: tensor .* in the source but"):
        apply_manifest_out_of_core(wide, t, man, tmp_path / "out")
    g2 = _save(tiny_model("gpt2"), tok, tmp_path / "g2")
    with pytest.raises(OutOfCoreError, match="same architecture"):
        apply_manifest_out_of_core(g2, t, man, tmp_path / "out")


def test_missing_and_corrupt_shards(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    shards = sorted(p.name for p in t.glob("*.safetensors"))

    def broken(name: str, how) -> Path:
        d = tmp_path / name
        shutil.copytree(t, d)
        how(d / shards[1])
        return d

    d = broken("missing", Path.unlink)
    msg = rf"missing 1 of the {len(shards)} shards.*{shards[1]}"
    with pytest.raises(OutOfCoreError, match=msg):
        apply_manifest_out_of_core(s, d, man, tmp_path / "out")

    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[:-100])

    d = broken("truncated", truncate)
    with pytest.raises(OutOfCoreError, match=rf"shard {shards[1]} is corrupt or truncated"):
        apply_manifest_out_of_core(s, d, man, tmp_path / "out")

    def garble(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        raw[8:20] = b"garbage!!!!!"
        p.write_bytes(bytes(raw))

    d = broken("garbled", garble)
    with pytest.raises(OutOfCoreError, match="header is not valid JSON"):
        apply_manifest_out_of_core(d, t, man, tmp_path / "out")  # a bad source shard too
    d = broken("tiny", lambda p: p.write_bytes(b"abc"))
    with pytest.raises(OutOfCoreError, match="less than the 8-byte header"):
        apply_manifest_out_of_core(s, d, man, tmp_path / "out")
    d = tmp_path / "badindex"
    shutil.copytree(t, d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(OutOfCoreError, match="index.json is not valid JSON"):
        apply_manifest_out_of_core(s, d, man, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_tmp_left(tmp_path)


def _to_pickles(src: Path, dst: Path) -> Path:
    """Re-save a safetensors checkpoint as two PyTorch pickle shards + index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    sd = _tensors(src)
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    wm = {}
    for i, part in enumerate(halves, 1):
        f = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, dst / f)
        wm.update(dict.fromkeys(part, f))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    return dst


def test_pickles_refused_unless_allowed(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    tp = _to_pickles(t, tmp_path / "t_bin")
    with pytest.raises(OutOfCoreError, match=r"pickle weights \(.bin\).*allow_pickle=True"):
        apply_manifest_out_of_core(s, tp, man, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="execute arbitrary code"):
        out = apply_manifest_out_of_core(s, tp, man, tmp_path / "out", allow_pickle=True)
    ref = apply_manifest_out_of_core(s, t, man, tmp_path / "ref")
    assert sorted(p.name for p in out.glob("*.bin")) == []
    assert (out / "model.safetensors.index.json").exists()
    a, b = _tensors(out), _tensors(ref)
    assert set(a) == set(b) and all(_same_bits(a[k], b[k]) for k in a)


def test_out_dir_rules(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    out = tmp_path / "out"
    apply_manifest_out_of_core(s, t, man, out)
    with pytest.raises(ExportError, match="not empty"):
        apply_manifest_out_of_core(s, t, man, out)
    apply_manifest_out_of_core(s, t, man, out, overwrite=True)
    with pytest.raises(OutOfCoreError, match="is the target checkpoint itself"):
        apply_manifest_out_of_core(s, t, man, t, overwrite=True)
    with pytest.raises(OutOfCoreError, match="contains the source checkpoint"):
        apply_manifest_out_of_core(s, t, man, Path(s).parent, overwrite=True)
    assert Path(t).is_dir() and Path(s).is_dir()
    # Re-applying onto a transplanted model keeps the earlier records as history.
    with pytest.warns(UserWarning, match="hashes"):  # the target is no longer the original
        again = apply_manifest_out_of_core(s, out, man, tmp_path / "again", strict=False)
    doc = json.loads((again / MANIFEST_NAME).read_text())
    assert len(doc["transplants"]) == 1 and len(doc["history"]) == 1


def test_hub_id_from_cache(llama_run, tmp_path: Path) -> None:
    s, t, man = llama_run
    cache = tmp_path / "cache"
    repo = cache / "models--org--tiny-target"
    shutil.copytree(t, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    out = apply_manifest_out_of_core(
        s, "org/tiny-target", man, tmp_path / "out", cache_dir=cache, local_files_only=True
    )
    ref = apply_manifest_out_of_core(s, t, man, tmp_path / "ref")
    a, b = _tensors(out), _tensors(ref)
    assert all(_same_bits(a[k], b[k]) for k in a)
    with pytest.raises(OutOfCoreError, match="'org/absent' is not a local directory"):
        apply_manifest_out_of_core(
            s, "org/absent", man, tmp_path / "x", cache_dir=cache, local_files_only=True
        )
    with pytest.raises(OutOfCoreError, match="is not a model directory"):
        apply_manifest_out_of_core(s, tmp_path / "nowhere", man, tmp_path / "x")


def test_cli(llama_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    s, t, man = llama_run
    parser = argparse.ArgumentParser(prog="tl-transplant")
    sub = parser.add_subparsers(dest="command")
    help_text = add_apply_command(sub).format_help()
    for flag in ("--source", "--target", "--manifest", "--out", "--overwrite", "--allow-pickle"):
        assert flag in help_text
    args = ["apply", "--source", str(s), "--target", str(t), "--manifest", str(man)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "tensors blended" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o"), "--overwrite"]) == 0


# ---- multi-device loading ---------------------------------------------------------------


def _cpu_map(family: str, n_layers: int = 2) -> dict[str, str]:
    top, emb, norm = {
        "llama": ("model", "embed_tokens", "norm"),
        "gpt_neox": ("gpt_neox", "embed_in", "final_layer_norm"),
    }[family]
    dm = {
        f"{top}.{emb}": "cpu",
        f"{top}.{norm}": "cpu",
        f"{top}.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dm.update({f"{top}.layers.{i}": "cpu" for i in range(n_layers)})
    return dm


def _same_run(p1: ModelPair, p2: ModelPair) -> None:
    l1, c1 = p1.target.bridge.run_with_cache(IDS)
    l2, c2 = p2.target.bridge.run_with_cache(IDS)
    assert torch.equal(l1, l2)
    assert set(c1.keys()) == set(c2.keys())
    for k in c1.keys():
        assert torch.equal(c1[k], c2[k]), k


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_device_map_matches_single_device(family: str, sharded) -> None:
    s, t = sharded(family)
    ref = ModelPair.load(s, t)
    mapped = ModelPair.load(s, t, device_map=_cpu_map(family))
    _same_run(ref, mapped)
    with transplant(ref, ["L0.H1", "L1.N3"], 0.5), transplant(mapped, ["L0.H1", "L1.N3"], 0.5):
        assert torch.equal(ref.target.bridge(IDS), mapped.target.bridge(IDS))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_accelerate_hooks_match_single_device(family: str, sharded) -> None:
    """What a multi-GPU map does (accelerate hooks on every block), forced on CPU."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, t = sharded(family)

    def hooked(path: Path):
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        m = dispatch_model(m, _cpu_map(family), main_device="cpu", force_hooks=True)
        return m, AutoTokenizer.from_pretrained(path)

    ref = ModelPair.load(s, t)
    mapped = ModelPair.load(hooked(s), hooked(t))
    assert getattr(mapped.target.hf, "hf_device_map", None)
    assert len(mapped.target.mirrors) == len(ref.target.mirrors)
    _same_run(ref, mapped)
    with transplant(ref, ["L1.H2", "L0.N3"], 0.5), transplant(mapped, ["L1.H2", "L0.N3"], 0.5):
        _same_run(ref, mapped)

    # Scoring on the hooked pair gives the same scores.
    from tl_transplant.scoring import score
    from tl_transplant.tasks.builtin import builtin_task

    task = builtin_task("successor", n=6)
    for method in ("activation_diff", "attribution"):
        a = score(ref, task, method, ("head", "neuron"), progress=False)
        b = score(mapped, task, method, ("head", "neuron"), progress=False)
        assert a.units == b.units and torch.equal(a.values, b.values), method


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_offloaded_layers_score_but_refuse_edits(family: str, sharded, tmp_path: Path) -> None:
    s, t = sharded(family)
    dm = _cpu_map(family)
    dm[next(k for k in dm if k.endswith("layers.1"))] = "disk"
    ref = ModelPair.load(s, t)
    mapped = ModelPair.load(s, t, device_map=dm)
    assert mapped.target.offloaded and all(".layers.1." in n for n in mapped.target.offloaded)
    _same_run(ref, mapped)
    with transplant(ref, ["L0.H1"], 0.5), transplant(mapped, ["L0.H1"], 0.5):
        assert torch.equal(ref.target.bridge(IDS), mapped.target.bridge(IDS))
    with pytest.raises(TransplantError, match="offloaded by its device_map"):
        transplant(mapped, ["L1.H1"], 0.5)
    with pytest.raises(ExportError, match="offloads"):
        export_hf(mapped, tmp_path / "x")
