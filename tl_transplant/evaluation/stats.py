"""Statistics of paired per-example scores: TIR, recovery, paired bootstrap CIs.

Pure numpy: no models. Which metrics are accuracies (TIR is defined only for those) is
the metric registry's to say (:func:`tl_transplant.tasks.metrics.is_accuracy`).
:mod:`tl_transplant.evaluation.evaluator` (per-example
scores of models), :mod:`tl_transplant.sweeps.protocol` (dev numbers per configuration)
and :mod:`tl_transplant.pipeline.runner` (best vs control) all compute their numbers
here.

Definitions (``s``, ``t``, ``x``: mean metric of source, target, transplanted
target on the *same* examples):

* ``delta = x - t``;
* ``TIR = x / t``: only for accuracy metrics (``Metric.accuracy``; :data:`ACCURACY_METRICS`),
  ``None`` when ``t == 0``;
* ``recovery = (x - t) / (s - t)``: ``None`` (with an
  :class:`UndefinedMetricWarning`) when ``|s - t| < gap_tol`` (default 1e-3);
* CIs: paired percentile bootstrap. One index vector of size n is drawn with
  replacement per replicate (``numpy.random.default_rng(seed)``) and applied to
  all score vectors; the statistic is recomputed from the resampled means;
  replicates where it is undefined (``t* == 0`` for TIR, ``|s* - t*| < gap_tol``
  for recovery) are dropped and counted, and the CI is ``None`` when more than
  half are dropped or the point value is undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float

from tl_transplant.errors import EvaluationError
from tl_transplant.tasks.metrics import accuracy_metrics, is_accuracy

DEFAULT_GAP_TOL = 1e-3
DEFAULT_N_BOOT = 2000


def __getattr__(name: str) -> Any:
    # ACCURACY_METRICS: the registered accuracy metrics now (per example in [0, 1]: 0/1, or a
    # fraction of agreeing positions for next_token_agreement), for which TIR is defined.
    if name == "ACCURACY_METRICS":
        return accuracy_metrics()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UndefinedMetricWarning(UserWarning):
    """A ratio metric (TIR or recovery) is undefined for these scores and is reported as None."""


def _warn(msg: str, notes: list[str] | None, warn: bool) -> None:
    if notes is not None:
        notes.append(msg)
    if warn:
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=3)


def tir(
    transplanted: float,
    target: float,
    *,
    metric: str = "next_token_acc",
    warn: bool = True,
    notes: list[str] | None = None,
) -> float | None:
    """TIR = transplanted / target for 0/1 metrics; None when target is 0 (or not an accuracy)."""
    if not is_accuracy(metric):
        if notes is not None:
            notes.append(f"TIR not reported: {metric} is not an accuracy")
        return None
    if target == 0:
        _warn("TIR undefined: the target's accuracy is 0", notes, warn)
        return None
    return float(transplanted / target)


def recovery(
    transplanted: float,
    target: float,
    source: float,
    *,
    gap_tol: float = DEFAULT_GAP_TOL,
    warn: bool = True,
    notes: list[str] | None = None,
) -> float | None:
    """(transplanted - target) / (source - target); None + warning when |gap| < gap_tol."""
    gap = source - target
    if not math.isfinite(gap) or abs(gap) < gap_tol:
        _warn(
            f"recovery undefined: |source - target| = {abs(gap):.3g} is below the tolerance "
            f"{gap_tol:g}; there is no gap to recover",
            notes,
            warn,
        )
        return None
    return float((transplanted - target) / gap)


def bootstrap_means(
    arrays: Sequence[np.ndarray | Sequence[float]], *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> Float[np.ndarray, "n_boot n_arrays"]:
    """Means of paired resamples: one index draw per replicate, shared by all arrays."""
    arrs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise EvaluationError(f"paired bootstrap needs equal lengths, got {[len(a) for a in arrs]}")
    if n == 0:
        raise EvaluationError("cannot bootstrap zero examples")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(arrs)))
    chunk = max(1, 1_000_000 // n)
    for lo in range(0, n_boot, chunk):
        m = min(chunk, n_boot - lo)
        idx = rng.integers(0, n, size=(m, n))
        for j, a in enumerate(arrs):
            out[lo : lo + m, j] = a[idx].mean(axis=1)
    return out


def percentile_ci(
    values: np.ndarray, valid: np.ndarray, level: float
) -> tuple[tuple[float, float] | None, int]:
    """Percentile CI of the valid replicates, and how many were valid.

    ``None`` when none, or fewer than half, of the replicates are valid.
    """
    n_ok = int(valid.sum())
    if n_ok == 0 or n_ok < 0.5 * len(values):
        return None, n_ok
    lo, hi = np.quantile(values[valid], [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi)), n_ok


def paired_diff_ci(
    a: np.ndarray | Sequence[float],
    b: np.ndarray | Sequence[float],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Paired percentile bootstrap CI of ``mean(a) - mean(b)`` over the same examples."""
    boot = bootstrap_means([a, b], n_boot=n_boot, seed=seed)
    ci, _ = percentile_ci(boot[:, 0] - boot[:, 1], np.ones(n_boot, dtype=bool), level)
    return ci


@dataclass
class TransplantMetrics:
    """Point estimates and paired bootstrap CIs for one transplanted model."""

    metric: str
    n: int
    source: float | None
    target: float
    transplanted: float
    delta: float
    tir: float | None
    recovery: float | None
    ci: dict[str, tuple[float, float] | None]
    n_valid: dict[str, int]
    level: float
    n_boot: int
    seed: int
    gap_tol: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "n": self.n,
            "source": self.source,
            "target": self.target,
            "transplanted": self.transplanted,
            "delta": self.delta,
            "tir": self.tir,
            "recovery": self.recovery,
            "ci": {k: (list(v) if v is not None else None) for k, v in self.ci.items()},
            "bootstrap": {
                "kind": "paired percentile",
                "level": self.level,
                "n_boot": self.n_boot,
                "seed": self.seed,
                "n_valid": self.n_valid,
            },
            "gap_tol": self.gap_tol,
            "notes": list(self.notes),
        }


def paired_metrics(
    target: np.ndarray | Sequence[float],
    transplanted: np.ndarray | Sequence[float],
    source: np.ndarray | Sequence[float] | None = None,
    *,
    metric: str = "next_token_acc",
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    gap_tol: float = DEFAULT_GAP_TOL,
    warn: bool = True,
) -> TransplantMetrics:
    """Delta, TIR and recovery with paired bootstrap CIs (see the module docstring).

    Scores must be paired: example i is the same prompt in every array.
    """
    t = np.asarray(target, dtype=np.float64)
    x = np.asarray(transplanted, dtype=np.float64)
    s = None if source is None else np.asarray(source, dtype=np.float64)
    arrays = [t, x] + ([s] if s is not None else [])
    notes: list[str] = []
    mt, mx = float(t.mean()), float(x.mean())
    ms = None if s is None else float(s.mean())
    point_tir = tir(mx, mt, metric=metric, warn=warn, notes=notes)
    point_rec = (
        None if ms is None else recovery(mx, mt, ms, gap_tol=gap_tol, warn=warn, notes=notes)
    )
    boot = bootstrap_means(arrays, n_boot=n_boot, seed=seed)
    bt, bx = boot[:, 0], boot[:, 1]
    ci: dict[str, tuple[float, float] | None] = {}
    n_valid: dict[str, int] = {}
    ci["delta"], n_valid["delta"] = percentile_ci(bx - bt, np.ones(n_boot, dtype=bool), level)
    if point_tir is not None:
        ok = bt != 0
        ratio = np.where(ok, bx / np.where(ok, bt, 1), 0)
        ci["tir"], n_valid["tir"] = percentile_ci(ratio, ok, level)
    else:
        ci["tir"], n_valid["tir"] = None, 0
    if point_rec is not None:
        gap = boot[:, 2] - bt
        ok = np.abs(gap) >= gap_tol
        ci["recovery"], n_valid["recovery"] = percentile_ci(
            np.where(ok, (bx - bt) / np.where(ok, gap, 1), 0), ok, level
        )
    else:
        ci["recovery"], n_valid["recovery"] = None, 0
    for k, point in (("tir", point_tir), ("recovery", point_rec)):
        if point is not None and n_valid[k] < n_boot:
            notes.append(
                f"{k} CI: {n_boot - n_valid[k]} of {n_boot} bootstrap replicates were undefined "
                "and dropped" + ("" if ci[k] is not None else "; too many, so no CI")
            )
    return TransplantMetrics(
        metric=metric,
        n=len(t),
        source=ms,
        target=mt,
        transplanted=mx,
        delta=mx - mt,
        tir=point_tir,
        recovery=point_rec,
        ci=ci,
        n_valid=n_valid,
        level=level,
        n_boot=n_boot,
        seed=seed,
        gap_tol=gap_tol,
        notes=notes,
    )


__all__ = [
    "DEFAULT_GAP_TOL",
    "DEFAULT_N_BOOT",
    "TransplantMetrics",
    "UndefinedMetricWarning",
    "bootstrap_means",
    "paired_diff_ci",
    "paired_metrics",
    "percentile_ci",
    "recovery",
    "tir",
]
