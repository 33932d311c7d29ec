"""Choosing a configuration on dev, and how much to trust the choice.

* :func:`choose_best`: the selection rule (highest dev metric among feasible rows; ties go
  to fewer weights moved, smaller K, smaller alpha, the earlier method). A row is
  *feasible* when its largest dev control drop is within ``max_retention_drop`` and it
  is not a scorer's own size above the largest budget asked for (``over_budget``).
* :func:`pareto_front`: rows not dominated in (dev metric, -largest dev control drop).
* :func:`cross_validated_selection`: the dev figure of a winner chosen among many
  configurations is biased upward. Split the dev examples into k folds; on each, choose
  the winner on the other k-1 folds with the same rule and feasibility, and score it on
  the held-out fold. The mean over folds estimates what *the selection procedure* is
  worth, from dev alone (no extra model runs: rows keep their per-example dev scores).
  Feasibility comes from the control tasks' dev splits (other examples) and the budget,
  so it is the same in every fold.
* :func:`assess_selection` / :func:`check_test_against_dev`: the winner's count of
  configurations, its dev bootstrap CI and the CV estimate; after the test report, a
  warning when the test figure falls outside the dev CI. Test never takes part in choosing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tl_transplant.evaluation.stats import (
    DEFAULT_GAP_TOL,
    DEFAULT_N_BOOT,
    TransplantMetrics,
    bootstrap_means,
    paired_metrics,
    percentile_ci,
    recovery,
)
from tl_transplant.sweeps.records import (
    CrossValidationRecord,
    DevEstimateRecord,
    SearchRecord,
    TestVsDevRecord,
    TrustRecord,
)

_TIE_DECIMALS = 12
DEFAULT_CV_FOLDS = 5


class SelectionWarning(UserWarning):
    """The chosen configuration's test figure fell outside its dev CI."""


class Row(Protocol):
    """What the rule reads of a row (a :class:`~tl_transplant.sweeps.protocol.SweepRow` is one)."""

    metric: float
    over_budget: bool

    @property
    def max_drop(self) -> float: ...

    def key(self) -> tuple[float, int, int, float]: ...


def is_feasible(row: Row, max_drop: float | None) -> bool:
    """Within the retention limit (always, if None) and not above the largest budget."""
    ok = max_drop is None or row.max_drop <= max_drop + 1e-12
    return ok and not getattr(row, "over_budget", False)


def choose_best(rows: Sequence[Row], max_retention_drop: float | None = None) -> Any:
    """The selection rule: highest dev metric among feasible rows; ties -> fewer weights
    moved, smaller K, smaller alpha; remaining ties keep the earliest row (method order).
    None when no row is feasible."""
    ok = [r for r in rows if is_feasible(r, max_retention_drop)]
    return min(ok, key=lambda r: r.key()) if ok else None


def pareto_front(rows: Sequence[Row]) -> list[Any]:
    """Rows not dominated in (dev metric, -max drop); one per identical point (tie rule)."""
    pts: dict[tuple[float, float], Row] = {}
    for r in sorted(rows, key=lambda r: r.key()):
        p = (round(r.metric, _TIE_DECIMALS), -round(r.max_drop, _TIE_DECIMALS))
        pts.setdefault(p, r)
    front = []
    for p, r in pts.items():
        dominated = any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (-r.metric, r.max_drop))


def describe_search(
    rows: Sequence[Any], *, n_distinct: int, max_drop: float | None, budgets: Sequence[float]
) -> SearchRecord:
    """What a sweep searched: methods, sizes and alphas, how many configurations, how many
    distinct evaluations, how many feasible; ``text`` says it in one line."""
    dense = [r for r in rows if r.budget == "dense"]
    rest = [r for r in rows if r.budget != "dense"]
    methods = list(dict.fromkeys(r.method for r in rest))
    sizes = list(dict.fromkeys(r.size for r in rest))
    alphas = sorted({r.alpha for r in rest})
    n_ok = sum(1 for r in rows if r.feasible)
    parts = []
    if rest:
        parts.append(f"{len(methods)} method{'s' if len(methods) != 1 else ''} x "
                     f"{len(sizes)} size{'s' if len(sizes) != 1 else ''} "
                     f"({', '.join(sizes)}) x {len(alphas)} alpha{'s' if len(alphas) != 1 else ''}"
                     f" ({', '.join(f'{a:g}' for a in alphas)})")
    for m in dict.fromkeys(r.method for r in dense):
        n_a = sum(1 for r in dense if r.method == m)
        parts.append(f"{m} (every block weight) x {n_a} alphas")
    why = [] if max_drop is None else [f"max dev control drop <= {max_drop:g}"]
    if budgets:
        why.append(f"a scorer's own set within the largest budget {100 * max(budgets):.4g}%")
    text = (f"{len(rows)} configurations ({'; '.join(parts)}), {n_distinct} distinct "
            f"evaluations; {n_ok} feasible" + (f" ({', '.join(why)})" if why else ""))
    return SearchRecord(methods=list(dict.fromkeys(r.method for r in rows)), sizes=sizes,
                        alphas=alphas, n_configs=len(rows), n_distinct=n_distinct,
                        n_feasible=n_ok, text=text)


# ---- cross-validated selection ---------------------------------------------------------


@dataclass
class CrossValidation:
    """The selection procedure, cross-validated over the dev examples."""

    folds: int
    #: Mean over folds of the held-out fold metric of that fold's winner.
    metric: float
    #: The same mean for the unedited target and the source (same folds).
    target: float
    source: float | None
    recovery: float | None
    #: Per fold: the index (in the rows given) of the winner chosen on the other folds,
    #: and its held-out metric.
    winners: list[int] = field(default_factory=list)
    fold_metrics: list[float] = field(default_factory=list)

    def record(self) -> CrossValidationRecord:
        return CrossValidationRecord(folds=self.folds, metric=self.metric, target=self.target,
                                     source=self.source, recovery=self.recovery,
                                     fold_metrics=list(self.fold_metrics))

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_dict()


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint, near-equal folds of ``range(n)`` from a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(perm, folds)]


def cross_validated_selection(
    scores: Sequence[np.ndarray],
    eligible: Sequence[bool],
    tiebreak: Sequence[tuple[Any, ...]],
    *,
    folds: int = DEFAULT_CV_FOLDS,
    seed: int = 0,
    target: np.ndarray | None = None,
    source: np.ndarray | None = None,
    gap_tol: float = DEFAULT_GAP_TOL,
) -> CrossValidation | None:
    """k-fold cross-validated selection over dev examples (see the module docstring).

    ``scores[i]``: row i's per-example dev scores (all the same length n). ``eligible[i]``:
    whether row i may be chosen (feasibility, fixed across folds). ``tiebreak[i]``: the
    rest of the rule's key after the metric (weights moved, K, alpha); row order breaks
    what remains. Each fold's winner maximises its mean over the training folds. None
    when no row is eligible or there are fewer than 2 examples.
    """
    idx = [i for i, ok in enumerate(eligible) if ok]
    if not idx or not len(scores):
        return None
    n = len(scores[0])
    k = min(int(folds), n)
    if k < 2:
        return None
    mat = np.stack([np.asarray(scores[i], dtype=np.float64) for i in idx])  # [rows, n]
    parts = fold_indices(n, k, seed)
    winners, held = [], []
    t_f, s_f = [], []
    for f in parts:
        train = np.ones(n, dtype=bool)
        train[f] = False
        means = mat[:, train].mean(axis=1)
        j = min(range(len(idx)),
                key=lambda j: (-round(float(means[j]), _TIE_DECIMALS), *tiebreak[idx[j]], j))
        winners.append(idx[j])
        held.append(float(mat[j, f].mean()))
        if target is not None:
            t_f.append(float(np.asarray(target, dtype=np.float64)[f].mean()))
        if source is not None:
            s_f.append(float(np.asarray(source, dtype=np.float64)[f].mean()))
    cv = float(np.mean(held))
    t = float(np.mean(t_f)) if t_f else float("nan")
    s = float(np.mean(s_f)) if s_f else None
    rec = None if s is None or not t_f else recovery(cv, t, s, gap_tol=gap_tol, warn=False)
    return CrossValidation(k, cv, t, s, rec, winners, held)


# ---- what the choice is worth ----------------------------------------------------------


@dataclass
class SelectionTrust:
    """How many configurations the winner was chosen from, its dev CI, the CV estimate,
    and (after the test report) whether test fell outside the dev CI."""

    n_configs: int
    n_feasible: int
    n_distinct: int
    dev: TransplantMetrics
    dev_metric_ci: tuple[float, float] | None
    cv: CrossValidation | None
    #: Filled by :func:`check_test_against_dev`.
    test_check: dict[str, Any] | None = None
    warning: str | None = None

    def record(self) -> TrustRecord:
        """The typed record (``results.json`` ``selection``)."""
        d = self.dev
        return TrustRecord(
            n_configs=self.n_configs,
            n_feasible=self.n_feasible,
            n_distinct=self.n_distinct,
            dev=DevEstimateRecord(
                metric=d.transplanted, metric_ci=_list(self.dev_metric_ci), delta=d.delta,
                delta_ci=_list(d.ci.get("delta")), recovery=d.recovery,
                recovery_ci=_list(d.ci.get("recovery")), level=d.level, n_boot=d.n_boot),
            cv=None if self.cv is None else self.cv.record(),
            test_vs_dev=None if self.test_check is None else TestVsDevRecord(**self.test_check),
            warning=self.warning,
            text=self.text(),
        )

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_dict()

    def text(self) -> str:
        """One line: ``chosen among 62 configurations (40 feasible); dev ... ; CV ...``."""
        d = self.dev
        lo_hi = self.dev_metric_ci
        ci = "" if lo_hi is None else f" [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]"
        parts = [f"chosen among {self.n_configs} configurations ({self.n_feasible} feasible, "
                 f"{self.n_distinct} distinct evaluations); dev {d.transplanted:.4g}{ci}"]
        rec_ci = d.ci.get("recovery")
        if d.recovery is not None:
            parts[-1] += f", recovery {d.recovery:.3g}" + (
                "" if rec_ci is None else f" [{rec_ci[0]:.3g}, {rec_ci[1]:.3g}]")
        if self.cv is not None:
            rec = "" if self.cv.recovery is None else f", recovery {self.cv.recovery:.3g}"
            parts.append(f"selection-corrected ({self.cv.folds}-fold CV on dev): "
                         f"{self.cv.metric:.4g}{rec}")
        return "; ".join(parts)


def _list(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def assess_selection(
    best_scores: np.ndarray,
    target_scores: np.ndarray,
    source_scores: np.ndarray,
    *,
    all_scores: Sequence[np.ndarray],
    eligible: Sequence[bool],
    tiebreak: Sequence[tuple[Any, ...]],
    n_distinct: int,
    metric: str,
    folds: int = DEFAULT_CV_FOLDS,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    gap_tol: float = DEFAULT_GAP_TOL,
) -> SelectionTrust:
    """The winner's dev bootstrap CIs (paired with target and source) and the CV estimate."""
    dev = paired_metrics(target_scores, best_scores, source_scores, metric=metric,
                         n_boot=n_boot, level=level, seed=seed, gap_tol=gap_tol, warn=False)
    boot = bootstrap_means([best_scores], n_boot=n_boot, seed=seed)[:, 0]
    metric_ci, _ = percentile_ci(boot, np.ones(n_boot, dtype=bool), level)
    cv = cross_validated_selection(all_scores, eligible, tiebreak, folds=folds, seed=seed,
                                   target=target_scores, source=source_scores, gap_tol=gap_tol)
    return SelectionTrust(len(all_scores), int(sum(bool(e) for e in eligible)), n_distinct,
                          dev, metric_ci, cv)


def check_test_against_dev(trust: SelectionTrust, test: TransplantMetrics) -> str | None:
    """Compare the winner's test figure with its dev CI; returns (and records) a warning
    when it falls outside. The figure is recovery when both splits define it and the dev
    CI exists, else the delta over the target (splits have their own baselines)."""
    dev = trust.dev
    figure = "delta"
    dev_ci = dev.ci.get("delta")
    dev_v: float | None = dev.delta
    test_v: float | None = test.delta
    if dev.ci.get("recovery") is not None and test.recovery is not None:
        figure, dev_ci, dev_v, test_v = "recovery", dev.ci["recovery"], dev.recovery, test.recovery
    if dev_ci is None or test_v is None:
        trust.test_check = {"figure": figure, "test": test_v, "dev": dev_v, "dev_ci": None,
                            "outside": None}
        return None
    outside = not (dev_ci[0] - 1e-12 <= test_v <= dev_ci[1] + 1e-12)
    trust.test_check = {"figure": figure, "test": test_v, "dev": dev_v,
                        "dev_ci": _list(dev_ci), "outside": outside}
    if not outside:
        return None
    side = "below" if test_v < dev_ci[0] else "above"
    cv = "" if trust.cv is None else (
        f"; the selection-corrected dev estimate ({trust.cv.folds}-fold CV) is "
        + (f"recovery {trust.cv.recovery:.3g}" if figure == "recovery"
           and trust.cv.recovery is not None else f"{trust.cv.metric:.4g}"))
    why = (f"a winner chosen among {trust.n_configs} configurations on {dev.n} dev examples "
           f"has an optimistic dev figure{cv}" if side == "below" else
           "dev and test disagree more than the dev CI allows (small or dissimilar splits)")
    trust.warning = (
        f"the chosen configuration's test {figure} {test_v:.3g} is {side} its dev "
        f"{100 * dev.level:g}% CI [{dev_ci[0]:.3g}, {dev_ci[1]:.3g}] (dev {dev_v:.3g}): {why}"
    )
    return trust.warning


__all__ = [
    "DEFAULT_CV_FOLDS",
    "CrossValidation",
    "SelectionWarning",
    "SelectionTrust",
    "assess_selection",
    "check_test_against_dev",
    "choose_best",
    "cross_validated_selection",
    "describe_search",
    "fold_indices",
    "is_feasible",
    "pareto_front",
]
