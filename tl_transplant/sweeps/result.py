"""The result of a sweep (:class:`SweepResult`): every dev configuration, the choice, its
test report, the verdict against parameter-matched controls, and how much to trust it.

Its tables (``to_frame``, ``comparison_frame``), its files (``save``: ``results.json``,
``sweep.csv``, ``sweep.png``), its text summary (``summary``,
:mod:`tl_transplant.sweeps.summary`) and the typed records a run's ``results.json`` is
made of (:meth:`SweepResult.results`, :mod:`tl_transplant.sweeps.records`). The HTML
report sits above it: :func:`tl_transplant.report.save_sweep` saves a sweep with its page.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from tl_transplant.evaluation.evaluator import EvalResult
from tl_transplant.sweeps.records import (
    Baselines,
    ChoiceRecord,
    ComparisonRecord,
    ControlRecord,
    MaskRecord,
    Record,
    Results,
    RetentionControl,
    RetentionRecord,
    SearchRecord,
    SplitBaseline,
    TestRecord,
)
from tl_transplant.sweeps.rows import ComparisonCell, SweepRow, clean_json
from tl_transplant.sweeps.search import SweepError, mask_summary
from tl_transplant.sweeps.selection import SelectionTrust
from tl_transplant.sweeps.summary import COMPARISON_NOTE, format_sweep_summary
from tl_transplant.sweeps.verdict import ControlResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure


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
    searched: SearchRecord | None = None
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
        """A few human-readable lines (:mod:`tl_transplant.sweeps.summary`)."""
        return format_sweep_summary(self)

    # ---- the typed records --------------------------------------------------------------
    def control_records(self) -> dict[str, ControlRecord]:
        """The verdict: each control filled to the chosen configuration's size, on test."""
        return {k: v.record() for k, v in self.verdict.items()}

    def comparison_record(self) -> ComparisonRecord | None:
        """The method x size comparison on test (None without ``compare_on_test``)."""
        if not self.comparison:
            return None
        return ComparisonRecord(note=COMPARISON_NOTE, cells=[c.record() for c in self.comparison])

    def retention_control(self) -> RetentionControl | None:
        """Which retention signal the sweep used."""
        ret = self.config.get("retention")
        return None if not ret else RetentionControl(**ret)

    def results(self, n_search: int | None = None) -> Results:
        """The run's results (``results.json``): baselines, the choice and its test figures,
        the parameter-matched controls (both sizes), retention, sizes, the comparison, what
        was searched, how much to trust the choice, and the notes. ``n_search``: the number
        of units of the searched kinds (for ``fraction_units``; None or 0: not counted)."""
        base_test = self.baselines.get("test", {})
        base_dev = self.baselines["dev"]
        baselines = Baselines(**{
            side: SplitBaseline(dev=base_dev[side].mean,
                                test=base_test[side].mean if side in base_test else None)
            for side in ("source", "target")})
        common: dict[str, Any] = dict(
            baselines=baselines, retention_control=self.retention_control(),
            comparison=self.comparison_record(), searched=self.searched,
            selection=None if self.trust is None else self.trust.record(),
            notes=list(self.notes))
        best = self.best
        if best is None or best.test is None:
            return Results(best=None, test=None, controls={}, retention=[],
                           fraction_params=0.0, fraction_units=0.0, **common)
        met = best.test.metrics
        return Results(
            best=ChoiceRecord(
                method=best.method, grain=best.grain, pct_params=best.pct_params,
                pct_units=best.pct_units, budget=best.budget, k=best.k, alpha=best.alpha,
                effective_alpha=best.effective_alpha, extrapolates=best.extrapolates,
                n_params=best.n_params, units=list(best.units),
                mask=None if best.mask is None else MaskRecord(**mask_summary(best.mask)),
                dev_metric=best.metric),
            test=TestRecord(transplanted=met.transplanted, tir=met.tir, recovery=met.recovery,
                            ci={k: (None if v is None else [float(x) for x in v])
                                for k, v in met.ci.items()}),
            controls=self.control_records(),
            retention=[RetentionRecord(task=r.task, before=r.before, after=r.after, drop=r.drop)
                       for r in best.test.retention],
            fraction_params=best.pct_params or 0.0,
            fraction_units=(best.k / n_search if best.grain == "unit" and n_search else None),
            **common,
        )

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
        the paired test difference (CI) against each control at the same size.
        """
        import pandas as pd

        recs = []
        for c in self.comparison:
            d = c.record()
            rec: dict[str, Any] = {
                "method": d.method, "size": d.size, "pct_params": d.pct_params,
                "pct_units": d.pct_units, "alpha": d.alpha, "test_metric": d.test_metric,
                "test_recovery": d.test_recovery, "test_recovery_ci": _pair(d.test_recovery_ci),
                "retention_drop": d.retention_drop, "dev_metric": d.dev_metric,
                "dev_recovery": d.dev_recovery, "feasible": d.feasible,
            }
            for ctrl, v in d.vs.items():
                rec[f"minus_{ctrl}"] = v.diff
                rec[f"minus_{ctrl}_ci"] = _pair(v.ci)
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
                "comparison": _dump(self.comparison_record()),
                "searched": _dump(self.searched) or {},
                "verdict": {
                    "controls": {k: v.to_dict() for k, v in self.control_records().items()},
                    "selection": _dump(None if self.trust is None else self.trust.record()),
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

    def save(self, directory: str | Path, *, report: bool = False, overwrite: bool = False,
             **report_kwargs: Any) -> Path:
        """Write ``results.json`` (this sweep's :meth:`to_dict`), ``sweep.csv`` and
        ``sweep.png`` under ``directory`` (and ``comparison.csv`` when the sweep ran
        ``compare_on_test``); returns the directory.

        A directory that already holds a run's or a sweep's files is refused (two runs
        would mix: the new results beside the old report and manifest) unless
        ``overwrite=True``, which first removes the old run's own files (those of
        :data:`RUN_FILES`; other files are kept).

        The sweep does not import the report (it sits above it): for ``report.html`` too,
        call :func:`tl_transplant.report.save_sweep` (``save(..., report=True)`` of 0.1).
        """
        if report or report_kwargs:
            raise SweepError(
                "SweepResult.save() writes results.json, sweep.csv and sweep.png only (the sweep "
                "does not import the report); for report.html too, call "
                "tl_transplant.report.save_sweep(result, directory, pair=..., task=..., "
                "scores=...)"
            )
        d = Path(directory)
        old = run_files(d)
        if not any(p.name in RUN_MARKERS for p in old):
            old = []  # e.g. the scores a run wrote just before its sweep: not an earlier run
        if old and not overwrite:
            raise SweepError(
                f"{d} already holds the files of an earlier run or sweep ("
                + ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
                + "); saving there would mix two runs. Choose a new directory or pass "
                "overwrite=True to replace that run's files."
            )
        for p in old:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        self.to_frame().to_csv(d / "sweep.csv", index=False)
        if self.comparison:
            self.comparison_frame().to_csv(d / "comparison.csv", index=False)
        self.plot().savefig(d / "sweep.png", dpi=120)
        return d


RUN_FILES = ("results.json", "sweep.json", "sweep.csv", "sweep.png", "comparison.csv",
             "report.html", "transplant_manifest.json", "scores_*.json",
             "weights-*.safetensors", "model")
"""The files a sweep or a run writes at the top of its directory (glob patterns)."""
#: The files that mark a directory as an earlier run's or sweep's (scores alone do not).
RUN_MARKERS = frozenset({"results.json", "sweep.json", "sweep.csv", "sweep.png",
                         "comparison.csv", "report.html", "transplant_manifest.json"})


def run_files(d: Path) -> list[Path]:
    """The files of an earlier run or sweep in ``d`` (:data:`RUN_FILES`), sorted."""
    if not d.is_dir():
        return []
    return sorted({p for pat in RUN_FILES for p in d.glob(pat)})


def _dump(rec: Record | None) -> dict[str, Any] | None:
    return None if rec is None else rec.to_dict()


def _pair(ci: list[float] | None) -> tuple[float, float] | None:
    """A CI as a tuple: how the CSV tables have always written it, ``(lo, hi)``."""
    return None if ci is None else (ci[0], ci[1])


__all__ = ["RUN_FILES", "RUN_MARKERS", "SweepResult", "run_files"]
