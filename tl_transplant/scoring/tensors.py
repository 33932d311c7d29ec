"""Tensor helpers for scorers: working precision, position picking, output-weight blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float, Int

from tl_transplant.arch.units import Head, Neuron, UnitKind
from tl_transplant.scoring.registry import ScoringError

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide


def work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a working precision of at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def tensor_sum(xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(xs)`` typed as a tensor (Python's ``0 + t`` is ``t``; ``xs`` must not be empty)."""
    return cast(torch.Tensor, sum(xs))


def take_positions(
    x: torch.Tensor, pos: Int[torch.Tensor, " batch"]
) -> torch.Tensor:
    """``x[b, pos[b]]`` for each row, keeping a length-1 position axis."""
    b = x.shape[0]
    return x[torch.arange(b, device=x.device), pos.to(x.device)].unsqueeze(1)


def loaded_param(side: ModelSide, name: str, why: str) -> torch.Tensor:
    """``side.params[name]``, or a ScoringError if a device_map offloaded it (meta tensor)."""
    t = side.params[name]
    if t.device.type == "meta":
        raise ScoringError(
            f"{side.name}: tensor {name} is offloaded (device_map); {why} needs it in memory"
        )
    return t


def out_weight(
    side: ModelSide, layout: ModelLayout, kind: UnitKind, layer: int
) -> Float[torch.Tensor, "n size D"]:
    """:meth:`ModelLayout.output_blocks` of one model's loaded weight, in working precision."""
    param = layout.output_slice((Head if kind == "head" else Neuron)(layer, 0)).param
    w = loaded_param(side, param, "this scorer").detach()
    return work(layout.output_blocks(w, kind, layer))


__all__ = ["loaded_param", "out_weight", "take_positions", "tensor_sum", "work"]


def rows_that_fit(
    pair: ModelPair, layout: ModelLayout, max_mb: int, seq: int,
    per_token: Callable[[Any, int], int],
) -> int:
    """How many sequences of ``seq`` tokens fit in ``max_mb`` MiB of live activations.

    ``per_token(dims, vocab)`` counts the values one token keeps alive (the caller's
    estimate: forward only, or with the backward); each costs the target's element size
    (at least 4 bytes, since scoring works in float32 or wider). Used to size replicated
    batches (``activation_patch``'s units per pass, ``attribution_ig``'s steps per pass).
    """
    tgt = pair.target
    vocab = int(getattr(getattr(tgt.bridge, "cfg", None), "d_vocab", 0) or len(tgt.tokenizer))
    dtype = next(iter(tgt.params.values())).dtype
    elem = max(4, torch.finfo(dtype).bits // 8) if dtype.is_floating_point else 4
    return int(max_mb) * 2**20 // max(1, elem * per_token(layout.dims, vocab) * seq)
