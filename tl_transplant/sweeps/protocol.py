"""Sweep K, parameter budgets and weight masks x alpha on dev, report the choice on test.

>>> res = sweep(pair, task, scores, ks=[8, 16, 32], alphas=[0.5, 1.0],
...             budgets=[0.001, 0.005, 0.01, 0.02, 0.05],            # doctest: +SKIP
...             control_tasks=[control], max_retention_drop=0.05, compare_on_test=True)
>>> res.best, res.best.test.metrics.recovery                           # doctest: +SKIP
>>> res.verdict["random"].diff        # best - random at the same parameter count  # doctest: +SKIP
>>> res.comparison_frame()   # method x size on test, alphas chosen on dev  # doctest: +SKIP
>>> res.save("out/")   # results.json, sweep.csv, sweep.png            # doctest: +SKIP
>>> res.results().test.recovery   # the typed results of a run          # doctest: +SKIP

Protocol (each step is a stage of :mod:`tl_transplant.sweeps.stages`, with typed inputs and
outputs; the settings are one :class:`~tl_transplant.sweeps.options.SweepOptions`):

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

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tl_transplant.evaluation.evaluator import EditFactory
from tl_transplant.evaluation.stats import DEFAULT_GAP_TOL, DEFAULT_N_BOOT
from tl_transplant.sweeps.options import SweepOptions
from tl_transplant.sweeps.result import SweepResult
from tl_transplant.sweeps.rows import ComparisonCell, SweepRow
from tl_transplant.sweeps.search import (
    HasSplits,
    Kinds,
    RankedSource,
    RankedUnits,
    ScoresLike,
    TaskLike,
)
from tl_transplant.sweeps.selection import DEFAULT_CV_FOLDS, choose_best, pareto_front
from tl_transplant.sweeps.stages import GENERIC_RETENTION_NOTE, run_sweep
from tl_transplant.sweeps.summary import COMPARISON_NOTE

if TYPE_CHECKING:
    from tl_transplant.edit.edits import KVMode
    from tl_transplant.models.pair import ModelPair


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
    (:class:`~tl_transplant.scoring.weight_scores.WeightScores`) give weight-mask rows at
    each budget (no K rows); the ``dense`` scorer's result gives one size, every block weight, at
    its own alphas. ``units``: the unit kinds to rank (``top(k, kinds=units)``).

    ``ks``: unit counts; None (default) means ``(8, 16, 32, 64, 128)`` unless
    ``budgets`` are given, then none (budgets mean budgets). ``budgets``: fractions of
    the block parameters (:mod:`tl_transplant.edit.budget`), each filled with the method's
    ``within_budget``. A scorer's suggested set (``Scores.suggested``, or a
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
    opts = SweepOptions(
        ks=ks, alphas=alphas, dev_fraction=dev_fraction, units=units,
        max_retention_drop=max_retention_drop, seed=seed, budgets=budgets,
        compare_on_test=compare_on_test, kv=kv, prepend_bos=prepend_bos, batch_size=batch_size,
        progress=progress, n_boot=n_boot, level=level, gap_tol=gap_tol,
        report_each_method=report_each_method, edit=edit, retention_kwargs=retention_kwargs,
        cv_folds=cv_folds)
    return run_sweep(pair, task, scores, control_tasks=control_tasks, controls=controls,
                     opts=opts)


__all__ = [
    "COMPARISON_NOTE",
    "GENERIC_RETENTION_NOTE",
    "ComparisonCell",
    "HasSplits",
    "RankedSource",
    "RankedUnits",
    "SweepOptions",
    "SweepResult",
    "SweepRow",
    "choose_best",
    "pareto_front",
    "sweep",
]
