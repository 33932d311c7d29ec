"""Parameter-matched controls: what a chosen transplant is compared against on test.

A control only counts at the same parameter count. For a configuration that moved
``n`` weights at alpha ``a`` (whatever made it: a K row, a budget, a scorer's suggested
set, a weight mask), each control is filled to ``n`` (:func:`match_control`):

* a unit-level control (``random``, ``weight_diff``, ...) by the usual
  :func:`~tl_transplant.edit.budget.fill_budget` rules at ``fraction = n / block params``: it
  lands at most one unit below ``n``;
* a weight-level control (``random@weight``, ``magnitude``, ``dare``) exactly: its ``n``
  best weights (``WeightScores.top_n``; only positive scores under the ``per_param`` rule);
* ``dare`` moves them at ``a x block / n`` (DARE's 1/p): an extrapolating control, labelled;
* ``dense`` (every block weight at one alpha) cannot match a parameter count, so it is
  compared *at the same retention cost*: its alpha is the best dev metric among the dense
  alphas whose dev retention drop is <= the configuration's dev drop
  (:func:`dense_alpha_at_cost`); with none, the target itself (alpha 0).

Each control runs at the configuration's alpha, on the test split, and
:func:`compare_with_controls` returns the paired test difference (configuration minus
control) with its bootstrap CI. The sweep calls it once for the chosen configuration (the
verdict of ``summary``, ``results.json`` and the report) and once per cell of the
comparison table; model runs go through the ``evaluate`` callable it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tl_transplant.edit.budget import block_params, count_params
from tl_transplant.edit.weights import WeightMask
from tl_transplant.evaluation.stats import DEFAULT_N_BOOT, paired_diff_ci
from tl_transplant.sweeps.records import ControlRecord, MaskRecord, VsRecord
from tl_transplant.sweeps.search import (
    EXTRAPOLATING,
    GRAIN_DENSE,
    GRAIN_WEIGHT,
    Chosen,
    Kinds,
    SweepError,
    alpha_scale_of,
    budget_units,
    grain_of,
    mask_summary,
)

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.evaluation.evaluator import TransplantReport

#: Scorer names that are baselines: a method of one of these names is also a control.
DEFAULT_CONTROL_METHODS: tuple[str, ...] = ("random", "weight_diff", "magnitude", "dare", "dense")
DENSE_AT_COST = (
    "dense: alpha chosen on dev, the best dev metric among the dense alphas whose dev "
    "retention drop is <= the configuration's dev drop (the same retention cost)"
)
#: ``evaluate(selection, effective_alpha, extrapolate, retention)`` on the test split.
Evaluate = Callable[[Chosen, float, bool, bool], "TransplantReport"]


def control_sources(
    controls: Sequence[str] | Mapping[str, object] | None,
    methods: Sequence[tuple[str, object]],
) -> list[tuple[str, object]]:
    """The controls of a sweep as ``[(label, scores)]``.

    None: every method whose scorer is a baseline (:data:`DEFAULT_CONTROL_METHODS`, any
    grain: ``random`` and ``random@weight`` both). A sequence: labels of ``methods``. A
    mapping: label -> scores object (a method's own object where the label is one).
    """
    by_label = dict(methods)
    if controls is None:
        return [(lb, o) for lb, o in methods
                if str(getattr(o, "method", lb.split("@")[0])) in DEFAULT_CONTROL_METHODS]
    if isinstance(controls, Mapping):
        return [(str(lb), o) for lb, o in controls.items()]
    out = []
    for lb in controls:
        if lb not in by_label:
            raise SweepError(f"control {lb!r} is not among the methods ({', '.join(by_label)}); "
                             "pass controls={label: scores} for a control that is not a method")
        out.append((lb, by_label[lb]))
    return out


@dataclass(frozen=True)
class DevPoint:
    """A dense alpha evaluated on dev: its metric and largest control drop."""

    alpha: float
    metric: float
    max_drop: float


def dense_alpha_at_cost(points: Sequence[DevPoint], drop: float) -> tuple[float, str]:
    """The dense alpha at the same retention cost as a configuration with dev ``drop``,
    and a note saying how it was chosen (alpha 0, the target, when no alpha qualifies)."""
    ok = [p for p in points if p.max_drop <= drop + 1e-12]
    if not ok:
        return 0.0, (f"no dense alpha kept the dev retention drop <= {drop:.3g} (the same "
                     "retention cost): compared with the target itself (alpha 0)")
    p = min(ok, key=lambda p: (-round(p.metric, 12), p.alpha))
    return p.alpha, (f"alpha {p.alpha:g} chosen on dev among {len(ok)} of {len(points)} dense "
                     f"alphas with dev drop <= {drop:.3g} (the same retention cost)")


@dataclass(frozen=True)
class MatchedControl:
    """A control filled to a configuration's parameter count (or, dense, its retention cost)."""

    label: str
    method: str
    grain: str
    selection: Chosen
    n_params: int
    alpha: float
    alpha_scale: float = 1.0
    note: str = ""

    @property
    def effective_alpha(self) -> float:
        return self.alpha * self.alpha_scale

    @property
    def extrapolates(self) -> bool:
        return self.effective_alpha > 1.0 + 1e-12


def match_control(
    label: str,
    obj: object,
    *,
    n_params: int,
    alpha: float,
    drop: float,
    layout: ModelLayout,
    kinds: Kinds = None,
    kv: str = "group",
    dense_points: Sequence[DevPoint] = (),
) -> MatchedControl:
    """The control ``obj`` at ``n_params`` weights and ``alpha`` (see the module docstring)."""
    method = str(getattr(obj, "method", label))
    grain = grain_of(obj)
    n_block = block_params(layout)
    if grain == GRAIN_DENSE:
        a, note = dense_alpha_at_cost(dense_points, drop)
        return MatchedControl(label, method, grain, list(layout.units("linear")), n_block, a,
                              1.0, f"{note}; 100% of block params")
    sel: Chosen
    if grain == GRAIN_WEIGHT:
        top_n = getattr(obj, "top_n")  # noqa: B009 - WeightScores
        sel = top_n(n_params) if n_params > 0 else WeightMask.empty()
        n = sel.n_params
    else:
        sel = (budget_units(obj, min(1.0, n_params / n_block), layout, kinds, kv)
               if n_params > 0 else [])

        n = count_params(layout, sel, kv) if sel else 0
    scale = alpha_scale_of(obj, n, n_block)
    note = EXTRAPOLATING if alpha * scale > 1.0 + 1e-12 else ""
    return MatchedControl(label, method, grain, sel, n, alpha, scale, note)


@dataclass
class ControlResult:
    """A matched control evaluated on test, and the paired difference against it."""

    control: MatchedControl
    report: TransplantReport
    #: The configuration's test metric minus the control's (paired over test examples).
    diff: float
    ci: tuple[float, float] | None
    chosen_n_params: int
    n_block: int

    def _sizes(self) -> dict[str, Any]:
        c, nb = self.control, max(1, self.n_block)
        sel = c.selection
        return {
            "grain": c.grain,
            "n_params": c.n_params,
            "pct_params": c.n_params / nb,
            "chosen_n_params": self.chosen_n_params,
            "chosen_pct_params": self.chosen_n_params / nb,
            "alpha": c.alpha,
            "effective_alpha": c.effective_alpha,
            "extrapolates": c.extrapolates,
            "n_units": None if isinstance(sel, WeightMask) else len(sel),
            "note": c.note,
        }

    def record(self) -> ControlRecord:
        """The verdict's entry (``results.json`` ``controls``): both sizes, test, difference."""
        c, m = self.control, self.report.metrics
        sel = c.selection
        return ControlRecord(
            method=c.method,
            **self._sizes(),
            units=None if isinstance(sel, WeightMask) or c.grain == GRAIN_DENSE
            else [str(u) for u in sel],
            mask=MaskRecord(**mask_summary(sel)) if isinstance(sel, WeightMask) else None,
            test=self.report.transplanted.mean,
            recovery=m.recovery,
            recovery_ci=_list(m.ci.get("recovery")),
            retention_drop=self.report.max_drop if self.report.retention else None,
            best_minus_control=self.diff,
            best_minus_control_ci=_list(self.ci),
        )

    def vs_record(self) -> VsRecord:
        """A comparison cell's entry (``cell.vs[label]``)."""
        return VsRecord(method=self.control.label, diff=self.diff, ci=_list(self.ci),
                        **self._sizes())

    def to_dict(self) -> dict[str, Any]:
        """:meth:`record` as JSON-ready data."""
        return self.record().to_dict()

    def vs_dict(self) -> dict[str, Any]:
        """:meth:`vs_record` as JSON-ready data."""
        return self.vs_record().to_dict()


def _list(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def compare_with_controls(
    chosen: TransplantReport,
    *,
    method: str,
    n_params: int,
    alpha: float,
    drop: float,
    controls: Sequence[tuple[str, object]],
    evaluate: Evaluate,
    layout: ModelLayout,
    kinds: Kinds = None,
    kv: str = "group",
    dense_points: Mapping[str, Sequence[DevPoint]] | None = None,
    retention: bool = True,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, ControlResult]:
    """Every control (but the configuration's own method) matched to ``n_params`` weights
    and ``alpha`` (dense: to the dev ``drop``), evaluated on test, with the paired
    difference ``chosen - control`` and its CI."""
    out: dict[str, ControlResult] = {}
    n_block = block_params(layout)
    for label, obj in controls:
        if label == method:
            continue
        mc = match_control(label, obj, n_params=n_params, alpha=alpha, drop=drop, layout=layout,
                           kinds=kinds, kv=kv, dense_points=(dense_points or {}).get(label, ()))
        rep = evaluate(mc.selection, mc.effective_alpha, mc.extrapolates, retention)
        a, b = chosen.transplanted.scores, rep.transplanted.scores
        out[label] = ControlResult(
            mc, rep, float(a.mean() - b.mean()),
            paired_diff_ci(a, b, n_boot=n_boot, level=level, seed=seed), n_params, n_block,
        )
    return out


__all__ = [
    "DEFAULT_CONTROL_METHODS",
    "DENSE_AT_COST",
    "ControlResult",
    "DevPoint",
    "Evaluate",
    "MatchedControl",
    "compare_with_controls",
    "control_sources",
    "dense_alpha_at_cost",
    "match_control",
]
