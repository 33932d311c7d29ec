"""Sweep K (number of units) or parameter budgets x alpha on dev, report the choice on test.

>>> res = sweep(pair, task, scores, ks=[8, 16, 32], alphas=[0.5, 1.0],
...             budgets=[0.001, 0.005, 0.01, 0.02, 0.05],            # doctest: +SKIP
...             control_tasks=[control], max_retention_drop=0.05, compare_on_test=True)
>>> res.best, res.best.test.metrics.recovery                           # doctest: +SKIP
>>> res.comparison_frame()   # method x size on test, alphas chosen on dev  # doctest: +SKIP
>>> res.save("out/")   # results.json, sweep.csv, sweep.png            # doctest: +SKIP

Protocol:

1. ``task`` and every control task are split by :meth:`Task.split` with the same
   ``dev_fraction`` and ``seed`` (the split depends on indices only, never labels).
2. Source and target are evaluated on dev; controls on the target's dev split.
3. For each method, size (top-K, a parameter budget filled by the method's
   ``within_budget``, or the scorer's suggested set) and alpha, the units are
   transplanted with the
   reversible :func:`~tl_transplant.edits.transplant` (no copies, no
   reloads; bit-exact restore) and dev task + dev controls are evaluated.
   K = 0 or alpha = 0 is the target itself and reuses its baseline; identical
   (unit set, alpha) configurations are evaluated once.
4. Best = highest dev metric among configurations whose largest dev control
   drop is <= ``max_retention_drop`` (all, if None); ties go to fewer weights
   moved, then the smaller K, then the smaller alpha, then the earlier method.
   Without a control task given, a generic one is used (``control_tasks=None``,
   see :func:`sweep`). Only then is anything run on
   the test split: source, target and the chosen configuration(s), with paired
   bootstrap CIs and retention on the controls' test splits.
5. Pareto front (recovery vs retention, on dev): configurations not dominated in
   (dev metric, -max dev control drop); recovery is an increasing affine
   function of the metric when source > target, so this is the recovery vs
   retention front. Among identical points only the tie-break winner is kept.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast, overload, runtime_checkable

from tl_transplant.budget import (
    block_params,
    budget_label,
    check_fraction,
    count_params,
    fill_budget,
)
from tl_transplant.evaluation import (
    EditFactory,
    EvalResult,
    TransplantReport,
    UnitsLike,
    evaluate,
    evaluate_transplant,
)
from tl_transplant.stats import (
    DEFAULT_GAP_TOL,
    DEFAULT_N_BOOT,
    UndefinedMetricWarning,
    paired_diff_ci,
    recovery,
    tir,
)
from tl_transplant.summary import COMPARISON_NOTE, format_sweep_summary
from tl_transplant.tasks import Task
from tl_transplant.tokens import resolve_prepend_bos
from tl_transplant.units import Unit, normalize_kinds, parse_units

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

    from tl_transplant.edits import KVMode
    from tl_transplant.layouts import ModelLayout
    from tl_transplant.pair import ModelPair, ModelSide

#: Unit kinds as :func:`~tl_transplant.units.normalize_kinds` takes them (None: all).
Kinds: TypeAlias = "str | Iterable[str] | None"


@runtime_checkable
class RankedSource(Protocol):
    """What :func:`sweep` needs of a scores object (a :class:`~tl_transplant.Scores` is one)."""

    def top(self, k: int, kinds: Kinds = None) -> Sequence[Unit | str]: ...


@runtime_checkable
class HasSplits(Protocol):
    """Given dev/test splits of a task (e.g. the zoo's ``Splits``)."""

    @property
    def dev(self) -> Task: ...

    @property
    def test(self) -> Task: ...


#: A task to split here, its given splits, or a ``(dev, test)`` tuple.
TaskLike: TypeAlias = "Task | HasSplits | tuple[Task, Task] | list[Task]"
#: ``scores`` as :func:`sweep` takes it (see its docstring).
ScoresLike: TypeAlias = (
    "RankedSource | Sequence[RankedSource] | UnitsLike "
    "| Mapping[str, RankedSource | Sequence[Unit | str] | str]"
)

_TIE_DECIMALS = 12


class RankedUnits:
    """A plain ranked list of units as a scores object: ``top(k, kinds)`` filters then cuts."""

    def __init__(self, units: UnitsLike, method: str = "ranked") -> None:
        self.units = parse_units(units)
        self.method = method

    def top(self, k: int, kinds: Kinds = None) -> list[Unit]:
        allowed = normalize_kinds(kinds)
        return [u for u in self.units if u.kind in allowed][: int(k)]

    def within_budget(
        self, fraction: float, layout: ModelLayout, kinds: Kinds = None, kv: str = "group"
    ) -> list[Unit]:
        """Walk the ranking, keep each unit that still fits (a plain ranking: rule "score")."""
        return fill_budget(self.top(len(self.units), kinds), layout, fraction, rule="score",
                           kv=kv).units

    def __repr__(self) -> str:
        return f"RankedUnits({self.method!r}, n={len(self.units)})"


def _is_unit_like(x: object) -> bool:
    return isinstance(x, str) or hasattr(x, "kind") and hasattr(x, "layer")


def _methods(scores: ScoresLike) -> list[tuple[str, RankedSource]]:
    """Normalize ``scores`` to ``[(method name, object with .top)]``."""
    if isinstance(scores, Mapping):
        items: list[tuple[str | None, Any]] = [(str(k), v) for k, v in scores.items()]
    elif hasattr(scores, "top"):
        items = [(None, scores)]
    elif isinstance(scores, (list, tuple)) and scores and all(hasattr(s, "top") for s in scores):
        items = [(None, s) for s in scores]
    elif isinstance(scores, (str, list, tuple)) and all(
        _is_unit_like(u) for u in ([scores] if isinstance(scores, str) else scores)
    ):
        items = [("ranked", RankedUnits(scores))]
    else:
        raise TypeError(
            "scores must be an object with .top(k, kinds=...), a ranked list of units, a list "
            f"of scores objects or a {{method: scores}} mapping; got {type(scores).__name__}"
        )
    out: list[tuple[str, RankedSource]] = []
    for name, obj in items:
        if isinstance(obj, (list, tuple, str)):
            obj = RankedUnits(obj, method=name or "ranked")
        if not hasattr(obj, "top"):
            raise TypeError(f"scores for method {name!r} has no .top(k)")
        base = name or str(getattr(obj, "method", None) or type(obj).__name__)
        label, n = base, 2
        while label in {m for m, _ in out}:
            label, n = f"{base}#{n}", n + 1
        out.append((label, obj))
    return out


def _splits(t: TaskLike, dev_fraction: float, seed: int, what: str) -> tuple[str, Task, Task]:
    """``(name, dev, test)`` from a Task (split here) or given splits (.dev/.test, or a pair)."""
    if isinstance(t, Task):
        dev, test = t.split(dev_fraction, seed)
        return t.name, dev, test
    if hasattr(t, "dev") and hasattr(t, "test"):
        given = cast("HasSplits", t)
        dev, test = given.dev, given.test
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        dev, test = t
    else:
        raise TypeError(
            f"{what} must be a Task (split into dev/test here) or its given (dev, test) splits, "
            f"got {type(t).__name__}"
        )
    if not isinstance(dev, Task) or not isinstance(test, Task):
        raise TypeError(f"{what}: dev and test must be Tasks")
    if dev.metric != test.metric:
        raise ValueError(f"{what}: dev uses {dev.metric} but test uses {test.metric}")
    name = dev.name[: -len(":dev")] if dev.name.endswith(":dev") else dev.name
    return name, dev, test


def _top(obj: RankedSource, k: int, kinds: Kinds) -> list[Unit]:
    if k == 0:
        return []
    got = obj.top(k) if kinds is None else obj.top(k, kinds=kinds)
    return list(dict.fromkeys(parse_units(list(got))))


@dataclass
class SweepRow:
    """One (method, K, alpha) configuration evaluated on the dev split."""

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
    #: None for a top-K row.
    budget: float | str | None = None
    #: Distinct weights moved (KV groups brought along included), % of block
    #: parameters, and % of all units of the scored kinds (None when unknown).
    n_params: int | None = None
    pct_params: float | None = None
    pct_units: float | None = None

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def size(self) -> str:
        """What set the size: ``"K=8"``, ``"budget 1%"`` or ``"suggested"``."""
        if self.budget is None:
            return f"K={self.k}"
        if isinstance(self.budget, str):
            return self.budget
        return f"budget {budget_label(self.budget)}"

    @property
    def size_text(self) -> str:
        """``"1.02% params, 3.1% units (budget 1%, 5 units)"``: params first, then units."""
        pp = "?" if self.pct_params is None else f"{100 * self.pct_params:.3g}%"
        pu = "?" if self.pct_units is None else f"{100 * self.pct_units:.3g}%"
        extra = self.size if self.budget is None else f"{self.size}, {self.n_units} units"
        return f"{pp} params, {pu} units ({extra})"

    @property
    def max_drop(self) -> float:
        """Largest dev drop over the control tasks (0 without controls)."""
        return max((c["drop"] for c in self.control.values()), default=0.0)

    def key(self) -> tuple[float, int, int, float]:
        """Sort key of the selection rule: best metric, then fewer weights moved (when
        counted), then smaller K, then smaller alpha."""
        n = self.n_params if self.n_params is not None else 0
        return (-round(self.metric, _TIE_DECIMALS), n, self.k, self.alpha)

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
            "pct_params": self.pct_params,
            "pct_units": self.pct_units,
            "budget": self.budget,
            "k": self.k,
            "alpha": self.alpha,
            "n_params": self.n_params,
            "n_units": self.n_units,
            "units": list(self.units),
            "dev_metric": self.metric,
            "delta": self.delta,
            "tir": self.tir,
            "recovery": self.recovery,
            "control": self.control,
            "max_drop": self.max_drop,
            "feasible": self.feasible,
            "pareto": self.pareto,
        }
        if self.test is not None:
            d["test"] = self.test.to_dict()
        return d


def choose_best(
    rows: Sequence[SweepRow], max_retention_drop: float | None = None
) -> SweepRow | None:
    """The selection rule: highest dev metric among feasible rows; ties -> fewer weights
    moved, smaller K, smaller alpha.

    A row is feasible when its largest dev control drop is ``<= max_retention_drop``
    (always, if None). Remaining ties keep the earliest row (method order).
    """
    ok = [r for r in rows if _feasible(r, max_retention_drop)]
    return min(ok, key=lambda r: r.key()) if ok else None


def _feasible(row: SweepRow, max_drop: float | None) -> bool:
    return max_drop is None or row.max_drop <= max_drop + 1e-12


def pareto_front(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Rows not dominated in (dev metric, -max drop); one per identical point (tie rule)."""
    pts: dict[tuple[float, float], SweepRow] = {}
    for r in sorted(rows, key=lambda r: r.key()):
        p = (round(r.metric, _TIE_DECIMALS), -round(r.max_drop, _TIE_DECIMALS))
        pts.setdefault(p, r)
    front = []
    for p, r in pts.items():
        dominated = any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (-r.metric, r.max_drop))


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class SweepResult:
    """All dev configurations, the choice, its test report, and the Pareto front."""

    task: dict[str, Any]
    metric: str
    rows: list[SweepRow]
    baselines: dict[str, dict[str, EvalResult]]
    control_baselines: dict[str, dict[str, EvalResult]]
    best: SweepRow | None
    best_by_method: dict[str, SweepRow]
    config: dict[str, Any]
    pair: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: ``compare_on_test=True``: one cell per (method, size), best alpha on dev, on test.
    comparison: list[ComparisonCell] = field(default_factory=list)

    @property
    def pareto(self) -> list[SweepRow]:
        """The recovery-vs-retention Pareto front on dev (best metric first)."""
        return sorted((r for r in self.rows if r.pareto), key=lambda r: (-r.metric, r.max_drop))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    def __repr__(self) -> str:
        return (
            f"SweepResult(task={self.task.get('name')!r}, metric={self.metric}, "
            f"configs={len(self.rows)}, best={self.best!r})"
        )

    def summary(self) -> str:
        """A few human-readable lines (:func:`tl_transplant.summary.format_sweep_summary`)."""
        return format_sweep_summary(self)

    # ---- tables ---------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per (method, size, alpha) with dev numbers; ``best`` marks the choice.

        Sizes: ``pct_params`` (of block parameters) first, then ``pct_units``; ``size``
        says whether K, a budget or a scorer's suggested set made the row.
        """
        import pandas as pd

        recs = []
        for r in self.rows:
            rec: dict[str, Any] = {
                "method": r.method,
                "pct_params": r.pct_params,
                "pct_units": r.pct_units,
                "size": r.size,
                "budget": r.budget,
                "k": r.k,
                "alpha": r.alpha,
                "n_params": r.n_params,
                "n_units": r.n_units,
                f"dev_{self.metric}": r.metric,
                "delta": r.delta,
                "tir": r.tir,
                "recovery": r.recovery,
            }
            for name, c in r.control.items():
                rec[f"drop:{name}"] = c["drop"]
            rec.update(
                max_drop=r.max_drop,
                feasible=r.feasible,
                pareto=r.pareto,
                best=r is self.best,
                units=",".join(r.units),
            )
            recs.append(rec)
        return pd.DataFrame.from_records(recs)

    def by_method(self) -> pd.DataFrame:
        """Methods side by side at equal K: the best-over-alpha dev metric (K x method).

        Top-K rows only; :meth:`by_budget` is the same for budget rows.
        """
        df = self.to_frame()
        df = df[df["budget"].isna()]
        return df.pivot_table(
            index="k", columns="method", values=f"dev_{self.metric}", aggfunc="max"
        )

    def by_budget(self) -> pd.DataFrame:
        """Methods side by side at equal parameter budget: best-over-alpha dev metric."""
        df = self.to_frame()
        df = df[df["budget"].map(lambda b: isinstance(b, float))]
        return df.pivot_table(
            index="budget", columns="method", values=f"dev_{self.metric}", aggfunc="max"
        )

    def comparison_frame(self) -> pd.DataFrame:
        """The comparison table, one row per (method, size): choice made on dev, test shown.

        Columns: method, size, pct_params, pct_units, alpha (best on dev), test metric,
        test recovery and its CI, test retention drop, dev metric and dev recovery, and
        the paired test difference (CI) against random / weight_diff at the same size.
        """
        import pandas as pd

        recs = []
        for c in self.comparison:
            d = c.to_dict()
            rec = {k: d[k] for k in ("method", "size", "pct_params", "pct_units", "alpha")}
            rec.update(
                test_metric=d["test_metric"],
                test_recovery=d["test_recovery"],
                test_recovery_ci=d["test_recovery_ci"],
                retention_drop=d["retention_drop"],
                dev_metric=d["dev_metric"],
                dev_recovery=d["dev_recovery"],
                feasible=d["feasible"],
            )
            for ctrl, v in d["vs"].items():
                rec[f"minus_{ctrl}"] = v["diff"]
                rec[f"minus_{ctrl}_ci"] = v["ci"]
            recs.append(rec)
        return pd.DataFrame.from_records(recs)

    def to_dict(self) -> dict[str, Any]:
        def base(split: str) -> dict[str, Any]:
            return {
                k: v.to_dict(with_scores=False) for k, v in self.baselines.get(split, {}).items()
            }

        return _clean(
            {
                "task": self.task,
                "metric": self.metric,
                "pair": self.pair,
                "config": self.config,
                "baselines": {s: base(s) for s in self.baselines},
                "control_baselines": {
                    s: {k: v.to_dict(with_scores=False) for k, v in d.items()}
                    for s, d in self.control_baselines.items()
                },
                "best": None if self.best is None else self.best.to_dict(),
                "best_by_method": {m: r.to_dict() for m, r in self.best_by_method.items()},
                "pareto": [
                    {
                        "method": r.method,
                        "pct_params": r.pct_params,
                        "pct_units": r.pct_units,
                        "size": r.size,
                        "k": r.k,
                        "alpha": r.alpha,
                        "dev_metric": r.metric,
                        "recovery": r.recovery,
                        "max_drop": r.max_drop,
                    }
                    for r in self.pareto
                ],
                "rows": [{k: v for k, v in r.to_dict().items() if k != "test"} for r in self.rows],
                "comparison": {
                    "note": COMPARISON_NOTE,
                    "cells": [c.to_dict() for c in self.comparison],
                } if self.comparison else None,
                "notes": self.notes,
            }
        )

    # ---- figures --------------------------------------------------------------------
    @overload
    def plot(self, ax: None = None) -> Figure: ...
    @overload
    def plot(self, ax: Axes) -> Figure | SubFigure: ...

    def plot(self, ax: Axes | None = None) -> Figure | SubFigure:
        """Dev metric vs K, one line per alpha (one panel per method), with baselines.

        With budget rows the x axis is % of block parameters for every row (K rows as
        circles, budget rows as squares, a scorer's suggested set as stars).

        Uses matplotlib's object API with the Agg canvas (no pyplot, no global
        backend change). Returns the Figure. Kept here because it imports only
        matplotlib (nothing above the sweep); :func:`tl_transplant.viz.sweep_plot`
        builds the report's figure on it.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        methods = self.methods
        fig: Figure | SubFigure
        if ax is None:
            fig = Figure(figsize=(4.2 * len(methods) + 0.8, 3.6), layout="constrained")
            FigureCanvasAgg(fig)
            axes = fig.subplots(1, len(methods), sharey=True, squeeze=False)[0]
        else:
            fig, axes = ax.figure, [ax] * len(methods)  # a Figure, or a SubFigure's
        alphas = sorted({r.alpha for r in self.rows})
        colors = [f"C{i}" for i in range(10)]
        dev = self.baselines["dev"]
        # With budget rows, x is % of block parameters for every row (K rows included).
        by_params = any(r.budget is not None for r in self.rows) and all(
            r.pct_params is not None for r in self.rows
        )

        def x_of(r: SweepRow) -> float:
            return 100 * float(r.pct_params or 0.0) if by_params else float(r.k)

        series = [("K", "o", lambda r: r.budget is None),
                  ("budget", "s", lambda r: isinstance(r.budget, float)),
                  ("suggested", "*", lambda r: isinstance(r.budget, str))]
        for a_i, (m, a) in enumerate(zip(methods, axes)):
            for j, alpha in enumerate(alphas):
                for s_name, marker, keep in series:
                    pts = sorted(
                        (x_of(r), r.metric) for r in self.rows
                        if r.method == m and r.alpha == alpha and keep(r)
                    )
                    if not pts:
                        continue
                    label = f"alpha={alpha:g}" + ("" if s_name == "K" else f" ({s_name})")
                    a.plot(
                        *zip(*pts),
                        marker=marker,
                        color=colors[j % 10],
                        label=label,
                        linestyle="-" if ax is None else ["-", "--", ":", "-."][a_i % 4],
                    )
            a.axhline(
                dev["source"].mean, color="green", linestyle="--", linewidth=1, label="source"
            )
            a.axhline(dev["target"].mean, color="red", linestyle=":", linewidth=1, label="target")
            b = self.best_by_method.get(m)
            if b is not None:
                a.plot(
                    [x_of(b)],
                    [b.metric],
                    marker="*",
                    markersize=14,
                    color="gold",
                    markeredgecolor="black",
                    linestyle="none",
                    label="chosen",
                )
            if by_params:
                xs = sorted({x_of(r) for r in self.rows})
                if xs and xs[0] <= 0:
                    a.set_xscale("symlog", linthresh=max(1e-3, min((x for x in xs if x > 0),
                                                                   default=1.0)))
                elif len(xs) > 1:
                    a.set_xscale("log")
                a.set_xlabel("% of block parameters transplanted")
            else:
                if any(r.k == 0 for r in self.rows):
                    a.set_xscale("symlog", linthresh=1)
                elif len({r.k for r in self.rows}) > 1:
                    a.set_xscale("log", base=2)
                k_vals = sorted({r.k for r in self.rows})
                a.set_xticks(k_vals, [str(k) for k in k_vals], minor=False)
                a.set_xticks([], minor=True)
                a.set_xlabel("K (units transplanted)")
            a.set_title(m if ax is None else f"{self.task.get('name')}")
        axes[0].set_ylabel(f"dev {self.metric}")
        axes[0].legend(fontsize="small")
        return fig

    def save(self, directory: str | Path, *, report: bool = False, **report_kwargs: Any) -> Path:
        """Write ``results.json``, ``sweep.csv`` and ``sweep.png`` under ``directory``
        (and ``comparison.csv`` when the sweep ran ``compare_on_test``).

        ``report=True`` also writes the self-contained ``report.html``; keyword
        arguments (``pair=``, ``task=``, ``scores=``, ...) go to
        :func:`tl_transplant.report.write_report`. This module does not import the
        report (it sits above the sweep): ``tl_transplant.report`` registers itself
        with :func:`register_report_writer`, and the package imports it.
        """
        if report_kwargs and not report:
            raise TypeError(f"unexpected arguments without report=True: {sorted(report_kwargs)}")
        writer = _REPORT_WRITER.get("write")
        if report and writer is None:
            raise RuntimeError(
                "SweepResult.save(report=True) needs tl_transplant.report, which registers the "
                "report writer when imported; `import tl_transplant.report` first"
            )
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        self.to_frame().to_csv(d / "sweep.csv", index=False)
        if self.comparison:
            self.comparison_frame().to_csv(d / "comparison.csv", index=False)
        self.plot().savefig(d / "sweep.png", dpi=120)
        if report and writer is not None:
            writer(d / "report.html", sweep_result=self, **report_kwargs)
        return d


_REPORT_WRITER: dict[str, Callable[..., Any]] = {}


def register_report_writer(write: Callable[..., Any]) -> None:
    """Set what ``SweepResult.save(report=True)`` calls: ``write(path, sweep_result=..., **kw)``.

    :mod:`tl_transplant.report` registers :func:`~tl_transplant.report.write_report`
    when it is imported, so the call goes report -> sweep, never sweep -> report.
    """
    _REPORT_WRITER["write"] = write


#: What results.json and the report say about the default control task.
GENERIC_RETENTION_NOTE = (
    "generic_retention (a generic proxy: agreement with the unedited target's next-token "
    "predictions on built-in text and the task's own prompts)"
)
_CONTROL_METHODS = ("random", "weight_diff")  # paired test differences against these


def _scored_kinds(obj: RankedSource, units: Kinds) -> tuple[str, ...]:
    """The unit kinds a method ranks: ``units`` if given, else what it scored."""
    if units is not None:
        return normalize_kinds(units)
    got = getattr(obj, "kinds", None)
    if got:
        return normalize_kinds(list(got))
    ranked = getattr(obj, "units", None)
    if ranked:
        return normalize_kinds(sorted({u.kind for u in parse_units(list(ranked))}))
    return normalize_kinds(None)


def _budget_units(
    obj: RankedSource, fraction: float, layout: ModelLayout, kinds: Kinds, kv: str
) -> list[Unit]:
    """``obj.within_budget`` if it has one; else its ranking walked with the "score" rule."""
    if hasattr(obj, "within_budget"):
        got = obj.within_budget(fraction, layout, kinds=kinds, kv=kv)
    else:
        n = len(layout.units(None))
        ranked = obj.top(n) if kinds is None else obj.top(n, kinds=kinds)
        got = fill_budget(list(ranked), layout, fraction, rule="score", kv=kv).units
    return list(dict.fromkeys(parse_units(list(got))))


def _suggested(obj: RankedSource, kinds: Kinds) -> list[Unit] | None:
    """The scorer's suggested set (``meta["suggested"]``), filtered to ``kinds``."""
    meta = getattr(obj, "meta", None)
    if not isinstance(meta, Mapping) or meta.get("suggested") is None:
        return None
    allowed = normalize_kinds(kinds)
    return [u for u in dict.fromkeys(parse_units(list(meta["suggested"]))) if u.kind in allowed]


@dataclass
class ComparisonCell:
    """One (method, size) cell of the comparison: best alpha on dev, evaluated on test.

    ``vs[name]`` is the paired test difference of this cell's transplanted metric minus
    the ``name`` method's cell at the same size (``random``, ``weight_diff``), with its
    paired bootstrap CI.
    """

    method: str
    size: str
    row: SweepRow
    vs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        r, t = self.row, self.row.test
        m = t.metrics if t is not None else None
        return {
            "method": self.method,
            "size": self.size,
            "pct_params": r.pct_params,
            "pct_units": r.pct_units,
            "budget": r.budget,
            "k": r.k,
            "n_params": r.n_params,
            "alpha": r.alpha,
            "test_metric": None if m is None else m.transplanted,
            "test_recovery": None if m is None else m.recovery,
            "test_recovery_ci": None if m is None else m.ci.get("recovery"),
            "test_delta": None if m is None else m.delta,
            "test_delta_ci": None if m is None else m.ci.get("delta"),
            "retention_drop": None if t is None else t.max_drop,
            "retention": {} if t is None else {x.task: x.drop for x in t.retention},
            "dev_metric": r.metric,
            "dev_recovery": r.recovery,
            "dev_max_drop": r.max_drop,
            "feasible": r.feasible,
            "vs": self.vs,
            "units": list(r.units),
        }


def sweep(
    pair: ModelPair,
    task: TaskLike,
    scores: ScoresLike,
    ks: Sequence[int] = (8, 16, 32, 64, 128),
    alphas: Sequence[float] = (1.0,),
    control_tasks: Sequence[TaskLike] | None = None,
    dev_fraction: float = 0.5,
    units: Kinds = None,
    max_retention_drop: float | None = None,
    seed: int = 0,
    *,
    budgets: Sequence[float] = (),
    compare_on_test: bool = False,
    kv: KVMode = "group",
    prepend_bos: bool | str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    gap_tol: float = DEFAULT_GAP_TOL,
    report_each_method: bool = True,
    edit: EditFactory | None = None,
    retention_kwargs: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Evaluate every (method, K or budget, alpha) on dev, choose on dev, report it on test.

    ``task`` and each control task: a :class:`Task`, split here by
    ``Task.split(dev_fraction, seed)``, or already-made splits (an object with
    ``.dev``/``.test``, e.g. the zoo's ``Splits``, or a ``(dev, test)`` tuple).

    ``scores``: an object with ``.top(k, kinds=...)`` (and optionally ``.method``,
    ``.within_budget``, ``.meta``), a ranked list of units, a list of such objects, or
    ``{method: scores}`` to compare selection methods (and controls such as random)
    side by side. ``units``: the unit kinds to rank (``"head"``, ``"neuron"``,
    ``"linear"`` or a list), passed as ``top(k, kinds=units)``.

    ``budgets``: fractions of the block parameters (see :mod:`tl_transplant.budget`),
    each filled with the method's ``within_budget`` (plain rankings walk their order);
    they sit beside ``ks`` (pass ``ks=()`` for budgets only). A scorer whose
    ``meta["suggested"]`` holds a unit set also gets that set as rows (size
    ``"suggested"``). Every row records ``n_params``, ``pct_params`` (of block
    parameters) and ``pct_units`` (of all units of the scored kinds).

    ``control_tasks``: None (default) uses
    :func:`tl_transplant.retention.generic_retention` built from the task's dev
    prompts (``retention_kwargs`` go to it); ``()`` means no control at all.
    ``max_retention_drop``: the largest allowed drop of any control task's dev
    metric. ``report_each_method`` also reports each method's own best on test.
    ``compare_on_test``: for every (method, size) take the best alpha on dev and
    evaluate it on test (:attr:`SweepResult.comparison`); the overall choice is still
    made on dev only. ``edit(pair, units, alpha)`` replaces the weight transplant by
    another reversible context manager. See the module docstring for the protocol.
    """
    from tqdm.auto import tqdm

    from tl_transplant.edits import transplant

    methods = _methods(scores)
    ks = [int(k) for k in ks]
    alphas = [float(a) for a in alphas]
    fracs = [check_fraction(b, "each budget") for b in budgets]
    fracs = list(dict.fromkeys(fracs))
    if (not ks and not fracs) or not alphas:
        raise ValueError("give at least one K (ks) or budget (budgets), and a non-empty alphas")
    if any(k < 0 for k in ks):
        raise ValueError(f"ks must be >= 0, got {ks}")
    layout: ModelLayout | None = getattr(pair, "layout", None)
    if fracs and layout is None:
        raise TypeError("budgets need pair.layout (a ModelPair) to count parameters")
    name, dev, test = _splits(task, dev_fraction, seed, "task")
    retention_mode = "given" if control_tasks else "none"
    if control_tasks is None:
        from tl_transplant.retention import generic_retention

        kw = {"seed": seed, "batch_size": batch_size, "prepend_bos": prepend_bos,
              **dict(retention_kwargs or {})}
        control_tasks = [generic_retention(pair, dev, **kw)]
        retention_mode = "generic"
    controls = [
        _splits(c, dev_fraction, seed, f"control task {i}") for i, c in enumerate(control_tasks)
    ]
    names = [c[0] for c in controls]
    if len(set(names)) != len(names) or name in names:
        raise ValueError(f"control tasks need distinct names, different from the task: {names}")
    make: EditFactory = edit or (lambda p, u, a: transplant(p, u, a, kv=kv))
    n_active = len(getattr(pair, "active", []))
    n_block = block_params(layout) if layout is not None else None

    def bos_for(t: Task) -> bool:
        return resolve_prepend_bos(pair, t.prepend_bos if prepend_bos is None else prepend_bos)

    def ev(side: ModelSide, t: Task) -> EvalResult:
        return evaluate(side, t, prepend_bos=bos_for(t), batch_size=batch_size, progress=False)

    notes: list[str] = []
    if retention_mode == "generic":
        notes.append(f"control task: {GENERIC_RETENTION_NOTE}; no control task was given")
    elif retention_mode == "none":
        notes.append("no control task: retention was not measured")

    # -- dev: baselines, then every configuration ----------------------------------------
    base_dev = {"source": ev(pair.source, dev), "target": ev(pair.target, dev)}
    c_dev_before = {n: ev(pair.target, cd) for n, cd, _ in controls}
    s_dev, t_dev = base_dev["source"].mean, base_dev["target"].mean
    if abs(s_dev - t_dev) < gap_tol:
        msg = (
            f"dev: recovery undefined: |source - target| = {abs(s_dev - t_dev):.3g} is below "
            f"the tolerance {gap_tol:g}; selection still uses the dev metric"
        )
        notes.append(msg)
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=2)

    n_kind_units: dict[str, int | None] = {}
    plans: list[tuple[str, int, float | str | None, float, list[Unit], int | None]] = []
    for m, obj in methods:
        kinds_m = _scored_kinds(obj, units)
        n_kind_units[m] = len(layout.units(kinds_m)) if layout is not None else None
        sized: list[tuple[int, float | str | None, list[Unit]]] = []
        for k in ks:
            us = _top(obj, k, units)
            if len(us) < k:
                notes.append(f"{m}: K={k} asked but only {len(us)} units are ranked")
            sized.append((k, None, us))
        for f in fracs:
            assert layout is not None
            us = _budget_units(obj, f, layout, units, kv)
            sized.append((len(us), f, us))
        sugg = _suggested(obj, units)
        if sugg is not None:
            sized.append((len(sugg), "suggested", sugg))
        for k, bud, us in sized:
            cost = (count_params(layout, us, kv) if us else 0) if layout is not None else None
            for a in alphas:
                plans.append((m, k, bud, a, us, cost))
    cache: dict[tuple[frozenset[Unit], float], tuple[float, dict[str, float]]] = {}
    rows: list[SweepRow] = []
    bar = tqdm(total=len(plans), desc=f"sweep {name}", disable=not progress, unit="cfg")
    try:
        for m, k, bud, a, us, n_par in plans:
            key = (frozenset(us), a if us else 0.0)
            if key not in cache:
                if not us or a == 0.0:
                    x = base_dev["target"].mean
                    after = {n: r.mean for n, r in c_dev_before.items()}
                else:
                    with make(pair, us, a):
                        x = ev(pair.target, dev).mean
                        after = {n: ev(pair.target, cd).mean for n, cd, _ in controls}
                cache[key] = (x, after)
            x, after = cache[key]
            control = {
                n: {"before": c_dev_before[n].mean, "after": v, "drop": c_dev_before[n].mean - v}
                for n, v in after.items()
            }
            n_kind = n_kind_units[m]
            rows.append(
                SweepRow(
                    method=m,
                    k=k,
                    alpha=a,
                    units=[str(u) for u in us],
                    metric=x,
                    delta=x - t_dev,
                    tir=tir(x, t_dev, metric=dev.metric, warn=False),
                    recovery=recovery(x, t_dev, s_dev, gap_tol=gap_tol, warn=False),
                    control=control,
                    budget=bud,
                    n_params=n_par,
                    pct_params=None if n_par is None or not n_block else n_par / n_block,
                    pct_units=None if not n_kind else len(us) / n_kind,
                )
            )
            bar.update(1)
    finally:
        bar.close()
    for r in rows:
        r.feasible = _feasible(r, max_retention_drop)
    front = pareto_front(rows)
    for r in front:
        r.pareto = True
    best = choose_best(rows, max_retention_drop)
    best_by_method = {}
    for m, _ in methods:
        b = choose_best([r for r in rows if r.method == m], max_retention_drop)
        if b is not None:
            best_by_method[m] = b
    if best is None:
        msg = (
            f"no configuration kept every control task's dev drop <= {max_retention_drop}; "
            "nothing is reported on test"
            + (" (the comparison table still shows every cell on test)" if compare_on_test
               else "")
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)

    # The comparison: per (method, size), the best alpha on dev (feasible if any is).
    cells: list[ComparisonCell] = []
    if compare_on_test:
        groups: dict[tuple[str, str], list[SweepRow]] = {}
        for r in rows:
            groups.setdefault((r.method, r.size), []).append(r)
        for (m, size), grp in groups.items():
            pick = choose_best(grp, max_retention_drop) or choose_best(grp, None)
            assert pick is not None
            cells.append(ComparisonCell(m, size, pick))

    # -- test: only now, and only for the chosen configuration(s) ------------------------
    base_test: dict[str, EvalResult] = {}
    c_test_before: dict[str, EvalResult] = {}
    if best is not None or cells:
        base_test = {"source": ev(pair.source, test), "target": ev(pair.target, test)}
        c_test_before = {ct.name: ev(pair.target, ct) for _, _, ct in controls}
        chosen = [best] if best is not None else []
        chosen += list(best_by_method.values()) if report_each_method else []
        chosen += [c.row for c in cells]
        reports: dict[tuple[frozenset[str], float], TransplantReport] = {}
        for r in chosen:
            key2 = (frozenset(r.units), r.alpha if r.units else 0.0)
            if key2 not in reports:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", UndefinedMetricWarning)
                    reports[key2] = evaluate_transplant(
                        pair,
                        test,
                        r.units,
                        r.alpha,
                        control_tasks=[ct for _, _, ct in controls],
                        prepend_bos=prepend_bos,
                        baselines=base_test,
                        control_before=c_test_before,
                        edit=make,
                        batch_size=batch_size,
                        progress=False,
                        n_boot=n_boot,
                        level=level,
                        seed=seed,
                        gap_tol=gap_tol,
                        warn=True,
                    )
                if r is best:
                    for w in caught:
                        warnings.warn(f"test: {w.message}", UndefinedMetricWarning, stacklevel=2)
            r.test = reports[key2]
    if len(getattr(pair, "active", [])) != n_active:  # pragma: no cover - defensive
        raise RuntimeError("a transplant was left applied after the sweep")
    _paired_vs_controls(cells, methods, n_boot=n_boot, level=level, seed=seed)

    config = {
        "ks": ks,
        "budgets": fracs,
        "alphas": alphas,
        "methods": [m for m, _ in methods],
        "units": units if units is None or isinstance(units, str) else list(units),
        "dev_fraction": dev_fraction,
        "seed": seed,
        "max_retention_drop": max_retention_drop,
        "kv": kv,
        "prepend_bos": bos_for(dev),
        "n_dev": len(dev),
        "n_test": len(test),
        "n_boot": n_boot,
        "level": level,
        "gap_tol": gap_tol,
        "block_params": n_block,
        "split": "given" if not isinstance(task, Task) else "Task.split(dev_fraction, seed)",
        "control_tasks": [
            {"name": n, "dev": cd.to_dict(), "test": ct.to_dict()} for n, cd, ct in controls
        ],
        "retention": {
            "mode": retention_mode,
            "description": {
                "generic": GENERIC_RETENTION_NOTE,
                "given": "the control tasks given",
                "none": "none: retention was not measured",
            }[retention_mode],
        },
        "selection": "max dev metric s.t. max dev control drop <= max_retention_drop; "
        "ties -> fewer weights moved, then smaller K, then smaller alpha, then earlier method",
        "budget": "fraction of block parameters (sum of layout.n_params over every Linear "
        "unit of every layer); distinct weights, KV groups brought along count",
        "compare_on_test": compare_on_test,
    }
    pair_info = {
        side: dict(getattr(getattr(pair, side, None), "identity", {}) or {})
        for side in ("source", "target")
    }
    return SweepResult(
        task={"name": name, "metric": dev.metric, "dev": dev.to_dict(), "test": test.to_dict()},
        metric=dev.metric,
        rows=rows,
        baselines={"dev": base_dev, **({"test": base_test} if base_test else {})},
        control_baselines={
            "dev": c_dev_before,
            **({"test": c_test_before} if c_test_before else {}),
        },
        best=best,
        best_by_method=best_by_method,
        config=config,
        pair=pair_info,
        notes=notes,
        comparison=cells,
    )


def _paired_vs_controls(
    cells: list[ComparisonCell],
    methods: Sequence[tuple[str, RankedSource]],
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> None:
    """Fill ``cell.vs``: test metric minus the random / weight_diff cell of the same size."""
    base_name = {m: str(getattr(obj, "method", m)) for m, obj in methods}
    by_key = {(c.method, c.size): c for c in cells}
    for ctrl in _CONTROL_METHODS:
        label = next((m for m, _ in methods if m == ctrl), None) or next(
            (m for m, _ in methods if base_name[m] == ctrl), None
        )
        if label is None:
            continue
        for c in cells:
            other = by_key.get((label, c.size))
            if c.method == label or other is None:
                continue
            a, b = c.row.test, other.row.test
            if a is None or b is None:
                continue
            c.vs[ctrl] = {
                "method": label,
                "diff": a.transplanted.mean - b.transplanted.mean,
                "ci": paired_diff_ci(a.transplanted.scores, b.transplanted.scores,
                                     n_boot=n_boot, level=level, seed=seed),
            }


__all__ = [
    "COMPARISON_NOTE",
    "GENERIC_RETENTION_NOTE",
    "ComparisonCell",
    "RankedUnits",
    "SweepResult",
    "SweepRow",
    "choose_best",
    "pareto_front",
    "register_report_writer",
    "sweep",
]
