"""Greedy generation for the generative metrics (``exact_match``): batched, left-padded
(or grouped by length), KV-cached through the unwrapped HF modules unless a hook is active
(see :mod:`tl_transplant.models.decoding`), with explicit greedy settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from tl_transplant.errors import EvaluationError
from tl_transplant.evaluation.runner import Intervention, Runner, device_of, per_batch
from tl_transplant.tasks.tokens import encode

if TYPE_CHECKING:
    from transformers import (
        GenerationConfig,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedTokenizerBase,
    )

    from tl_transplant.tasks.task import Task


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def generation_config(
    gen: GenerationMixin, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, pad: int
) -> GenerationConfig:
    """Greedy decoding of at most ``max_new_tokens``, the model's EOS (else the tokenizer's)."""
    from transformers import GenerationConfig

    eos = getattr(getattr(gen, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    # Explicit greedy settings so the model's own generation_config (repetition
    # penalty, sampling) cannot leak in. use_cache=False here; greedy_generate turns
    # it on only for the unwrapped HF tree (tl_transplant.models.decoding): under
    # transformer-lens 4.3 with transformers 5.x the bridge's attention never fills
    # the KV cache that generate() passes, so cached decoding through the bridged
    # model would see only the newest token. tests/test_generation.py checks the
    # cached path against this uncached one token for token.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=False,
    )


def eos_set(cfg: GenerationConfig | PretrainedConfig) -> set[int]:
    """The EOS token ids of a generation (or model) config, as a set."""
    eos = cfg.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generate_texts(
    runner: Runner,
    task: Task,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None = None,
    generation: str = "left_pad",
    kv_cache: bool = True,
    done: Callable[[int], object] | None = None,
) -> tuple[list[str], str]:
    """Greedy-decode every prompt of ``task`` (at most ``task.max_new_tokens``, cut at EOS,
    special tokens skipped); also says whether the batches used the KV cache (``"cached"``,
    ``"uncached"`` or ``"mixed"``). ``done(n)`` is called after each batch of ``n`` prompts.
    """
    from tl_transplant.models.decoding import greedy_generate

    gen = runner.generator
    if gen is None:
        raise EvaluationError(
            f"task {task.name!r} uses {task.metric}, which needs a model with .generate "
            "(an HF causal LM or a ModelSide)"
        )
    if generation not in ("left_pad", "by_length"):
        raise EvaluationError(f"generation must be 'left_pad' or 'by_length', got {generation!r}")
    tok = runner.tokenizer
    enc = encode(tok, task.prompts, None, prepend_bos=bos)
    rows = [enc.input_ids[i, : int(enc.prompt_len[i])] for i in range(len(task))]
    cfg = generation_config(gen, tok, task.max_new_tokens, enc.pad_id)
    eos = eos_set(cfg)
    order = sorted(range(len(task)), key=lambda i: (-len(rows[i]), i))
    if generation == "left_pad":
        groups = _batches(order, batch_size)
    else:  # equal-length groups: no padding at all
        groups = []
        for length in sorted({len(r) for r in rows}, reverse=True):
            same = [i for i in order if len(rows[i]) == length]
            groups.extend(_batches(same, batch_size))
    texts: list[str] = [""] * len(task)
    n_cached = 0
    dev = device_of(gen)
    for idx in groups:
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, width - len(rows[i]) :] = rows[i]
            mask[b, width - len(rows[i]) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        with per_batch(intervention, ids):
            out, cached = greedy_generate(gen, ids, mask, cfg, kv_cache=kv_cache)
        n_cached += int(cached)
        for b, i in enumerate(idx):
            new = out[b, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            texts[i] = str(tok.decode(new[:cut], skip_special_tokens=True))
        if done is not None:
            done(len(idx))
    used = "uncached" if n_cached == 0 else "cached" if n_cached == len(groups) else "mixed"
    return texts, used


__all__ = ["eos_set", "generate_texts", "generation_config"]
