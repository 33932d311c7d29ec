"""Statistics: pure numpy, shared by evaluate, sweep and pipeline."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from tl_transplant import stats
from tl_transplant.evaluation.evaluator import EvalResult, retention, transplant_metrics
from tl_transplant.tasks.metrics import ACCURACY_METRICS


def _scores(p: float, n: int = 40, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def test_pure_numpy() -> None:
    tree = ast.parse(Path(stats.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "math", "warnings", "collections.abc", "dataclasses", "typing",
                    "numpy", "jaxtyping", "tl_transplant.tasks.metrics",
                    "tl_transplant.errors"}, mods
    assert set(stats.ACCURACY_METRICS) == set(ACCURACY_METRICS)


def test_names_still_importable_from_evaluate() -> None:
    ev = importlib.import_module("tl_transplant.evaluation.evaluator")
    for name in ("tir", "recovery", "bootstrap_means", "UndefinedMetricWarning",
                 "TransplantMetrics", "DEFAULT_GAP_TOL", "DEFAULT_N_BOOT"):
        assert getattr(ev, name) is getattr(stats, name)


def test_paired_metrics_is_transplant_metrics_on_arrays() -> None:
    t, x, s = _scores(0.3), _scores(0.6, seed=1), _scores(0.8, seed=2)
    a = stats.paired_metrics(t, x, s, metric="next_token_acc", n_boot=300, seed=4)
    ev = [EvalResult("task", "next_token_acc", m, v, True) for m, v in (("t", t), ("x", x),
                                                                         ("s", s))]
    b = transplant_metrics(*ev, n_boot=300, seed=4)
    assert a.to_dict() == b.to_dict()
    assert a.delta == pytest.approx(x.mean() - t.mean())
    assert a.recovery == pytest.approx((x.mean() - t.mean()) / (s.mean() - t.mean()))
    lo, hi = a.ci["delta"]
    assert lo <= a.delta <= hi


def test_paired_diff_ci_is_the_retention_ci() -> None:
    before, after = _scores(0.7), _scores(0.5, seed=3)
    ci = stats.paired_diff_ci(before, after, n_boot=500, seed=2)
    r = retention(EvalResult("c", "next_token_acc", "m", before, True),
                  EvalResult("c", "next_token_acc", "m", after, True), n_boot=500, seed=2)
    assert ci == r.ci_drop
    assert ci is not None and ci[0] <= before.mean() - after.mean() <= ci[1]
    assert stats.paired_diff_ci(before, before, n_boot=50) == (0.0, 0.0)


def test_percentile_ci_needs_half_valid() -> None:
    v = np.arange(10, dtype=float)
    ok = np.zeros(10, dtype=bool)
    ok[:4] = True
    assert stats.percentile_ci(v, ok, 0.9) == (None, 4)
    ok[:5] = True
    ci, n = stats.percentile_ci(v, ok, 0.5)
    assert n == 5 and ci == (1.0, 3.0)
