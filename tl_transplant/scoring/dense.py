"""``dense``: every block weight blended at one alpha, the interpolation baseline.

Not a ranking: the result marks itself dense (``meta["dense"] = True``) and carries its
own alpha grid (``meta["alphas"]``, option ``alphas``). A sweep gives it one size, every
block linear (100% of the block parameters), at each of those alphas, the alpha chosen
on dev like any other; as a control of a chosen configuration it is compared *at the
same retention cost* (see :mod:`tl_transplant.sweeps.verdict`). Partial interpolation of the
whole delta is the classic model-soup baseline (ParamDelta moves the whole delta at 1).
The values are all 1 over whatever units are asked for, so it needs no data.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field, field_validator

from tl_transplant.arch.units import Unit, UnitKind
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import RawScores, Scorer, ScorerOptions, ScoringError, register

#: The default alpha grid of the dense blend.
DENSE_ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


@register
class Dense(Scorer):
    """Every block weight at one alpha (the alpha grid is its option ``alphas``)."""

    name = "dense"
    #: A grain of its own: it runs once whatever ``selection.units`` lists.
    grain: ClassVar[str] = "dense"
    default_kinds: ClassVar[tuple[UnitKind, ...]] = ("linear",)
    needs_data = False

    class Options(ScorerOptions):
        alphas: Annotated[list[float], Field(
            min_length=1,
            description="a non-empty list of blend strengths in (0, 1], e.g. [0.1, 0.5, 1.0]",
        )] = list(DENSE_ALPHAS)

        @field_validator("alphas")
        @classmethod
        def _alphas(cls, v: list[float]) -> list[float]:
            for a in v:
                if not 0.0 < a <= 1.0:
                    raise ScoringError(f"each dense alpha must be in (0, 1], got {a}")
            return sorted(set(v))

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        return RawScores(torch.ones(len(units), dtype=torch.float64), None, meta={
            "dense": True, "alphas": list(self.opts.alphas), "budget_rule": "score",
            "note": "dense: every block weight at one alpha (the interpolation baseline)",
        })
