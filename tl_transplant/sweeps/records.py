"""The typed records of a sweep and of a run: what ``results.json`` holds, field by field.

One model, :class:`Results`, is a run's ``results.json``; the text summary
(:func:`tl_transplant.report.text.format_table`), the HTML report and the CLI read it by
attribute, never a dict by key. Its parts are the records the live objects of a sweep
make once (:meth:`~tl_transplant.sweeps.verdict.ControlResult.record`,
:meth:`~tl_transplant.sweeps.rows.ComparisonCell.record`,
:meth:`~tl_transplant.sweeps.selection.SelectionTrust.record`, ...), which
``SweepResult.to_dict`` (``sweep.json``) uses too: a control comparison is computed once
(:mod:`tl_transplant.sweeps.verdict`) and only copied into these records.

Records are pydantic models (frozen; unknown keys refused), so a saved ``results.json``
reads back with :meth:`Results.load`. Key order is the order of the fields below, and
:meth:`Results.to_dict` is exactly the JSON a run writes (NaN written as null).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tl_transplant.errors import TLTransplantError

#: The keys of a run's ``results.json``, in order.
RESULT_KEYS = ("baselines", "best", "test", "controls", "retention", "retention_control",
               "fraction_params", "fraction_units", "comparison", "searched", "selection",
               "notes")
#: A ``(lo, hi)`` confidence interval as JSON writes it.
CI = list[float]


class ResultsFileError(TLTransplantError, ValueError):
    """A ``results.json`` that cannot be read as a run's results."""


class Record(BaseModel):
    """Base of every record: immutable, unknown keys refused, written in field order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (NaN/inf -> None, tuples -> lists)."""
        from tl_transplant.sweeps.rows import clean_json

        out: dict[str, Any] = clean_json(self.model_dump())
        return out


class MaskRecord(Record):
    """A weight mask in a results file (never its indices: count, digest, largest tensors)."""

    n_params: int
    sha256: str
    n_tensors: int
    top_tensors: dict[str, int]


class ChoiceRecord(Record):
    """The configuration chosen on dev (``results.json`` ``best``)."""

    method: str
    grain: str
    pct_params: float | None
    pct_units: float | None
    #: A budget fraction, ``"suggested"``, ``"dense"``, or None for a top-K row.
    budget: float | str | None
    k: int
    alpha: float
    effective_alpha: float
    extrapolates: bool
    n_params: int | None
    units: list[str]
    mask: MaskRecord | None
    dev_metric: float | None


class TestRecord(Record):
    """The chosen configuration on test: its metric, TIR, recovery, and their CIs."""

    __test__ = False  # not a pytest class

    transplanted: float | None
    tir: float | None
    recovery: float | None
    ci: dict[str, CI | None]


class ControlRecord(Record):
    """One parameter-matched control of the verdict, both sizes, and chosen minus control."""

    method: str
    grain: str
    n_params: int
    pct_params: float | None
    chosen_n_params: int
    chosen_pct_params: float | None
    alpha: float
    effective_alpha: float
    extrapolates: bool
    n_units: int | None
    note: str
    units: list[str] | None
    mask: MaskRecord | None
    test: float | None
    recovery: float | None
    recovery_ci: CI | None
    retention_drop: float | None
    best_minus_control: float | None
    best_minus_control_ci: CI | None


class VsRecord(Record):
    """A comparison cell minus one control filled to the cell's own size (``cell.vs``)."""

    method: str
    diff: float | None
    ci: CI | None
    grain: str
    n_params: int
    pct_params: float | None
    chosen_n_params: int
    chosen_pct_params: float | None
    alpha: float
    effective_alpha: float
    extrapolates: bool
    n_units: int | None
    note: str


class CellRecord(Record):
    """One (method, size) cell of the comparison: best alpha on dev, evaluated on test."""

    method: str
    size: str
    pct_params: float | None
    pct_units: float | None
    budget: float | str | None
    k: int
    n_params: int | None
    grain: str
    alpha: float
    effective_alpha: float
    extrapolates: bool
    test_metric: float | None
    test_recovery: float | None
    test_recovery_ci: CI | None
    test_delta: float | None
    test_delta_ci: CI | None
    retention_drop: float | None
    retention: dict[str, float | None]
    dev_metric: float | None
    dev_recovery: float | None
    recovery_per_pct_params: float | None
    dev_max_drop: float | None
    feasible: bool
    vs: dict[str, VsRecord]
    units: list[str]
    mask: MaskRecord | None


class ComparisonRecord(Record):
    """The method x size comparison on test (choice made on dev)."""

    note: str
    cells: list[CellRecord]


class SearchRecord(Record):
    """What a sweep searched (:func:`~tl_transplant.sweeps.selection.describe_search`)."""

    methods: list[str]
    sizes: list[str]
    alphas: list[float]
    n_configs: int
    n_distinct: int
    n_feasible: int
    text: str


class DevEstimateRecord(Record):
    """The winner's dev figures with paired bootstrap CIs."""

    metric: float | None
    metric_ci: CI | None
    delta: float | None
    delta_ci: CI | None
    recovery: float | None
    recovery_ci: CI | None
    level: float
    n_boot: int


class CrossValidationRecord(Record):
    """The selection procedure cross-validated over the dev examples."""

    folds: int
    metric: float | None
    target: float | None
    source: float | None
    recovery: float | None
    fold_metrics: list[float | None]


class TestVsDevRecord(Record):
    """The winner's test figure against its dev CI."""

    __test__ = False

    figure: Literal["recovery", "delta"]
    test: float | None
    dev: float | None
    dev_ci: CI | None
    outside: bool | None


class TrustRecord(Record):
    """How much to trust the choice (:class:`~tl_transplant.sweeps.selection.SelectionTrust`)."""

    n_configs: int
    n_feasible: int
    n_distinct: int
    dev: DevEstimateRecord
    cv: CrossValidationRecord | None
    test_vs_dev: TestVsDevRecord | None
    warning: str | None
    text: str


class RetentionRecord(Record):
    """One control task on test, before and after the chosen transplant."""

    task: str
    before: float | None
    after: float | None
    drop: float | None


class RetentionControl(Record):
    """Which retention signal the sweep used: the given control tasks, the generic proxy,
    or none."""

    mode: Literal["given", "generic", "none"]
    description: str


class SplitBaseline(Record):
    """One model's task metric on dev and (once anything ran on test) on test."""

    dev: float | None
    test: float | None


class Baselines(Record):
    """Source and target on the task, before any transplant."""

    source: SplitBaseline
    target: SplitBaseline


class Results(Record):
    """A run's ``results.json``: the baselines, the configuration chosen on dev and its test
    figures, the parameter-matched controls, retention, sizes, the comparison, what was
    searched, how much to trust the choice, and the notes.

    Built by :meth:`tl_transplant.sweeps.result.SweepResult.results`; read by the text
    summary and the report. ``fraction_params`` is of the block parameters;
    ``fraction_units`` of the units searched (None for a weight mask or dense).
    """

    baselines: Baselines
    best: ChoiceRecord | None = None
    test: TestRecord | None = None
    controls: dict[str, ControlRecord] = Field(default_factory=dict)
    retention: list[RetentionRecord] = Field(default_factory=list)
    retention_control: RetentionControl | None = None
    fraction_params: float = 0.0
    fraction_units: float | None = 0.0
    comparison: ComparisonRecord | None = None
    searched: SearchRecord | None = None
    selection: TrustRecord | None = None
    notes: list[str] = Field(default_factory=list)

    def to_json(self) -> str:
        """The text of ``results.json``."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def save(self, path: str | Path) -> Path:
        """Write ``results.json`` (:meth:`to_json`) to ``path``."""
        p = Path(path)
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Read a ``results.json`` written by a run."""
        p = Path(path)
        try:
            return cls.model_validate(json.loads(p.read_text()))
        except (OSError, ValueError) as e:  # json's and pydantic's errors are ValueErrors
            why = e.errors()[0]["msg"] if isinstance(e, ValidationError) else e
            raise ResultsFileError(f"cannot read {p} as a run's results.json: {why}") from e

    # ---- the dict of 0.1 (``RunResult.results["test"]``), for one release ----------------
    def __getitem__(self, key: str) -> Any:
        warnings.warn("results[...] reads the results as a dict: use the attributes "
                      "(results.test.recovery) or results.to_dict(); the dict access goes "
                      "in tl_transplant 0.3", DeprecationWarning, stacklevel=2)
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated dict access (see :meth:`__getitem__`)."""
        warnings.warn("results.get(...) reads the results as a dict: use the attributes or "
                      "results.to_dict(); the dict access goes in tl_transplant 0.3",
                      DeprecationWarning, stacklevel=2)
        return self.to_dict().get(key, default)


__all__ = [
    "CI",
    "RESULT_KEYS",
    "Baselines",
    "CellRecord",
    "ChoiceRecord",
    "ComparisonRecord",
    "ControlRecord",
    "CrossValidationRecord",
    "DevEstimateRecord",
    "MaskRecord",
    "Record",
    "Results",
    "ResultsFileError",
    "RetentionControl",
    "RetentionRecord",
    "SearchRecord",
    "SplitBaseline",
    "TestRecord",
    "TestVsDevRecord",
    "TrustRecord",
    "VsRecord",
]
