"""Sweep K, parameter budgets and weight masks x alpha on dev, report the choice on test.

>>> res = sweep(pair, task, scores, ks=[8, 16, 32], alphas=[0.5, 1.0],
...             budgets=[0.001, 0.005, 0.01, 0.02, 0.05],            # doctest: +SKIP
...             control_tasks=[control], max_retention_drop=0.05, compare_on_test=True)
>>> res.best, res.best.test.metrics.recovery                           # doctest: +SKIP
>>> res.verdict["random"].diff        # best - random at the same parameter count  # doctest: +SKIP
>>> res.comparison_frame()   # method x size on test, alphas chosen on dev  # doctest: +SKIP
>>> res.save("out/")   # results.json, sweep.csv, sweep.png            # doctest: +SKIP

Protocol:

1. ``task`` and every control task are split by :meth:`Task.split` with the same
   ``dev_fraction`` and ``seed`` (the split depends on indices only, never labels).
2. Source and target are evaluated on dev; controls on the target's dev split.
3. Every configuration of the search space (:mod:`tl_transplant.sweeps.search`: methods x
   sizes x alphas; a size is a top-K, a parameter budget, a scorer's suggested set, or
   dense's every weight; weight-level methods give weight masks) is applied with the
   reversible :func:`~tl_transplant.edit.edits.transplant` (bit-exact restore) and dev task +
   dev controls are evaluated. An empty selection or alpha = 0 is the target itself;
   identical (selection, effective alpha) configurations are evaluated once.
4. Best = the rule of :func:`~tl_transplant.sweeps.selection.choose_best` (highest dev metric
   among configurations within ``max_retention_drop`` and within the largest budget;
   ties to fewer weights moved, smaller K, smaller alpha, the earlier method). Without
   a control task given, a generic one is used (``control_tasks=None``). Only then is
   anything run on the test split: source, target and the chosen configuration(s), with
   paired bootstrap CIs and retention on the controls' test splits.
5. The verdict: every control filled to the chosen configuration's parameter count
   (:mod:`tl_transplant.sweeps.verdict`), evaluated on test, paired difference with its CI;
   and how much to trust the choice (:mod:`tl_transplant.sweeps.selection`: how many
   configurations, the dev CI, a cross-validated estimate on dev, a warning when test
   falls outside the dev CI).
6. Pareto front (recovery vs retention, on dev): configurations not dominated in
   (dev metric, -max dev control drop). Among identical points only the tie-break
   winner is kept.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from tl_transplant.arch.units import parse_units
from tl_transplant.edit.budget import block_params, check_fraction
from tl_transplant.edit.weights import Selection, WeightMask
from tl_transplant.evaluation.evaluator import (
    EditFactory,
    EvalResult,
    TransplantReport,
    evaluate,
    evaluate_transplant,
)
from tl_transplant.evaluation.stats import (
    DEFAULT_GAP_TOL,
    DEFAULT_N_BOOT,
    UndefinedMetricWarning,
    recovery,
    tir,
)
from tl_transplant.report.text import COMPARISON_NOTE, format_sweep_summary
from tl_transplant.sweeps.rows import ComparisonCell, SweepRow, clean_json
from tl_transplant.sweeps.search import (
    GRAIN_DENSE,
    Config,
    HasSplits,
    Kinds,
    RankedSource,
    RankedUnits,
    ScoresLike,
    TaskLike,
    grain_of,
    normalize_methods,
    plan_search,
    resolve_ks,
    selection_key,
    split_task,
)
from tl_transplant.sweeps.selection import (
    DEFAULT_CV_FOLDS,
    SelectionTrust,
    SelectionWarning,
    assess_selection,
    check_test_against_dev,
    choose_best,
    describe_search,
    is_feasible,
    pareto_front,
)
from tl_transplant.sweeps.verdict import (
    ControlResult,
    DevPoint,
    compare_with_controls,
    control_sources,
)
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import resolve_prepend_bos

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

    from tl_transplant.edit.edits import KVMode
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide


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
    #: The verdict: each control at the chosen configuration's parameter count, on test.
    verdict: dict[str, ControlResult] = field(default_factory=dict)
    #: How much to trust the choice: configurations, dev CI, cross-validated estimate.
    trust: SelectionTrust | None = None
    #: What was searched (:func:`tl_transplant.sweeps.selection.describe_search`).
    searched: dict[str, Any] = field(default_factory=dict)
    #: Dev rows evaluated for a control's sake only (dense as a control): never chosen.
    control_rows: list[SweepRow] = field(default_factory=list)

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
        """A few human-readable lines (:func:`tl_transplant.report.text.format_sweep_summary`)."""
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
                "grain": r.grain,
                "pct_params": r.pct_params,
                "pct_units": r.pct_units,
                "size": r.size,
                "budget": r.budget,
                "k": r.k,
                "alpha": r.alpha,
                "effective_alpha": r.effective_alpha,
                "n_params": r.n_params,
                "n_units": r.n_units,
                f"dev_{self.metric}": r.metric,
                "delta": r.delta,
                "tir": r.tir,
                "recovery": r.recovery,
                "recovery_per_pct_params": r.recovery_per_pct,
            }
            for name, c in r.control.items():
                rec[f"drop:{name}"] = c["drop"]
            rec.update(
                max_drop=r.max_drop,
                feasible=r.feasible,
                over_budget=r.over_budget,
                pareto=r.pareto,
                best=r is self.best,
                units=(",".join(r.units) if r.mask is None
                       else f"mask {r.mask.sha256[:16]} ({r.mask.n_params} weights)"),
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

        return clean_json(
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
                "searched": self.searched,
                "verdict": {
                    "controls": {k: v.to_dict() for k, v in self.verdict.items()},
                    "selection": None if self.trust is None else self.trust.to_dict(),
                },
                "notes": self.notes,
            }
        )

    # ---- figures --------------------------------------------------------------------
    @overload
    def plot(self, ax: None = None) -> Figure: ...
    @overload
    def plot(self, ax: Axes) -> Figure | SubFigure: ...

    def plot(self, ax: Axes | None = None) -> Figure | SubFigure:
        """Dev metric vs size, one line per alpha, one panel per method
        (:func:`tl_transplant.sweeps.figure.plot_sweep`). Returns the Figure."""
        from tl_transplant.sweeps.figure import plot_sweep

        return plot_sweep(self, ax)

    def save(self, directory: str | Path, *, report: bool = False, **report_kwargs: Any) -> Path:
        """Write ``results.json``, ``sweep.csv`` and ``sweep.png`` under ``directory``
        (and ``comparison.csv`` when the sweep ran ``compare_on_test``).

        ``report=True`` also writes the self-contained ``report.html``; keyword
        arguments (``pair=``, ``task=``, ``scores=``, ...) go to
        :func:`tl_transplant.report.html.write_report`. This module does not import the
        report (it sits above the sweep): ``tl_transplant.report.html`` registers itself
        with :func:`register_report_writer`, and the package imports it.
        """
        if report_kwargs and not report:
            raise TypeError(f"unexpected arguments without report=True: {sorted(report_kwargs)}")
        writer = _REPORT_WRITER.get("write")
        if report and writer is None:
            raise RuntimeError(
                "SweepResult.save(report=True) needs tl_transplant.report.html, which registers "
                "the "
                "report writer when imported; `import tl_transplant.report.html` first"
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

    :mod:`tl_transplant.report.html` registers :func:`~tl_transplant.report.html.write_report`
    when it is imported, so the call goes report -> sweep, never sweep -> report.
    """
    _REPORT_WRITER["write"] = write


#: What results.json and the report say about the default control task.
GENERIC_RETENTION_NOTE = (
    "generic_retention (a generic proxy: agreement with the unedited target's next-token "
    "predictions on built-in text and the task's own prompts)"
)


def sweep(
    pair: ModelPair,
    task: TaskLike,
    scores: ScoresLike,
    ks: Sequence[int] | None = None,
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
    controls: Sequence[str] | Mapping[str, Any] | None = None,
    cv_folds: int = DEFAULT_CV_FOLDS,
) -> SweepResult:
    """Evaluate every (method, size, alpha) on dev, choose on dev, report it on test.

    ``task`` and each control task: a :class:`Task`, split here by
    ``Task.split(dev_fraction, seed)``, or already-made splits (an object with
    ``.dev``/``.test``, e.g. the zoo's ``Splits``, or a ``(dev, test)`` tuple).

    ``scores``: an object with ``.top(k, kinds=...)`` (and optionally ``.method``,
    ``.within_budget``, ``.meta``), a ranked list of units, a list of such objects, or
    ``{label: scores}`` to compare methods side by side. Weight-level scores
    (:class:`~tl_transplant.edit.weights.WeightScores`) give weight-mask rows at each budget
    (no K rows); the ``dense`` scorer's result gives one size, every block weight, at
    its own alphas. ``units``: the unit kinds to rank (``top(k, kinds=units)``).

    ``ks``: unit counts; None (default) means ``(8, 16, 32, 64, 128)`` unless
    ``budgets`` are given, then none (budgets mean budgets). ``budgets``: fractions of
    the block parameters (:mod:`tl_transplant.edit.budget`), each filled with the method's
    ``within_budget``. A scorer's suggested set (``meta["suggested"]``, or a
    ``WeightScores.suggested`` mask) is a row too, selectable only within the largest
    budget (always, without budgets). Every row records ``n_params``, ``pct_params``
    and ``pct_units``.

    ``controls``: the baselines of the verdict and of the comparison table, as labels of
    ``scores`` or ``{label: scores}`` (other objects); None = every method that is a
    baseline (``random``, ``weight_diff``, ``magnitude``, ``dare``, ``dense``, at any
    grain). Each is filled to the chosen configuration's parameter count
    (:mod:`tl_transplant.sweeps.verdict`); :attr:`SweepResult.verdict` holds them.
    ``cv_folds``: folds of the cross-validated selection estimate on dev
    (:attr:`SweepResult.trust`).

    ``control_tasks``: None (default) uses
    :func:`tl_transplant.evaluation.generic.generic_retention` built from the task's dev
    prompts (``retention_kwargs`` go to it); ``()`` means no control at all.
    ``max_retention_drop``: the largest allowed drop of any control task's dev
    metric. ``report_each_method`` also reports each method's own best on test.
    ``compare_on_test``: for every (method, size) take the best alpha on dev and
    evaluate it on test (:attr:`SweepResult.comparison`); the overall choice is still
    made on dev only. ``edit(pair, selection, alpha)`` replaces the weight transplant by
    another reversible context manager. See the module docstring for the protocol.
    """
    from tqdm.auto import tqdm

    from tl_transplant.edit.edits import transplant

    methods = normalize_methods(scores)
    alphas = [float(a) for a in alphas]
    fracs = list(dict.fromkeys(check_fraction(b, "each budget") for b in budgets))
    ks = resolve_ks(ks, fracs)
    if (not ks and not fracs) or not alphas:
        raise ValueError("give at least one K (ks) or budget (budgets), and a non-empty alphas")
    if any(k < 0 for k in ks):
        raise ValueError(f"ks must be >= 0, got {ks}")
    layout = getattr(pair, "layout", None)
    if fracs and layout is None:
        raise TypeError("budgets need pair.layout (a ModelPair) to count parameters")
    name, dev, test = split_task(task, dev_fraction, seed, "task")
    retention_mode = "given" if control_tasks else "none"
    if control_tasks is None:
        from tl_transplant.evaluation.generic import generic_retention

        kw = {"seed": seed, "batch_size": batch_size, "prepend_bos": prepend_bos,
              **dict(retention_kwargs or {})}
        control_tasks = [generic_retention(pair, dev, **kw)]
        retention_mode = "generic"
    ctasks = [split_task(c, dev_fraction, seed, f"control task {i}")
              for i, c in enumerate(control_tasks)]
    names = [c[0] for c in ctasks]
    if len(set(names)) != len(names) or name in names:
        raise ValueError(f"control tasks need distinct names, different from the task: {names}")
    baselines_ = control_sources(controls, methods)
    labels = [m for m, _ in methods]
    extra = [(lb, o) for lb, o in baselines_ if lb not in labels and grain_of(o) == GRAIN_DENSE]
    plans, plan_notes = plan_search([*methods, *extra], ks=ks, fracs=fracs, alphas=alphas,
                                    layout=layout, units=units, kv=kv,
                                    control_only=[lb for lb, _ in extra])
    n_active = len(getattr(pair, "active", []))
    n_block = block_params(layout) if layout is not None else None

    def make_for(extrapolate: bool) -> EditFactory:
        if edit is not None:
            return edit
        return lambda p, sel, a: transplant(p, sel, a, kv=kv, allow_extrapolation=extrapolate)

    def bos_for(t: Task) -> bool:
        return resolve_prepend_bos(pair, t.prepend_bos if prepend_bos is None else prepend_bos)

    def ev(side: ModelSide, t: Task) -> EvalResult:
        return evaluate(side, t, prepend_bos=bos_for(t), batch_size=batch_size, progress=False)

    notes: list[str] = []
    if retention_mode == "generic":
        notes.append(f"control task: {GENERIC_RETENTION_NOTE}; no control task was given")
    elif retention_mode == "none":
        notes.append("no control task: retention was not measured")
    notes += plan_notes

    # -- dev: baselines, then every configuration ----------------------------------------
    base_dev = {"source": ev(pair.source, dev), "target": ev(pair.target, dev)}
    c_dev_before = {n: ev(pair.target, cd) for n, cd, _ in ctasks}
    s_dev, t_dev = base_dev["source"].mean, base_dev["target"].mean
    if abs(s_dev - t_dev) < gap_tol:
        msg = (
            f"dev: recovery undefined: |source - target| = {abs(s_dev - t_dev):.3g} is below "
            f"the tolerance {gap_tol:g}; selection still uses the dev metric"
        )
        notes.append(msg)
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=2)

    cache: dict[tuple[Any, ...], tuple[EvalResult, dict[str, float]]] = {}
    rows: list[SweepRow] = []
    control_rows: list[SweepRow] = []
    bar = tqdm(total=len(plans), desc=f"sweep {name}", disable=not progress, unit="cfg")
    try:
        for c in plans:
            if c.key not in cache:
                if c.key == ("target",):
                    cache[c.key] = (base_dev["target"],
                                    {n: r.mean for n, r in c_dev_before.items()})
                else:
                    with make_for(c.effective_alpha > 1.0)(pair, c.selection, c.effective_alpha):
                        x = ev(pair.target, dev)
                        cache[c.key] = (x, {n: ev(pair.target, cd).mean for n, cd, _ in ctasks})
            x, after = cache[c.key]
            row = _row(c, x, after, c_dev_before, base_dev, dev.metric, gap_tol, n_block)
            (control_rows if c.control_only else rows).append(row)
            bar.update(1)
    finally:
        bar.close()
    for r in rows:
        r.feasible = is_feasible(r, max_retention_drop)
    for r in pareto_front(rows):
        r.pareto = True
    best: SweepRow | None = choose_best(rows, max_retention_drop)
    best_by_method = {}
    for m in labels:
        b = choose_best([r for r in rows if r.method == m], max_retention_drop)
        if b is not None:
            best_by_method[m] = b
    if best is None:
        msg = (
            f"no configuration kept every control task's dev drop <= {max_retention_drop}"
            + (" and fit the largest budget" if any(r.over_budget for r in rows) else "")
            + "; nothing is reported on test"
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
            pick = choose_best(grp, max_retention_drop) or min(grp, key=lambda r: r.key())
            cells.append(ComparisonCell(m, size, pick))

    # -- test: only now, and only for the chosen configuration(s) ------------------------
    base_test: dict[str, EvalResult] = {}
    c_test_before: dict[str, EvalResult] = {}
    test_cache: dict[tuple[Any, ...], TransplantReport] = {}
    test_warned: dict[tuple[Any, ...], list[str]] = {}
    test_controls = [ct for _, _, ct in ctasks]

    def test_eval(sel: Selection, a: float, extrapolate: bool, with_ret: bool
                  ) -> TransplantReport:
        """One configuration on test (cached by selection and effective alpha)."""
        key = selection_key(sel if isinstance(sel, WeightMask) else parse_units(list(sel)), a)
        hit = test_cache.get(key)
        if hit is not None and (hit.retention or not with_ret or not test_controls):
            return hit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            rep = evaluate_transplant(
                pair, test, sel, a, control_tasks=test_controls if with_ret else [],
                prepend_bos=prepend_bos, baselines=base_test, control_before=c_test_before,
                edit=make_for(extrapolate), batch_size=batch_size, progress=False,
                n_boot=n_boot, level=level, seed=seed, gap_tol=gap_tol, warn=True)
        test_warned[key] = [str(w.message) for w in caught
                            if issubclass(w.category, UndefinedMetricWarning)]
        test_cache[key] = rep
        return rep

    if best is not None or cells:
        base_test = {"source": ev(pair.source, test), "target": ev(pair.target, test)}
        c_test_before = {ct.name: ev(pair.target, ct) for ct in test_controls}
        chosen = [best] if best is not None else []
        chosen += list(best_by_method.values()) if report_each_method else []
        chosen += [c.row for c in cells]
        for r in chosen:
            r.test = test_eval(r.selection, r.effective_alpha, r.extrapolates, True)
        if best is not None:
            for w in test_warned.get(selection_key(best.selection, best.effective_alpha), []):
                warnings.warn(f"test: {w}", UndefinedMetricWarning, stacklevel=2)

    # -- the verdict: controls at the chosen size, and how much to trust the choice ------
    dense_pts = {lb: [DevPoint(r.alpha, r.metric, r.max_drop) for r in rows + control_rows
                      if r.method == lb] for lb, o in baselines_ if grain_of(o) == GRAIN_DENSE}

    def vs(row: SweepRow, retention: bool) -> dict[str, ControlResult]:
        if row.test is None or layout is None or not baselines_:
            return {}
        return compare_with_controls(
            row.test, method=row.method, n_params=row.n_params or 0, alpha=row.alpha,
            drop=row.max_drop, controls=baselines_, evaluate=test_eval, layout=layout,
            kinds=units, kv=kv, dense_points=dense_pts, retention=retention, n_boot=n_boot,
            level=level, seed=seed)

    verdict = vs(best, True) if best is not None else {}
    for cell in cells:
        cell.vs = {lb: r.vs_dict() for lb, r in vs(cell.row, False).items()}
    if len(getattr(pair, "active", [])) != n_active:  # pragma: no cover - defensive
        raise RuntimeError("a transplant was left applied after the sweep")
    n_distinct = len({c.key for c in plans if not c.control_only})
    trust = None
    if best is not None and best.dev_scores is not None:
        trust = assess_selection(
            best.dev_scores, base_dev["target"].scores, base_dev["source"].scores,
            all_scores=[_dev_scores(r) for r in rows], eligible=[r.feasible for r in rows],
            tiebreak=[r.key()[1:] for r in rows], n_distinct=n_distinct, metric=dev.metric,
            folds=cv_folds, n_boot=n_boot, level=level, seed=seed, gap_tol=gap_tol)
        if best.test is not None:
            warn_msg = check_test_against_dev(trust, best.test.metrics)
            if warn_msg is not None:
                notes.append(f"warning: {warn_msg}")
                warnings.warn(warn_msg, SelectionWarning, stacklevel=2)
    searched = describe_search(rows, n_distinct=n_distinct, max_drop=max_retention_drop,
                               budgets=fracs)

    config = {
        "ks": ks,
        "budgets": fracs,
        "alphas": alphas,
        "methods": labels,
        "controls": [lb for lb, _ in baselines_],
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
        "cv_folds": cv_folds,
        "block_params": n_block,
        "split": "given" if not isinstance(task, Task) else "Task.split(dev_fraction, seed)",
        "control_tasks": [
            {"name": n, "dev": cd.to_dict(), "test": ct.to_dict()} for n, cd, ct in ctasks
        ],
        "retention": {
            "mode": retention_mode,
            "description": {
                "generic": GENERIC_RETENTION_NOTE,
                "given": "the control tasks given",
                "none": "none: retention was not measured",
            }[retention_mode],
        },
        "selection": "max dev metric s.t. max dev control drop <= max_retention_drop and a "
        "scorer's own set within the largest budget; ties -> fewer weights moved, then "
        "smaller K, then smaller alpha, then earlier method",
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
        verdict=verdict,
        trust=trust,
        searched=searched,
        control_rows=control_rows,
    )


def _dev_scores(row: SweepRow) -> np.ndarray:
    """A row's per-example dev scores (every row of a sweep has them)."""
    assert row.dev_scores is not None
    return row.dev_scores


def _row(c: Config, x: EvalResult, after: Mapping[str, float],
         before: Mapping[str, EvalResult], base: Mapping[str, EvalResult], metric: str,
         gap_tol: float, n_block: int | None) -> SweepRow:
    """A planned configuration's dev row."""
    t_dev, s_dev = base["target"].mean, base["source"].mean
    sel = c.selection
    n = c.n_params
    return SweepRow(
        method=c.method, k=c.k, alpha=c.alpha,
        units=[] if isinstance(sel, WeightMask) else [str(u) for u in sel],
        metric=x.mean, delta=x.mean - t_dev,
        tir=tir(x.mean, t_dev, metric=metric, warn=False),
        recovery=recovery(x.mean, t_dev, s_dev, gap_tol=gap_tol, warn=False),
        control={k: {"before": before[k].mean, "after": v, "drop": before[k].mean - v}
                 for k, v in after.items()},
        budget=c.budget, n_params=n,
        pct_params=None if n is None or not n_block else n / n_block,
        pct_units=c.pct_units, grain=c.grain,
        mask=sel if isinstance(sel, WeightMask) else None, alpha_scale=c.alpha_scale,
        over_budget=c.over_budget, dev_scores=np.asarray(x.scores, dtype=np.float64),
    )


__all__ = [
    "COMPARISON_NOTE",
    "GENERIC_RETENTION_NOTE",
    "ComparisonCell",
    "HasSplits",
    "RankedSource",
    "RankedUnits",
    "SweepResult",
    "SweepRow",
    "choose_best",
    "pareto_front",
    "register_report_writer",
    "sweep",
]
