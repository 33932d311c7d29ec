"""Cached greedy decoding (tl_transplant.models.decoding) against the uncached reference path.

The cached path runs the unwrapped HF module tree with a KV cache; the reference
(``kv_cache=False``) recomputes the prefix through the bridged model at every step.
Token ids must be identical: plain, batched with left padding, inside a transplant
and under ``patch_activations`` (which falls back to the reference automatically).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tl_transplant import ModelPair, Task, evaluate, transplant
from tl_transplant.edit.patching import patch_activations
from tl_transplant.evaluation.generation import generation_config as _generation_config
from tl_transplant.models.decoding import can_cache, greedy_generate, hooks_active, plain_model
from tl_transplant.testing import tiny_model, word_tokenizer

FAMILIES = ["llama", "gpt2", "gpt_neox"]  # llama's tiny config is GQA (4 query / 2 KV heads)
NEW = 10
#: Different lengths, so left-padded batches mix padding widths.
PROMPTS = ["w1 w2 w3", "w40 w7", "w9 w9 w12 w30 w31", "w5", "w60 w61 w62 w63"]


def _sharp(family: str, seed: int) -> Any:
    """A tiny model with scaled-up weights: peaked, less repetitive greedy outputs."""
    model = tiny_model(family, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def gen_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    tok = word_tokenizer(tmp_path_factory.mktemp(f"gen_tok_{family}"))
    target = _sharp(family, seed=31)
    pristine = copy.deepcopy(target)  # never booted: plain HF reference
    source = _sharp(family, seed=32)
    pair = ModelPair.load((source, tok), (target, tok))
    return pair, pristine


def _left_padded(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids, mask


def _fast(side: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cfg = _generation_config(side.hf, side.tokenizer, NEW, side.tokenizer.pad_token_id)
    cfg.eos_token_id = None
    with torch.inference_mode():
        out, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=True)
    assert used
    return out


def _both(side: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached ids, uncached ids); asserts the cached call really took the cached path."""
    cfg = _generation_config(side.hf, side.tokenizer, NEW, side.tokenizer.pad_token_id)
    cfg.eos_token_id = None  # always NEW tokens: more positions compared
    with torch.inference_mode():
        fast, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=True)
        ref, used_ref = greedy_generate(side.hf, ids, mask, cfg, kv_cache=False)
    assert used and not used_ref
    assert fast.shape == ref.shape == (ids.shape[0], ids.shape[1] + NEW)
    return fast, ref


def test_cached_equals_uncached_left_padded_batch(gen_pair):
    pair, pristine = gen_pair
    side = pair.target
    ids, mask = _left_padded(side.tokenizer, PROMPTS)
    fast, ref = _both(side, ids, mask)
    assert fast.tolist() == ref.tolist()
    assert len(set(ref[:, ids.shape[1] :].flatten().tolist())) > 2  # not one repeated token
    # and each row alone (no padding) decodes the same tokens as in the padded batch
    for b in (0, 2):
        n = int(mask[b].sum())
        one, one_ref = _both(side, ids[b : b + 1, -n:], mask[b : b + 1, -n:])
        assert one.tolist() == one_ref.tolist()
        assert one[0, n:].tolist() == fast[b, ids.shape[1] :].tolist()
    # the never-booted HF model with its own cache agrees too
    cfg = _generation_config(pristine, side.tokenizer, NEW, side.tokenizer.pad_token_id)
    cfg.eos_token_id, cfg.use_cache = None, True
    with torch.inference_mode():
        want = pristine.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert want.tolist() == fast.tolist()


def test_cached_path_decodes_one_token_per_step(gen_pair, monkeypatch):
    """The speedup is real: after the prefill, each forward sees one new token only."""
    pair, _ = gen_pair
    side = pair.target
    plain = plain_model(side.hf)
    seen: list[int] = []
    inner = plain.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(int(kwargs["input_ids"].shape[1]))
        return inner(*args, **kwargs)

    monkeypatch.setattr(plain, "forward", spy)  # on the copy: the bridged tree stays unhooked
    ids, mask = _left_padded(side.tokenizer, PROMPTS[:3])
    _both(side, ids, mask)
    assert seen[0] == ids.shape[1] and seen[1:] == [1] * (NEW - 1)


def test_plain_model_shares_every_tensor(gen_pair):
    pair, _ = gen_pair
    side = pair.target
    plain = plain_model(side.hf)
    assert plain is not side.hf and plain_model(side.hf) is plain  # built once
    assert not any("_original_component" in n for n, _ in plain.named_modules())
    canon = {id(v) for v in side.params.values()}
    named = dict(plain.named_parameters())
    assert named and all(id(p) in canon for p in named.values())
    for k, v in side.params.items():  # every HF tensor, under its clean name
        if k in named:
            assert named[k] is v
    assert {id(p) for p in named.values()} == canon
    # the wrapped model is untouched: still bridged, bridge forward still works
    assert any("_original_component" in n for n, _ in side.hf.named_modules())
    ids, mask = _left_padded(side.tokenizer, PROMPTS)
    with torch.inference_mode():
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = side.hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # an HF model that was never wrapped is its own plain model
    raw = tiny_model("llama")
    assert plain_model(raw) is raw


def test_cached_sees_transplant_edits(gen_pair):
    pair, _ = gen_pair
    side = pair.target
    ids, mask = _left_padded(side.tokenizer, PROMPTS)
    before = _fast(side, ids, mask)
    units = ["L0.H1", "L1.H0", "L1.N3", "L0.N5"]
    with transplant(pair, units, 1.0):
        fast, ref = _both(side, ids, mask)
    assert fast.tolist() == ref.tolist()
    assert fast.tolist() != before.tolist()  # the edit reached the cached path
    assert _fast(side, ids, mask).tolist() == before.tolist()  # restored


def test_evaluate_cached_equals_uncached(gen_pair):
    pair, _ = gen_pair
    task = Task("gen", PROMPTS, ["w0"] * len(PROMPTS), metric="exact_match",
                max_new_tokens=8, prepend_bos=True)
    fast = evaluate(pair.target, task, progress=False, batch_size=3)
    ref = evaluate(pair.target, task, progress=False, batch_size=3, kv_cache=False)
    assert fast.generations == ref.generations
    assert fast.meta["kv_cache"] == "cached" and ref.meta["kv_cache"] == "uncached"
    grouped = evaluate(pair.target, task, progress=False, batch_size=3, generation="by_length")
    assert grouped.generations == ref.generations and grouped.meta["kv_cache"] == "cached"
    # a bare model (the bridge itself, with its tokenizer) decodes through its HF model
    bare = evaluate(pair.target.bridge, task, tokenizer=pair.target.tokenizer, progress=False,
                    batch_size=3)
    assert bare.generations == ref.generations and bare.meta["kv_cache"] == "cached"
    with transplant(pair, ["L0.H0", "L1.N2"], 0.5):
        fast = evaluate(pair.target, task, progress=False, batch_size=3)
        ref = evaluate(pair.target, task, progress=False, batch_size=3, kv_cache=False)
    assert fast.generations == ref.generations and fast.meta["kv_cache"] == "cached"


def test_patch_activations_falls_back_to_uncached(gen_pair):
    """Hooks cannot fire in the unwrapped tree, so a patch forces the reference path."""
    pair, _ = gen_pair
    side = pair.target
    task = Task("gen", PROMPTS, ["w0"] * len(PROMPTS), metric="exact_match",
                max_new_tokens=8, prepend_bos=True)
    units = ["L0.H1", "L1.N3"]
    assert can_cache(side.hf) and not hooks_active(side.hf)
    with patch_activations(pair, units) as patch:
        assert hooks_active(side.hf) and not can_cache(side.hf)
        ids, mask = _left_padded(side.tokenizer, PROMPTS)
        cfg = _generation_config(side.hf, side.tokenizer, 2, side.tokenizer.pad_token_id)
        with torch.inference_mode():
            out, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=True)
        assert not used and patch.n_source_runs > 0  # the patch's pre-hook fired
        fast = evaluate(side, task, progress=False, batch_size=3)
    assert fast.meta["kv_cache"] == "uncached"
    # the explicit reference, with the patch as evaluate's intervention: the same tokens
    ref = evaluate(side, task, progress=False, batch_size=3, kv_cache=False,
                   intervention=patch_activations(pair, units))
    assert fast.generations == ref.generations and ref.meta["kv_cache"] == "uncached"
    assert can_cache(side.hf)  # hooks gone after the context: cached again
    assert evaluate(side, task, progress=False, batch_size=3).meta["kv_cache"] == "cached"


def test_a_plain_forward_hook_also_forces_the_reference(gen_pair):
    pair, _ = gen_pair
    side = pair.target
    calls: list[int] = []
    name = next(n for n in side.bridge.hook_dict if n.endswith("hook_out"))
    handle = side.bridge.hook_dict[name].register_forward_hook(
        lambda m, i, o: calls.append(1)
    )
    try:
        ids, mask = _left_padded(side.tokenizer, PROMPTS[:2])
        cfg = _generation_config(side.hf, side.tokenizer, 3, side.tokenizer.pad_token_id)
        with torch.inference_mode():
            _, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=True)
    finally:
        handle.remove()
    assert not used and len(calls) >= 3  # one forward per new token, hook firing each time


def test_every_family_cached_equals_uncached_and_plain_hf(family, tmp_path):
    """Every supported model type: the unwrapped tree shares the tensors, decodes the same
    token ids as the bridged reference and as a never-booted copy of the HF model."""
    from tl_transplant.models.side import ModelSide

    tok = word_tokenizer(tmp_path / "tok")
    model = _sharp(family, seed=41)
    pristine = copy.deepcopy(model)
    side = ModelSide.from_hf(model, tok, name=family)
    canon = {id(v) for v in side.params.values()}
    assert {id(p) for p in plain_model(side.hf).parameters()} == canon
    ids, mask = _left_padded(tok, PROMPTS[:3])
    cfg = _generation_config(side.hf, tok, 6, tok.pad_token_id)
    cfg.eos_token_id = None
    with torch.inference_mode():
        fast, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=True)
        ref, used_ref = greedy_generate(side.hf, ids, mask, cfg, kv_cache=False)
        cfg.use_cache = True
        want = pristine.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert used and not used_ref
    assert fast.tolist() == ref.tolist() == want.tolist()
