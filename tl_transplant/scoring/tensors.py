"""Tensor helpers for scorers: working precision, position picking, output-weight blocks."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from tl_transplant.scoring.registry import ScoringError
from tl_transplant.units import Head, Neuron


def work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a working precision of at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def take_positions(
    x: torch.Tensor, pos: Int[torch.Tensor, " batch"]
) -> torch.Tensor:
    """``x[b, pos[b]]`` for each row, keeping a length-1 position axis."""
    b = x.shape[0]
    return x[torch.arange(b, device=x.device), pos.to(x.device)].unsqueeze(1)


def loaded_param(side: Any, name: str, why: str) -> torch.Tensor:
    """``side.params[name]``, or a ScoringError if a device_map offloaded it (meta tensor)."""
    t = side.params[name]
    if t.device.type == "meta":
        raise ScoringError(
            f"{side.name}: tensor {name} is offloaded (device_map); {why} needs it in memory"
        )
    return t


# TODO(lead): use layout.output_blocks
def output_blocks(
    weight: torch.Tensor, layout: Any, kind: str, layer: int
) -> Float[torch.Tensor, "n size D"]:
    """Every head's (or neuron's) block of a layer's output projection ``weight``, ``[n, size, D]``.

    The slices index the projection's *input* dim; moving it first serves
    ``nn.Linear`` (``[D, in]``) and ``Conv1D`` (``[in, D]``) alike, as
    :meth:`ModelLayout.output_block` does for one unit.
    """
    cls = Head if kind == "head" else Neuron
    n = layout.dims.H if kind == "head" else layout.dims.I
    first = layout.output_slice(cls(layer, 0))
    size = first.size
    if n > 1:
        step = layout.output_slice(cls(layer, 1)).start - first.start
        last = layout.output_slice(cls(layer, n - 1))
        affine = last.start == first.start + (n - 1) * step and last.size == size
    else:
        step, affine = size, True
    if affine:
        starts = first.start + step * torch.arange(n)
    else:  # pragma: no cover - every shipped layout is affine
        starts = torch.tensor([layout.output_slice(cls(layer, i)).start for i in range(n)])
    idx = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1).to(weight.device)
    cols = weight.index_select(first.dim, idx).movedim(first.dim, 0)  # [n * size, D]
    return cols.reshape(n, size, -1)


def out_weight(side: Any, layout: Any, kind: str, layer: int) -> Float[torch.Tensor, "n size D"]:
    """:func:`output_blocks` of one model's loaded weight, in working precision."""
    param = layout.output_slice((Head if kind == "head" else Neuron)(layer, 0)).param
    w = loaded_param(side, param, "this scorer").detach()
    return work(output_blocks(w, layout, kind, layer))


__all__ = ["loaded_param", "out_weight", "output_blocks", "take_positions", "work"]
