"""Weight-level scores: one score per weight of the block linears (:class:`WeightScores`).

A weight-level scorer (``score(pair, task, method, units="weight")``) returns them. The
sweep ranks them by parameter budget (:meth:`WeightScores.within_budget` gives the
:class:`~tl_transplant.edit.weights.WeightMask` of the best weights that fit), the report
reads their per-unit view (:meth:`WeightScores.unit_view`). Budgets count weights against
the same denominator as unit budgets (:func:`tl_transplant.edit.budget.block_params`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from tl_transplant.arch.units import Unit, normalize_kinds
from tl_transplant.edit.budget import (
    DEFAULT_BUDGET_RULE,
    BudgetRule,
    block_params,
    check_fraction,
    check_rule,
)
from tl_transplant.edit.weights import WEIGHT, WeightMask, top_weights
from tl_transplant.scoring.registry import INVERSE_FRACTION, AlphaScale, ScoringError, traits_meta
from tl_transplant.scoring.scores import Scores

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout

WEIGHT_SCORES_FORMAT = "tl_transplant.weight_scores/1"


class WeightScores:
    """One score per weight of the block linears, by one method. Higher = more worth moving.

    ``values[name]`` is a float32 CPU tensor of the target tensor's shape. ``meta`` says
    how the scores were made. Typed fields say how a sweep uses them: :attr:`budget_rule`
    is ``"per_param"`` (default: only weights with a score > 0 are bought, as for unit
    scores) or ``"score"`` (rank-like values: walk the ranking whatever the sign);
    :attr:`alpha_scale` ``"inverse_fraction"`` (DARE) makes the sweep multiply alpha by
    block params / params moved; :attr:`suggested` is the scorer's own weight set. The
    first two are read from ``meta`` when not given (as in 0.1) and written into it.
    """

    grain = WEIGHT

    def __init__(
        self,
        values: Mapping[str, Float[torch.Tensor, "..."]],
        *,
        method: str,
        meta: Mapping[str, Any] | None = None,
        suggested: WeightMask | None = None,
        budget_rule: BudgetRule | None = None,
        alpha_scale: AlphaScale | None = None,
    ) -> None:
        self.values = {n: v.detach().to(device="cpu", dtype=torch.float32)
                       for n, v in sorted(values.items())}
        self.method = method
        m = dict(meta or {})
        rule = budget_rule if budget_rule is not None else m.get("budget_rule")
        try:
            self._budget_rule: BudgetRule = check_rule(rule or DEFAULT_BUDGET_RULE)
        except ValueError as e:
            raise ScoringError(f"{method}: {e}") from None
        scale = alpha_scale if alpha_scale is not None else m.get("alpha_scale")
        if scale is not None and scale != INVERSE_FRACTION:
            raise ScoringError(f"alpha_scale must be {INVERSE_FRACTION!r} or None, got {scale!r}")
        #: ``"inverse_fraction"`` (DARE): the sweep moves this method's masks at alpha x block
        #: params / params moved, an extrapolating control.
        self.alpha_scale: AlphaScale | None = scale
        self.meta: dict[str, Any] = traits_meta(
            m, budget_rule=None if rule is None else self._budget_rule, alpha_scale=scale,
            suggested=None, dense_alphas=None)
        self.meta.setdefault("grain", WEIGHT)
        #: The scorer's own suggested weight set (e.g. a learned mask's gates > 0.5), if any;
        #: ``meta["suggested"]`` then holds its summary.
        self.suggested = suggested
        if suggested is not None:
            self.meta["suggested"] = suggested.summary()

    def __repr__(self) -> str:
        return (f"WeightScores(method={self.method!r}, n={self.n_weights}, "
                f"tensors={len(self.values)})")

    @property
    def n_weights(self) -> int:
        return int(sum(v.numel() for v in self.values.values()))

    @property
    def signed(self) -> bool:
        return bool(self.meta.get("signed", False))

    @property
    def budget_rule(self) -> BudgetRule:
        """How a parameter budget is filled (default ``"per_param"``)."""
        return self._budget_rule

    @property
    def kinds(self) -> tuple[str, ...]:
        return (WEIGHT,)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(v.shape) for n, v in self.values.items()}

    def top_n(self, k: int) -> WeightMask:
        """The ``k`` best weights (only those scored > 0 under the ``per_param`` rule)."""
        idx = top_weights(self.values, k, positive_only=self.budget_rule == "per_param")
        return WeightMask(idx, self.shapes())

    def budget_mask(self, fraction: float, layout: ModelLayout) -> WeightMask:
        """The best weights that fit ``fraction`` of the block parameters."""
        f = check_fraction(fraction)
        return self.top_n(int(math.floor(f * block_params(layout) + 1e-9)))

    def within_budget(
        self, fraction: float, layout: ModelLayout, kinds: Any = None, kv: str = "group"
    ) -> WeightMask:
        """:meth:`budget_mask` under the unit rankings' signature (``kinds``/``kv`` unused)."""
        return self.budget_mask(fraction, layout)

    def top(self, k: int, kinds: Any = None) -> list[Unit]:
        """Weight scores rank weights, not units: use :meth:`top_n` or a budget."""
        raise TypeError(
            f"{self.method} scored individual weights: rank them by parameter budget "
            "(within_budget / sweep budgets) or top_n(k), not by a number of units"
        )

    def unit_view(
        self, layout: ModelLayout, kinds: str | Iterable[str] = ("head", "neuron"),
        *, positive: bool = True,
    ) -> Scores:
        """Per-unit sums of the weight scores (only the positive ones if ``positive``):
        the interpretable map of a weight-level ranking, as ordinary :class:`Scores`."""
        units: list[Unit] = []
        vals: list[float] = []
        cache: dict[tuple[str, int], torch.Tensor] = {}

        def profile(param: str, dim: int) -> torch.Tensor:
            if (param, dim) not in cache:
                v = self.values[param].double()
                if positive:
                    v = v.clamp_min(0)
                v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
                other = [d for d in range(v.dim()) if d != dim]
                cache[(param, dim)] = v.sum(other) if other else v
            return cache[(param, dim)]

        for kind in normalize_kinds(kinds):
            for u in layout.units(kind):
                total = 0.0
                for s in layout.slices(u):
                    if s.param in self.values:
                        total += float(profile(s.param, s.dim)[s.start : s.stop].sum())
                units.append(u)
                vals.append(total)
        meta = {**self.meta, "grain": "unit_view", "of": self.method,
                "positive_only": positive}
        return Scores(units, vals, method=f"{self.method}@weight", meta=meta)

    # ---- files --------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the scores as safetensors (float32, one tensor per HF tensor) with ``meta``."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        p = Path(path)
        try:
            save_file({n: v.contiguous() for n, v in self.values.items()}, str(p),
                      metadata={"format": WEIGHT_SCORES_FORMAT, "method": self.method,
                                "meta": json.dumps(self.meta, default=str)})
        except (SafetensorError, OSError) as e:  # a directory, a missing or read-only folder
            raise ScoringError(f"cannot write weight scores to {p}: {e}; choose a path you "
                               "can write to") from e
        return p

    @classmethod
    def load(cls, path: str | Path) -> WeightScores:
        """Read scores written by :meth:`save` (a :class:`ScoringError` says why not)."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise ScoringError(f"weight-scores file {p} does not exist")
        try:
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != WEIGHT_SCORES_FORMAT:
                    raise ScoringError(f"{p} is not a tl_transplant weight-scores file")
                vals = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
            meta = json.loads(md.get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, ScoringError):
                raise
            raise ScoringError(f"cannot read weight scores {p} (corrupt or truncated?): "
                               f"{e}") from e
        return cls(vals, method=md["method"], meta=meta)


__all__ = ["WEIGHT_SCORES_FORMAT", "WeightScores"]
