"""What patching a unit's source activation into the target changes, for one batch.

Attribution and activation patching share one definition of a unit's patch,
an additive change ``delta_u`` at the hook points where the unit writes:

* head ``h``: at ``attn.o.hook_out``, ``z_s[h] @ W_O,s[h] - z_t[h] @ W_O,t[h]``
  (the source head's residual contribution replaces the target's, ``W_O``
  included, since a transplant copies the o-projection columns too);
* KV group ``g``: at ``hook_k`` / ``hook_v``, ``k_s[g] - k_t[g]`` and
  ``v_s[g] - v_t[g]`` (every query head of the group reads them: GQA);
* neuron ``i``: at ``mlp.out.hook_out``, ``post_s[i] * W_out,s[i] - post_t[i] * W_out,t[i]``;
* whole linear: at its output hooks, ``out_s - out_t``.

The source and target values are the clean activations of the same batch, at
every position. Patching with strength ``alpha`` adds ``alpha * delta_u``; the
first-order estimate of its effect on the metric is ``alpha * <grad, delta_u>``.

Hook names come from the layout (:meth:`ModelLayout.hook`): ``"head"`` is
``hook_z``, ``"attn_out"`` the o-projection output, ``"neuron"``/``"mlp_out"``
the MLP's hidden activation and down-projection output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from tl_transplant.arch.units import Head, KVHead, Linear, Neuron, Unit, UnitKind
from tl_transplant.scoring.accumulate import UnitTable, unit_index
from tl_transplant.scoring.tensors import out_weight, tensor_sum, work

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair

#: (hook name, index into the activation after the batch axis, tensor to add)
Delta = list[tuple[str, tuple[Any, ...], torch.Tensor]]


class Effects:
    """Clean source/target activations of one batch, and each unit's patch ``delta_u``."""

    def __init__(self, pair: ModelPair, table: UnitTable, src: dict[str, torch.Tensor],
                 tgt: dict[str, torch.Tensor]) -> None:
        self.pair = pair
        self.layout = pair.layout
        self.table = table
        self.dev = pair.target.device
        self.src = src
        self.tgt = tgt
        self._w: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}

    def s(self, name: str) -> torch.Tensor:
        return work(self.src[name].to(self.dev))

    def t(self, name: str) -> torch.Tensor:
        return work(self.tgt[name])

    def weight(self, role: str, kind: UnitKind, layer: int) -> Float[torch.Tensor, "n size D"]:
        """Output-projection slices of one layer (only the latest layer is kept per side/kind)."""
        key = (role, kind)
        if key not in self._w or self._w[key][0] != layer:
            side = self.pair.source if role == "source" else self.pair.target
            self._w[key] = (layer, out_weight(side, self.layout, kind, layer).to(self.dev))
        return self._w[key][1]

    # ---- first order --------------------------------------------------------------------
    def attribution(self, grads: dict[str, torch.Tensor],
                    per: Float[torch.Tensor, "batch n"]) -> None:
        """Write ``<grad, delta_u>`` (summed over positions) for every unit into ``per``."""
        table, layout = self.table, self.layout
        hook = layout.hook
        for layer in table.layers("head"):
            g = work(grads[hook("attn_out", layer)])
            z_s, z_t = self.s(hook("head", layer)), self.t(hook("head", layer))
            u_s = torch.einsum("bpD,hdD->bphd", g, self.weight("source", "head", layer))
            u_t = torch.einsum("bpD,hdD->bphd", g, self.weight("target", "head", layer))
            vals = (u_s * z_s).sum((1, 3)) - (u_t * z_t).sum((1, 3))
            table.put(per, "head", layer, vals)
        for layer in table.layers("kv_head"):
            vals = tensor_sum(
                (work(grads[n]) * (self.s(n) - self.t(n))).sum((1, 3))
                for n in (hook("kv_k", layer), hook("kv_v", layer))
            )
            table.put(per, "kv_head", layer, vals)
        for layer in table.layers("neuron"):
            g = work(grads[hook("mlp_out", layer)])
            p_s, p_t = self.s(hook("neuron", layer)), self.t(hook("neuron", layer))
            w_s = self.weight("source", "neuron", layer)[:, 0, :]
            w_t = self.weight("target", "neuron", layer)[:, 0, :]
            vals = ((g @ w_s.T) * p_s).sum(1) - ((g @ w_t.T) * p_t).sum(1)
            table.put(per, "neuron", layer, vals)
        for layer in table.layers("linear"):
            names = layout.linear_names()
            vals = torch.zeros(per.shape[0], len(names), device=self.dev, dtype=torch.float64)
            for lin, hooks in table.linear_hooks(layer).items():
                vals[:, names.index(lin)] = tensor_sum(
                    (work(grads[h]) * (self.s(h) - self.t(h))).flatten(1).sum(1) for h in hooks
                )
            table.put(per, "linear", layer, vals)

    # ---- exact patches ------------------------------------------------------------------
    def delta(self, u: Unit) -> Delta:
        """The additive patch of unit ``u`` (alpha = 1)."""
        layer, hook = u.layer, self.layout.hook
        if isinstance(u, Head):
            h = u.head
            z = hook("head", layer)
            z_s, z_t = self.s(z)[:, :, h], self.t(z)[:, :, h]
            d = z_s @ self.weight("source", "head", layer)[h] - z_t @ self.weight(
                "target", "head", layer
            )[h]
            return [(hook("attn_out", layer), (), d)]
        if isinstance(u, KVHead):
            g = u.group
            return [
                (n, (slice(None), g), self.s(n)[:, :, g] - self.t(n)[:, :, g])
                for n in (hook("kv_k", layer), hook("kv_v", layer))
            ]
        if isinstance(u, Neuron):
            i = u.index
            post = hook("neuron", layer)
            p_s = self.s(post)[:, :, i : i + 1]
            p_t = self.t(post)[:, :, i : i + 1]
            w_s = self.weight("source", "neuron", layer)[i, 0]
            w_t = self.weight("target", "neuron", layer)[i, 0]
            return [(hook("mlp_out", layer), (), p_s * w_s - p_t * w_t)]
        assert isinstance(u, Linear)
        hooks = self.layout.linear_hooks(u)
        return [(h, (), self.s(h) - self.t(h)) for h in hooks]


def units_in_order(table: UnitTable) -> list[tuple[int, Unit]]:
    """(position in the output, unit), grouped by kind and layer (weights are reused)."""
    order = sorted(
        range(len(table.units)),
        key=lambda i: (table.units[i].kind, table.units[i].layer,
                       unit_index(table.units[i], table.layout)),
    )
    return [(i, table.units[i]) for i in order]


__all__ = ["Delta", "Effects", "units_in_order"]
