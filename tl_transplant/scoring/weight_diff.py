"""``weight_diff``: how far each unit's weights moved, ``||W_source - W_target||``.

The Frobenius norm over all of a unit's slices (weights and biases, exactly the
slices a transplant of that unit would copy), computed in float64, so units
whose weights are identical score exactly 0. ``relative=True`` divides by the
target's norm over the same slices. Needs no data: a data-free control.

At the weight grain (``units="weight"``) a weight scores ``|w_s - w_t|`` (``relative``:
divided by ``|w_t|``), the source cast to the target's dtype first, as a transplant
copies it: the top-|delta| rule (Localize-and-Stitch's dataless mask, TIES's trim),
also registered on its own as ``magnitude``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from tl_transplant.arch.units import Head, KVHead, Linear, Neuron, Unit
from tl_transplant.scoring.accumulate import UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    WeightRawScores,
    register,
)
from tl_transplant.scoring.tensors import loaded_param

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair

_CLS: dict[str, type[Head] | type[KVHead] | type[Neuron]] = {
    "head": Head, "kv_head": KVHead, "neuron": Neuron
}


def _pieces(
    layout: ModelLayout, kind: str, layer: int, n: int
) -> list[tuple[str, int, torch.Tensor, int]]:
    """(param, dim, starts[n], size) per piece, for all ``n`` units of a kind in a layer."""
    cls = _CLS[kind]
    first = layout.slices(cls(layer, 0))
    if n == 1:
        return [(s.param, s.dim, torch.tensor([s.start]), s.size) for s in first]
    second = layout.slices(cls(layer, 1))
    last = layout.slices(cls(layer, n - 1))
    out = []
    affine = len(first) == len(second) == len(last)
    if affine:
        for a, b, c in zip(first, second, last):
            step = b.start - a.start
            same = a.param == b.param == c.param and a.dim == b.dim == c.dim
            if not (same and a.size == b.size == c.size and c.start == a.start + (n - 1) * step):
                affine = False
                break
            out.append((a.param, a.dim, a.start + step * torch.arange(n), a.size))
    if affine:
        return out
    per_unit = [layout.slices(cls(layer, i)) for i in range(n)]  # pragma: no cover
    return [  # pragma: no cover
        (s.param, s.dim, torch.tensor([u[j].start for u in per_unit]), s.size)
        for j, s in enumerate(first)
    ]


#: Elements per chunk of :func:`square_profiles`: float64 temporaries of a whole large tensor
#: are fresh memory-mapped pages each time (glibc maps blocks over 32 MB), and zeroing them
#: cost 9x the arithmetic on a 1.1B model; chunks stay in reused heap memory.
PROFILE_CHUNK = 1 << 20


def square_profiles(
    s: torch.Tensor, t: torch.Tensor, dim: int
) -> tuple[Float[torch.Tensor, " n"], Float[torch.Tensor, " n"]]:
    """``(sum (s - t)^2, sum t^2)`` over every dim except ``dim``, in float64 on the CPU,
    computed a block of rows at a time (same sums as on the whole tensor, up to float64
    rounding of the order of addition)."""
    if s.dim() == 1:
        d = s.to(torch.float64) - t.to(torch.float64)
        return d.pow(2).cpu(), t.to(torch.float64).pow(2).cpu()
    rows = max(1, PROFILE_CHUNK // max(1, t[0].numel()))
    n = t.shape[dim]
    sq = torch.zeros(n, dtype=torch.float64, device=t.device)
    tq = torch.zeros(n, dtype=torch.float64, device=t.device)
    other = [i for i in range(t.dim()) if i != dim]
    for a in range(0, t.shape[0], rows):
        tc = t[a : a + rows].to(torch.float64)
        d = s[a : a + rows].to(torch.float64) - tc
        if dim == 0:
            sq[a : a + rows] = d.pow_(2).sum(other)
            tq[a : a + rows] = tc.pow_(2).sum(other)
        else:
            sq += d.pow_(2).sum(other)
            tq += tc.pow_(2).sum(other)
    return sq.cpu(), tq.cpu()


@register
class WeightDiff(Scorer):
    """Norm of the source - target weight difference over each unit's slices."""

    name = "weight_diff"
    default_kinds = ("head", "neuron")
    needs_data = False
    weight_level = True

    class Options(ScorerOptions):
        #: Divide by the target's norm over the same slices.
        relative: bool = False

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        """``|w_s - w_t|`` per weight (``relative``: over ``|w_t|``)."""
        return WeightRawScores(abs_delta(self.ctx.pair, relative=self.opts.relative),
                               {"score": "|w_s - w_t|"})

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        pair, layout = self.ctx.pair, self.ctx.layout
        table = UnitTable(units, layout)
        diff_sq = torch.zeros(1, len(units), dtype=torch.float64)
        tgt_sq = torch.zeros(1, len(units), dtype=torch.float64)
        cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def profiles(param: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Squared diff and squared target summed over every dim except ``dim``."""
            if (param, dim) not in cache:
                s = loaded_param(pair.source, param, "weight_diff").detach()
                t = loaded_param(pair.target, param, "weight_diff").detach()
                cache[(param, dim)] = square_profiles(s.to(t.device), t, dim)
            return cache[(param, dim)]

        for kind in table.kinds():
            for layer in table.layers(kind):
                if kind == "linear":
                    names = layout.linear_names()
                    d_vals = torch.zeros(1, len(names), dtype=torch.float64)
                    t_vals = torch.zeros(1, len(names), dtype=torch.float64)
                    for i in table.selected(kind, layer):
                        for s in layout.slices(Linear(layer, names[i])):
                            sq, tq = profiles(s.param, s.dim)
                            d_vals[0, i] += sq[s.start : s.stop].sum()
                            t_vals[0, i] += tq[s.start : s.stop].sum()
                else:
                    n = layout.count(kind)
                    d_vals = torch.zeros(1, n, dtype=torch.float64)
                    t_vals = torch.zeros(1, n, dtype=torch.float64)
                    for param, dim, starts, size in _pieces(layout, kind, layer, n):
                        sq, tq = profiles(param, dim)
                        idx = starts[:, None] + torch.arange(size)[None, :]
                        d_vals[0] += sq[idx].sum(-1)
                        t_vals[0] += tq[idx].sum(-1)
                table.put(diff_sq, kind, layer, d_vals)
                table.put(tgt_sq, kind, layer, t_vals)
        values: Float[torch.Tensor, " n"] = diff_sq[0].sqrt()
        target_norm = tgt_sq[0].sqrt()
        if self.opts.relative:
            values = values / target_norm.clamp_min(torch.finfo(torch.float64).tiny)
        return RawScores(values, None, {"target_norm": target_norm})


def abs_delta(pair: ModelPair, *, relative: bool = False) -> dict[str, torch.Tensor]:
    """``|w_s - w_t|`` of every block tensor (float32, CPU); ``relative``: over ``|w_t|``."""
    from tl_transplant.scoring.attribution import weight_delta

    layout = pair.layout
    out = {}
    for n in layout.unit_tensors():
        d = weight_delta(pair, n).abs_()
        if relative:
            t = pair.target.params[n].detach().to(device="cpu", dtype=torch.float32).abs()
            d = d.div_(t.clamp_min(torch.finfo(torch.float32).tiny))
        out[n] = d
    return out


@register
class Magnitude(Scorer):
    """Top-|delta| weights: ``|w_s - w_t|`` per weight (Localize-and-Stitch's dataless rule)."""

    name = "magnitude"
    kinds = ()
    default_kinds = ()
    needs_data = False
    weight_level = True
    unit_level = False

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        return WeightRawScores(abs_delta(self.ctx.pair), {"score": "|w_s - w_t|"})
