"""``random``: a seeded random ranking, the control every selection must beat.

Scores are i.i.d. uniform in [0, 1) from a ``torch.Generator`` seeded with
the run's seed (``score(..., seed=3)``, read here as ``ctx.seed``), drawn
over the requested units in their canonical order, so the same seed and units
always give the same ranking. At a parameter budget the ranking is walked in
order (``budget_rule="score"``): a random set of units that fits, not a
per-parameter ratio of random numbers (which would buy only the smallest units).

At the weight grain (``units="weight"``) every weight of the block linears draws a
uniform score (tensors in name order, each in row-major order): a random set of
weights. ``dare`` (:class:`Dare`) is the same draw used as DARE (Yu et al. 2024): keep
a random fraction ``p`` of the delta's weights and rescale them by ``1/p``; the sweep
multiplies alpha by ``1/p`` for it (``meta["alpha_scale"]``), an extrapolation that is
allowed for this control and labelled so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tl_transplant.arch.units import Unit
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import RawScores, Scorer, WeightRawScores, register

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair


@register
class RandomScores(Scorer):
    """Uniform random scores (seeded)."""

    name = "random"
    default_kinds = ("head", "neuron")
    needs_data = False
    weight_level = True

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        return WeightRawScores(random_weights(self.ctx.pair, self.ctx.seed),
                               {"seed": self.ctx.seed, "budget_rule": "score"})

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        gen = torch.Generator().manual_seed(self.ctx.seed)
        values = torch.rand(len(units), generator=gen, dtype=torch.float64)
        return RawScores(values, None, meta={"seed": self.ctx.seed, "budget_rule": "score"})


def random_weights(pair: ModelPair, seed: int) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores for every block weight, drawn from ``seed`` in name order."""
    gen = torch.Generator().manual_seed(seed)
    layout = pair.layout
    return {n: torch.rand(layout.shapes[n], generator=gen, dtype=torch.float32)
            for n in sorted(layout.unit_tensors())}


@register
class Dare(Scorer):
    """DARE: a random fraction p of the delta's weights, rescaled by 1/p (a control)."""

    name = "dare"
    kinds = ()
    default_kinds = ()
    needs_data = False
    weight_level = True
    unit_level = False

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        return WeightRawScores(
            random_weights(self.ctx.pair, self.ctx.seed),
            {"seed": self.ctx.seed, "budget_rule": "score", "alpha_scale": "inverse_fraction",
             "note": "DARE: random weights, alpha x 1/p (extrapolates; a control)"},
        )
