"""``random``: a seeded random ranking, the control every selection must beat.

Scores are i.i.d. uniform in [0, 1) from a ``torch.Generator`` seeded with
the run's seed (``score(..., seed=3)``, read here as ``ctx.seed``), drawn
over the requested units in their canonical order, so the same seed and units
always give the same ranking. At a parameter budget the ranking is walked in
order (``budget_rule="score"``): a random set of units that fits, not a
per-parameter ratio of random numbers (which would buy only the smallest units).
"""

from __future__ import annotations

import torch

from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import RawScores, Scorer, register
from tl_transplant.units import Unit


@register
class RandomScores(Scorer):
    """Uniform random scores (seeded)."""

    name = "random"
    default_kinds = ("head", "neuron")
    needs_data = False

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        gen = torch.Generator().manual_seed(self.ctx.seed)
        values = torch.rand(len(units), generator=gen, dtype=torch.float64)
        return RawScores(values, None, meta={"seed": self.ctx.seed, "budget_rule": "score"})
