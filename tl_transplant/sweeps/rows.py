"""The rows of a sweep: one evaluated configuration (:class:`SweepRow`) and one cell of the
method x size comparison on test (:class:`ComparisonCell`), plus the JSON cleaner their
``to_dict`` results go through. Data only: nothing here runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.arch.units import parse_units
from tl_transplant.edit.budget import budget_label
from tl_transplant.edit.weights import WeightMask
from tl_transplant.sweeps.records import CellRecord, MaskRecord, VsRecord
from tl_transplant.sweeps.search import GRAIN_UNIT, Chosen, mask_summary

if TYPE_CHECKING:
    from tl_transplant.evaluation.evaluator import TransplantReport


@dataclass
class SweepRow:
    """One (method, size, alpha) configuration evaluated on the dev split."""

    method: str
    k: int
    alpha: float
    units: list[str]
    metric: float
    delta: float
    tir: float | None
    recovery: float | None
    control: dict[str, dict[str, float]] = field(default_factory=dict)
    feasible: bool = True
    pareto: bool = False
    test: TransplantReport | None = None
    #: The budget fraction this row filled, ``"suggested"`` for a scorer's own set,
    #: ``"dense"`` for every block weight, None for a top-K row.
    budget: float | str | None = None
    #: Distinct weights moved (KV groups brought along included), % of block
    #: parameters, and % of all units of the scored kinds (None when unknown or n/a).
    n_params: int | None = None
    pct_params: float | None = None
    pct_units: float | None = None
    #: ``"unit"``, ``"weight"`` (the row moves :attr:`mask`) or ``"dense"``.
    grain: str = GRAIN_UNIT
    mask: WeightMask | None = field(default=None, repr=False)
    #: Multiplies alpha (DARE: block params / params moved; an extrapolating control).
    alpha_scale: float = 1.0
    #: A scorer's own size above the largest budget asked for: shown, never chosen.
    over_budget: bool = False
    #: Per-example dev scores of the task (for the cross-validated selection estimate).
    dev_scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def selection(self) -> Chosen:
        """What the row moves: its weight mask, or its units."""
        return self.mask if self.mask is not None else parse_units(self.units)

    @property
    def effective_alpha(self) -> float:
        return self.alpha * self.alpha_scale

    @property
    def extrapolates(self) -> bool:
        """Whether the effective alpha is above 1 (DARE's rescaling: a labelled control)."""
        return self.effective_alpha > 1.0 + 1e-12

    @property
    def size(self) -> str:
        """What set the size: ``"K=8"``, ``"budget 1%"``, ``"suggested"`` or ``"dense"``."""
        if self.budget is None:
            return f"K={self.k}"
        if isinstance(self.budget, str):
            return self.budget
        return f"budget {budget_label(self.budget)}"

    @property
    def size_text(self) -> str:
        """``"1.02% params, 3.1% units (budget 1%, 5 units)"``: params first, then units."""
        pp = "?" if self.pct_params is None else f"{100 * self.pct_params:.3g}%"
        if self.mask is not None:
            return f"{pp} params ({self.size}, {self.n_params} single weights)"
        pu = "?" if self.pct_units is None else f"{100 * self.pct_units:.3g}%"
        extra = self.size if self.budget is None else f"{self.size}, {self.n_units} units"
        return f"{pp} params, {pu} units ({extra})"

    @property
    def recovery_per_pct(self) -> float | None:
        """Dev recovery per % of block parameters moved (the parameter-matched reading)."""
        if self.recovery is None or not self.pct_params:
            return None
        return self.recovery / (100 * self.pct_params)

    @property
    def max_drop(self) -> float:
        """Largest dev drop over the control tasks (0 without controls)."""
        return max((c["drop"] for c in self.control.values()), default=0.0)

    def key(self) -> tuple[float, int, int, float]:
        """Sort key of the selection rule: best metric, then fewer weights moved (when
        counted), then smaller K, then smaller alpha."""
        n = self.n_params if self.n_params is not None else 0
        return (-round(self.metric, 12), n, self.k, self.alpha)

    def __repr__(self) -> str:
        rec = "None" if self.recovery is None else f"{self.recovery:.3g}"
        size = "" if self.budget is None else f"{self.size}, "
        return (
            f"SweepRow({self.method}, {size}K={self.k}, alpha={self.alpha:g}, "
            f"dev={self.metric:.4g}, recovery={rec}, max_drop={self.max_drop:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            "method": self.method,
            "grain": self.grain,
            "pct_params": self.pct_params,
            "pct_units": self.pct_units,
            "budget": self.budget,
            "k": self.k,
            "alpha": self.alpha,
            "effective_alpha": self.effective_alpha,
            "extrapolates": self.extrapolates,
            "n_params": self.n_params,
            "n_units": self.n_units,
            "units": list(self.units),
            "mask": None if self.mask is None else mask_summary(self.mask),
            "dev_metric": self.metric,
            "delta": self.delta,
            "tir": self.tir,
            "recovery": self.recovery,
            "recovery_per_pct_params": self.recovery_per_pct,
            "control": self.control,
            "max_drop": self.max_drop,
            "feasible": self.feasible,
            "over_budget": self.over_budget,
            "pareto": self.pareto,
        }
        if self.test is not None:
            d["test"] = self.test.to_dict()
        return d


@dataclass
class ComparisonCell:
    """One (method, size) cell of the comparison: best alpha on dev, evaluated on test.

    ``vs[label]`` is the paired test difference of this cell's transplanted metric minus
    the control ``label`` filled to *this cell's* parameter count at its alpha (dense: at
    its dev retention cost), with its paired bootstrap CI and the control's size
    (:meth:`tl_transplant.sweeps.verdict.ControlResult.vs_record`).
    """

    method: str
    size: str
    row: SweepRow
    vs: dict[str, VsRecord] = field(default_factory=dict)

    def record(self) -> CellRecord:
        """The cell as a typed record (``results.json`` ``comparison.cells``)."""
        r, t = self.row, self.row.test
        m = t.metrics if t is not None else None
        return CellRecord(
            method=self.method,
            size=self.size,
            pct_params=r.pct_params,
            pct_units=r.pct_units,
            budget=r.budget,
            k=r.k,
            n_params=r.n_params,
            grain=r.grain,
            alpha=r.alpha,
            effective_alpha=r.effective_alpha,
            extrapolates=r.extrapolates,
            test_metric=None if m is None else m.transplanted,
            test_recovery=None if m is None else m.recovery,
            test_recovery_ci=None if m is None else _ci(m.ci.get("recovery")),
            test_delta=None if m is None else m.delta,
            test_delta_ci=None if m is None else _ci(m.ci.get("delta")),
            retention_drop=None if t is None else t.max_drop,
            retention={} if t is None else {x.task: x.drop for x in t.retention},
            dev_metric=r.metric,
            dev_recovery=r.recovery,
            recovery_per_pct_params=(
                None if m is None or m.recovery is None or not r.pct_params
                else m.recovery / (100 * r.pct_params)),
            dev_max_drop=r.max_drop,
            feasible=r.feasible,
            vs=dict(self.vs),
            units=list(r.units),
            mask=None if r.mask is None else MaskRecord(**mask_summary(r.mask)),
        )

    def to_dict(self) -> dict[str, Any]:
        """:meth:`record` as JSON-ready data."""
        return self.record().to_dict()


def _ci(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def clean_json(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


__all__ = ["ComparisonCell", "SweepRow", "clean_json"]
