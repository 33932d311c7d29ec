"""Per-unit bookkeeping: where each layer's results go (:class:`UnitTable`) and online means.

Per-prompt statistics are reduced to per-unit sums right away
(:class:`Accumulator`), so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from tl_transplant.arch.units import UNIT_KINDS, Head, KVHead, Linear, Neuron, Unit, UnitKind
from tl_transplant.models.hooks import value_hooks, write_hooks

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout


def unit_index(u: Unit, layout: ModelLayout) -> int:
    """Index of a unit within its layer and kind (a linear's position in the layer's list)."""
    if isinstance(u, Head):
        return u.head
    if isinstance(u, KVHead):
        return u.group
    if isinstance(u, Neuron):
        return u.index
    return layout.linear_names().index(u.name)


class UnitTable:
    """Where each (kind, layer) block of per-layer results goes in the output vector."""

    def __init__(self, units: Sequence[Unit], layout: ModelLayout) -> None:
        self.units = list(units)
        self.layout = layout
        groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for pos, u in enumerate(self.units):
            sel, out = groups.setdefault((u.kind, u.layer), ([], []))
            sel.append(unit_index(u, layout))
            out.append(pos)
        self.groups = {
            k: (torch.tensor(s, dtype=torch.long), torch.tensor(o, dtype=torch.long))
            for k, (s, o) in groups.items()
        }
        self.kind_pos: dict[str, Int[torch.Tensor, " m"]] = {}
        for kind in UNIT_KINDS:
            idx = [i for i, u in enumerate(self.units) if u.kind == kind]
            if idx:
                self.kind_pos[kind] = torch.tensor(idx, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.units)

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.groups

    def layers(self, kind: str | None = None) -> list[int]:
        return sorted({layer for (k, layer) in self.groups if kind is None or k == kind})

    def kinds(self) -> list[UnitKind]:
        return [k for k in UNIT_KINDS if k in self.kind_pos]

    def max_layer(self) -> int:
        return max(layer for (_, layer) in self.groups)

    def selected(self, kind: str, layer: int) -> list[int]:
        return self.groups[(kind, layer)][0].tolist()

    def value_hooks(self) -> list[str]:
        """Hook names carrying the scored units' activations (:mod:`tl_transplant.models.hooks`)."""
        return value_hooks(self.layout, self.units)

    def write_hooks(self) -> list[str]:
        """Hook names where the scored units' effects enter the forward."""
        return write_hooks(self.layout, self.units)

    def linear_hooks(self, layer: int) -> dict[str, tuple[str, ...]]:
        """For the scored linears of one layer: name -> the bridge hooks making up its output."""
        if not self.has("linear", layer):
            return {}
        names = self.layout.linear_names()
        return {
            names[i]: self.layout.linear_hooks(Linear(layer, names[i]))
            for i in self.selected("linear", layer)
        }

    def put(
        self, out: Float[torch.Tensor, "batch n"], kind: str, layer: int,
        vals: Float[torch.Tensor, "batch per_layer"],
    ) -> None:
        """Write one layer's per-prompt values (all units of the kind) into ``out``."""
        sel, pos = self.groups[(kind, layer)]
        out[:, pos] = vals.detach().to(device=out.device, dtype=out.dtype)[:, sel]


class Accumulator:
    """Online per-unit sums of per-prompt values, plus the consistency counts.

    Consistency: the fraction of prompts on which a unit's per-prompt score is
    strictly above the (lower) median per-prompt score of all scored units of the
    same kind on that prompt. 1.0 means "above the typical unit on every prompt".
    """

    def __init__(self, table: UnitTable) -> None:
        self.table = table
        n = len(table)
        self.sums: dict[str, torch.Tensor] = {}
        self.above = torch.zeros(n, dtype=torch.float64)
        self.count = 0

    def new_batch(self, b: int) -> Float[torch.Tensor, "batch n"]:
        """A zeroed per-prompt matrix for one batch."""
        return torch.zeros(b, len(self.table), dtype=torch.float64)

    def add(self, name: str, per_prompt: Float[torch.Tensor, "batch n"]) -> None:
        s = per_prompt.sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def add_consistency(self, per_prompt: Float[torch.Tensor, "batch n"]) -> None:
        for pos in self.table.kind_pos.values():
            block = per_prompt[:, pos]
            med = block.median(dim=1, keepdim=True).values
            self.above[pos] += (block > med).sum(0).to(torch.float64)

    def done(self, b: int) -> None:
        self.count += b

    def mean(self, name: str) -> Float[torch.Tensor, " n"]:
        return self.sums[name] / max(1, self.count)

    def consistency(self) -> Float[torch.Tensor, " n"]:
        return self.above / max(1, self.count)


__all__ = ["Accumulator", "UnitTable", "unit_index"]
