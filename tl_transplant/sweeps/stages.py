"""The stages of a sweep, each a function with typed inputs and outputs.

:func:`run_sweep` is their composition (what :func:`~tl_transplant.sweeps.protocol.sweep`
calls)::

    plan = plan_sweep(pair, task, scores, control_tasks, controls, opts)   # what to evaluate
    dev = run_on_dev(plan, models)                  # baselines + every configuration on dev
    choice = choose(plan, dev, opts)                # the rule, on dev only
    test = report_on_test(plan, choice, models, opts)   # the choice on test, with retention
    verdict = compare_controls(plan, dev, choice, test, opts)  # parameter-matched controls
    trust, searched, notes = assess(plan, dev, choice, opts)   # how much to trust the choice
    result = assemble(...)                          # the SweepResult

Nothing runs on the test split before :func:`choose` has made its choice.
:class:`Models` is how every stage runs a model: the evaluation settings (BOS rule,
batch size) and the reversible edit of the sweep.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tl_transplant.arch.units import parse_units
from tl_transplant.edit.budget import block_params
from tl_transplant.edit.weights import Selection, WeightMask
from tl_transplant.evaluation.evaluator import (
    EditFactory,
    EvalResult,
    TransplantReport,
    evaluate,
    evaluate_transplant,
)
from tl_transplant.evaluation.stats import UndefinedMetricWarning, recovery, tir
from tl_transplant.sweeps.options import SweepOptions
from tl_transplant.sweeps.records import SearchRecord
from tl_transplant.sweeps.result import SweepResult
from tl_transplant.sweeps.rows import ComparisonCell, SweepRow
from tl_transplant.sweeps.search import (
    GRAIN_DENSE,
    Config,
    RankedSource,
    ScoresLike,
    SweepError,
    TaskLike,
    check_dev_size,
    grain_of,
    normalize_methods,
    plan_search,
    selection_key,
    split_task,
)
from tl_transplant.sweeps.selection import (
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
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair, ModelSide

#: What results.json and the report say about the default control task.
GENERIC_RETENTION_NOTE = (
    "generic_retention (a generic proxy: agreement with the unedited target's next-token "
    "predictions on built-in text and the task's own prompts)"
)
RetentionMode = Literal["given", "generic", "none"]


# ---- how every stage runs a model ------------------------------------------------------


class Models:
    """The pair and how the sweep runs it: BOS rule and batch size of every evaluation, and
    the reversible edit (the weight transplant, or ``opts.edit``)."""

    def __init__(self, pair: ModelPair, opts: SweepOptions) -> None:
        self.pair = pair
        self.opts = opts

    def edit_for(self, extrapolate: bool) -> EditFactory:
        """The edit of one configuration (``extrapolate``: its effective alpha is above 1)."""
        if self.opts.edit is not None:
            return self.opts.edit
        from tl_transplant.edit.edits import transplant

        kv = self.opts.kv
        return lambda p, sel, a: transplant(p, sel, a, kv=kv, allow_extrapolation=extrapolate)

    def bos_for(self, t: Task) -> bool:
        pb = self.opts.prepend_bos
        return resolve_prepend_bos(self.pair, t.prepend_bos if pb is None else pb)

    def evaluate(self, side: ModelSide, t: Task) -> EvalResult:
        return evaluate(side, t, prepend_bos=self.bos_for(t), batch_size=self.opts.batch_size,
                        progress=False)


# ---- plan ------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    """What the sweep evaluates: the splits, the methods and controls, every configuration."""

    name: str
    dev: Task
    test: Task
    #: ``(name, dev, test)`` of each control task (retention).
    control_tasks: list[tuple[str, Task, Task]]
    #: ``[(label, scores)]`` of the methods, and of the verdict's controls.
    methods: list[tuple[str, RankedSource]]
    controls: list[tuple[str, object]]
    configs: list[Config]
    layout: ModelLayout | None
    n_block: int | None
    retention_mode: RetentionMode
    opts: SweepOptions
    #: Whether the task came as given splits (else split here).
    split_given: bool
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [m for m, _ in self.methods]


def plan_sweep(
    pair: ModelPair,
    task: TaskLike,
    scores: ScoresLike,
    control_tasks: Sequence[TaskLike] | None,
    controls: Sequence[str] | Mapping[str, Any] | None,
    opts: SweepOptions,
) -> SweepPlan:
    """Split the task and the control tasks (the generic retention proxy when
    ``control_tasks`` is None), name the methods and controls, and plan every (method,
    size, alpha) configuration (:func:`~tl_transplant.sweeps.search.plan_search`).
    ``opts`` must be :meth:`~tl_transplant.sweeps.options.SweepOptions.checked`."""
    methods = normalize_methods(scores)
    layout = getattr(pair, "layout", None)
    if opts.budgets and layout is None:
        raise TypeError("budgets need pair.layout (a ModelPair) to count parameters")
    name, dev, test = split_task(task, opts.dev_fraction, opts.seed, "task")
    check_dev_size(dev)
    retention_mode: RetentionMode = "given" if control_tasks else "none"
    if control_tasks is None:
        from tl_transplant.evaluation.generic import generic_retention

        kw = {"seed": opts.seed, "batch_size": opts.batch_size,
              "prepend_bos": opts.prepend_bos, **dict(opts.retention_kwargs or {})}
        control_tasks = [generic_retention(pair, dev, **kw)]
        retention_mode = "generic"
    ctasks = [split_task(c, opts.dev_fraction, opts.seed, f"control task {i}")
              for i, c in enumerate(control_tasks)]
    names = [c[0] for c in ctasks]
    if len(set(names)) != len(names) or name in names:
        raise SweepError(f"control tasks need distinct names, different from the task: {names}")
    baselines = control_sources(controls, methods)
    labels = [m for m, _ in methods]
    extra = [(lb, o) for lb, o in baselines if lb not in labels and grain_of(o) == GRAIN_DENSE]
    configs, plan_notes = plan_search(
        [*methods, *extra], ks=list(opts.ks or ()), fracs=list(opts.budgets),
        alphas=list(opts.alphas), layout=layout, units=opts.units, kv=opts.kv,
        control_only=[lb for lb, _ in extra])
    notes: list[str] = []
    if retention_mode == "generic":
        notes.append(f"control task: {GENERIC_RETENTION_NOTE}; no control task was given")
    elif retention_mode == "none":
        notes.append("no control task: retention was not measured")
    notes += plan_notes
    notes += [selection_on_test_note(t) for t in (dev, *(c[1] for c in ctasks))
              if dict(t.meta.get("split") or {}).get("selection_on_test")]
    return SweepPlan(
        name=name, dev=dev, test=test, control_tasks=ctasks, methods=methods,
        controls=baselines, configs=configs, layout=layout,
        n_block=block_params(layout) if layout is not None else None,
        retention_mode=retention_mode, opts=opts, split_given=not isinstance(task, Task),
        notes=notes,
    )


def selection_on_test_note(dev: Task) -> str:
    """What every output says when a dev split holds test documents (an lm-eval task loaded
    with ``allow_test_selection``: ``meta["split"]["selection_on_test"]``)."""
    sp = dict(dev.meta.get("split") or {})
    where = f"{sp.get('lm_eval_task', dev.name)}:{sp.get('split', '?')}"
    return (f"SELECTION ON TEST DOCUMENTS: {dev.name} comes from the test split {where} "
            "(allow_test_selection); K, alpha and budgets were chosen on a benchmark's test "
            "documents, so the test numbers are not an unbiased estimate")


# ---- dev -------------------------------------------------------------------------------


@dataclass
class DevRun:
    """Source and target on dev, the controls' dev baselines, and every configuration's
    dev row (``control_rows``: evaluated for a control's sake only, never chosen)."""

    baselines: dict[str, EvalResult]
    control_before: dict[str, EvalResult]
    rows: list[SweepRow]
    control_rows: list[SweepRow]
    notes: list[str] = field(default_factory=list)


def run_on_dev(plan: SweepPlan, models: Models) -> DevRun:
    """Evaluate the baselines and every planned configuration on dev (each distinct
    (selection, effective alpha) once), with the control tasks' dev splits."""
    from tqdm.auto import tqdm

    opts, pair, dev = plan.opts, models.pair, plan.dev
    ev = models.evaluate
    base = {"source": ev(pair.source, dev), "target": ev(pair.target, dev)}
    before = {n: ev(pair.target, cd) for n, cd, _ in plan.control_tasks}
    notes: list[str] = []
    s_dev, t_dev = base["source"].mean, base["target"].mean
    if abs(s_dev - t_dev) < opts.gap_tol:
        msg = (
            f"dev: recovery undefined: |source - target| = {abs(s_dev - t_dev):.3g} is below "
            f"the tolerance {opts.gap_tol:g}; selection still uses the dev metric"
        )
        notes.append(msg)
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=4)

    cache: dict[tuple[Any, ...], tuple[EvalResult, dict[str, float]]] = {}
    rows: list[SweepRow] = []
    control_rows: list[SweepRow] = []
    bar = tqdm(total=len(plan.configs), desc=f"sweep {plan.name}", disable=not opts.progress,
               unit="cfg")
    try:
        for c in plan.configs:
            if c.key not in cache:
                kept = (opts.dev_store.get_eval(c.key)
                        if opts.dev_store is not None and c.key != ("target",) else None)
                if kept is not None:
                    cache[c.key] = kept
                elif c.key == ("target",):
                    cache[c.key] = (base["target"], {n: r.mean for n, r in before.items()})
                else:
                    edit = models.edit_for(c.effective_alpha > 1.0)
                    with edit(pair, c.selection, c.effective_alpha):
                        x = ev(pair.target, dev)
                        cache[c.key] = (x, {n: ev(pair.target, cd).mean
                                            for n, cd, _ in plan.control_tasks})
                    if opts.dev_store is not None:
                        opts.dev_store.put_eval(c.key, cache[c.key])
            x, after = cache[c.key]
            row = _row(c, x, after, before, base, dev.metric, opts.gap_tol, plan.n_block)
            (control_rows if c.control_only else rows).append(row)
            bar.update(1)
    finally:
        bar.close()
    return DevRun(base, before, rows, control_rows, notes)


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


# ---- choose (dev only) -----------------------------------------------------------------


@dataclass
class Choice:
    """The configuration chosen on dev, each method's own best, and the comparison's cells
    (per (method, size), the best alpha on dev)."""

    best: SweepRow | None
    best_by_method: dict[str, SweepRow]
    cells: list[ComparisonCell]
    notes: list[str] = field(default_factory=list)


def choose(plan: SweepPlan, dev: DevRun, opts: SweepOptions) -> Choice:
    """Mark feasibility and the Pareto front, and apply the selection rule
    (:func:`~tl_transplant.sweeps.selection.choose_best`) overall, per method and (with
    ``compare_on_test``) per (method, size)."""
    lim = opts.max_retention_drop
    rows = dev.rows
    for r in rows:
        r.feasible = is_feasible(r, lim)
    for r in pareto_front(rows):
        r.pareto = True
    best: SweepRow | None = choose_best(rows, lim)
    best_by_method = {}
    for m in plan.labels:
        b = choose_best([r for r in rows if r.method == m], lim)
        if b is not None:
            best_by_method[m] = b
    notes: list[str] = []
    if best is None:
        msg = (
            f"no configuration kept every control task's dev drop <= {lim}"
            + (" and fit the largest budget" if any(r.over_budget for r in rows) else "")
            + "; nothing is reported on test"
            + (" (the comparison table still shows every cell on test)" if opts.compare_on_test
               else "")
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)
    cells: list[ComparisonCell] = []
    if opts.compare_on_test:
        groups: dict[tuple[str, str], list[SweepRow]] = {}
        for r in rows:
            groups.setdefault((r.method, r.size), []).append(r)
        for (m, size), grp in groups.items():
            pick = choose_best(grp, lim) or min(grp, key=lambda r: r.key())
            cells.append(ComparisonCell(m, size, pick))
    return Choice(best, best_by_method, cells, notes)


# ---- test (only now) -------------------------------------------------------------------


class TestRun:
    """The test split: source and target (and the controls' test baselines), and one
    configuration at a time on test with retention (:meth:`evaluate`, cached by
    selection and effective alpha)."""

    __test__ = False  # not a pytest class

    def __init__(self, plan: SweepPlan, models: Models) -> None:
        self.plan, self.models = plan, models
        self.baselines: dict[str, EvalResult] = {}
        self.control_before: dict[str, EvalResult] = {}
        self._cache: dict[tuple[Any, ...], TransplantReport] = {}
        self.warned: dict[tuple[Any, ...], list[str]] = {}
        self.controls = [ct for _, _, ct in plan.control_tasks]

    def run_baselines(self) -> None:
        pair, ev = self.models.pair, self.models.evaluate
        self.baselines = {"source": ev(pair.source, self.plan.test),
                          "target": ev(pair.target, self.plan.test)}
        self.control_before = {ct.name: ev(pair.target, ct) for ct in self.controls}

    def evaluate(self, sel: Selection, a: float, extrapolate: bool, with_ret: bool
                 ) -> TransplantReport:
        """One configuration on test (retention on the controls' test splits if asked)."""
        opts = self.plan.opts
        key = selection_key(sel if isinstance(sel, WeightMask) else parse_units(list(sel)), a)
        hit = self._cache.get(key)
        if hit is not None and (hit.retention or not with_ret or not self.controls):
            return hit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            rep = evaluate_transplant(
                self.models.pair, self.plan.test, sel, a,
                control_tasks=self.controls if with_ret else [], prepend_bos=opts.prepend_bos,
                baselines=self.baselines, control_before=self.control_before,
                edit=self.models.edit_for(extrapolate), batch_size=opts.batch_size,
                progress=False, n_boot=opts.n_boot, level=opts.level, seed=opts.seed,
                gap_tol=opts.gap_tol, warn=True)
        self.warned[key] = [str(w.message) for w in caught
                            if issubclass(w.category, UndefinedMetricWarning)]
        self._cache[key] = rep
        return rep


def report_on_test(plan: SweepPlan, choice: Choice, models: Models, opts: SweepOptions
                   ) -> TestRun:
    """Evaluate the choice on test (and each method's best with ``report_each_method``, and
    the comparison's cells), with retention on the control tasks' test splits."""
    test = TestRun(plan, models)
    best, cells = choice.best, choice.cells
    if best is None and not cells:
        return test
    test.run_baselines()
    chosen = [best] if best is not None else []
    chosen += list(choice.best_by_method.values()) if opts.report_each_method else []
    chosen += [c.row for c in cells]
    for r in chosen:
        r.test = test.evaluate(r.selection, r.effective_alpha, r.extrapolates, True)
    if best is not None:
        for w in test.warned.get(selection_key(best.selection, best.effective_alpha), []):
            warnings.warn(f"test: {w}", UndefinedMetricWarning, stacklevel=4)
    return test


# ---- the verdict -----------------------------------------------------------------------


def compare_controls(plan: SweepPlan, dev: DevRun, choice: Choice, test: TestRun,
                     opts: SweepOptions) -> dict[str, ControlResult]:
    """Every control filled to the chosen configuration's parameter count, on test, with the
    paired difference (:func:`~tl_transplant.sweeps.verdict.compare_with_controls`); the
    same for each comparison cell at its own size (``cell.vs``). Returns the verdict."""
    dense_pts = {lb: [DevPoint(r.alpha, r.metric, r.max_drop)
                      for r in dev.rows + dev.control_rows if r.method == lb]
                 for lb, o in plan.controls if grain_of(o) == GRAIN_DENSE}

    def vs(row: SweepRow, retention: bool) -> dict[str, ControlResult]:
        if row.test is None or plan.layout is None or not plan.controls:
            return {}
        return compare_with_controls(
            row.test, method=row.method, n_params=row.n_params or 0, alpha=row.alpha,
            drop=row.max_drop, controls=plan.controls, evaluate=test.evaluate,
            layout=plan.layout, kinds=opts.units, kv=opts.kv, dense_points=dense_pts,
            retention=retention, n_boot=opts.n_boot, level=opts.level, seed=opts.seed)

    verdict = vs(choice.best, True) if choice.best is not None else {}
    for cell in choice.cells:
        cell.vs = {lb: r.vs_record() for lb, r in vs(cell.row, False).items()}
    return verdict


def assess(plan: SweepPlan, dev: DevRun, choice: Choice, opts: SweepOptions
           ) -> tuple[SelectionTrust | None, SearchRecord, list[str]]:
    """How much to trust the choice (configurations, dev CI, cross-validated estimate on
    dev, a warning when test falls outside the dev CI), and what was searched."""
    rows, best = dev.rows, choice.best
    n_distinct = len({c.key for c in plan.configs if not c.control_only})
    trust = None
    notes: list[str] = []
    if best is not None and best.dev_scores is not None:
        trust = assess_selection(
            best.dev_scores, dev.baselines["target"].scores, dev.baselines["source"].scores,
            all_scores=[_dev_scores(r) for r in rows], eligible=[r.feasible for r in rows],
            tiebreak=[r.key()[1:] for r in rows], n_distinct=n_distinct,
            metric=plan.dev.metric, folds=opts.cv_folds, n_boot=opts.n_boot,
            level=opts.level, seed=opts.seed, gap_tol=opts.gap_tol)
        if best.test is not None:
            warn_msg = check_test_against_dev(trust, best.test.metrics)
            if warn_msg is not None:
                notes.append(f"warning: {warn_msg}")
                warnings.warn(warn_msg, SelectionWarning, stacklevel=4)
    searched = describe_search(rows, n_distinct=n_distinct, max_drop=opts.max_retention_drop,
                               budgets=list(opts.budgets))
    return trust, searched, notes


def _dev_scores(row: SweepRow) -> np.ndarray:
    """A row's per-example dev scores (every row of a sweep has them)."""
    assert row.dev_scores is not None
    return row.dev_scores


# ---- the result ------------------------------------------------------------------------


def assemble(plan: SweepPlan, models: Models, dev: DevRun, choice: Choice, test: TestRun,
             verdict: dict[str, ControlResult], trust: SelectionTrust | None,
             searched: SearchRecord, notes: list[str]) -> SweepResult:
    """The :class:`~tl_transplant.sweeps.result.SweepResult` of the stages' outputs; its
    ``config`` records every setting (and the split and retention signal used)."""
    opts, pair = plan.opts, models.pair
    ctasks = plan.control_tasks
    config = {
        "ks": list(opts.ks or ()),
        "budgets": list(opts.budgets),
        "alphas": list(opts.alphas),
        "methods": plan.labels,
        "controls": [lb for lb, _ in plan.controls],
        "units": opts.units if opts.units is None or isinstance(opts.units, str)
        else list(opts.units),
        "dev_fraction": opts.dev_fraction,
        "seed": opts.seed,
        "max_retention_drop": opts.max_retention_drop,
        "kv": opts.kv,
        "prepend_bos": models.bos_for(plan.dev),
        "n_dev": len(plan.dev),
        "n_test": len(plan.test),
        "n_boot": opts.n_boot,
        "level": opts.level,
        "gap_tol": opts.gap_tol,
        "cv_folds": opts.cv_folds,
        "block_params": plan.n_block,
        "split": "given" if plan.split_given else "Task.split(dev_fraction, seed)",
        "control_tasks": [
            {"name": n, "dev": cd.to_dict(), "test": ct.to_dict()} for n, cd, ct in ctasks
        ],
        "retention": {
            "mode": plan.retention_mode,
            "description": {
                "generic": GENERIC_RETENTION_NOTE,
                "given": "the control tasks given",
                "none": "none: retention was not measured",
            }[plan.retention_mode],
        },
        "selection": "max dev metric s.t. max dev control drop <= max_retention_drop and a "
        "scorer's own set within the largest budget; ties -> fewer weights moved, then "
        "smaller K, then smaller alpha, then earlier method",
        "budget": "fraction of block parameters (sum of layout.n_params over every Linear "
        "unit of every layer); distinct weights, KV groups brought along count",
        "compare_on_test": opts.compare_on_test,
    }
    pair_info = {
        side: dict(getattr(getattr(pair, side, None), "identity", {}) or {})
        for side in ("source", "target")
    }
    dev_task, test_task = plan.dev, plan.test
    return SweepResult(
        task={"name": plan.name, "metric": dev_task.metric, "dev": dev_task.to_dict(),
              "test": test_task.to_dict()},
        metric=dev_task.metric,
        rows=dev.rows,
        baselines={"dev": dev.baselines, **({"test": test.baselines} if test.baselines else {})},
        control_baselines={
            "dev": dev.control_before,
            **({"test": test.control_before} if test.control_before else {}),
        },
        best=choice.best,
        best_by_method=choice.best_by_method,
        config=config,
        pair=pair_info,
        notes=notes,
        comparison=choice.cells,
        verdict=verdict,
        trust=trust,
        searched=searched,
        control_rows=dev.control_rows,
    )


def run_sweep(
    pair: ModelPair,
    task: TaskLike,
    scores: ScoresLike,
    *,
    control_tasks: Sequence[TaskLike] | None = None,
    controls: Sequence[str] | Mapping[str, Any] | None = None,
    opts: SweepOptions | None = None,
) -> SweepResult:
    """The sweep as a composition of its stages (see the module docstring)."""
    opts = (opts or SweepOptions()).checked()
    n_active = len(getattr(pair, "active", []))
    plan = plan_sweep(pair, task, scores, control_tasks, controls, opts)
    models = Models(pair, opts)
    dev = run_on_dev(plan, models)
    choice = choose(plan, dev, opts)
    test = report_on_test(plan, choice, models, opts)
    verdict = compare_controls(plan, dev, choice, test, opts)
    if len(getattr(pair, "active", [])) != n_active:  # pragma: no cover - defensive
        raise RuntimeError("a transplant was left applied after the sweep")
    trust, searched, trust_notes = assess(plan, dev, choice, opts)
    notes = plan.notes + dev.notes + choice.notes + trust_notes
    return assemble(plan, models, dev, choice, test, verdict, trust, searched, notes)


__all__ = [
    "GENERIC_RETENTION_NOTE",
    "Choice",
    "DevRun",
    "Models",
    "SweepPlan",
    "TestRun",
    "assemble",
    "assess",
    "choose",
    "compare_controls",
    "plan_sweep",
    "report_on_test",
    "run_on_dev",
    "run_sweep",
]
