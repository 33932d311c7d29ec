"""The sweep on dev and the report on test: the protocol (``protocol``: ``sweep``), its
stages (``stages``) and settings (``options``), the search space (``search``), rows and
comparison cells (``rows``), the selection rule and how much to trust it (``selection``),
parameter-matched controls (``verdict``), the result (``result``: ``SweepResult``), the
typed records of ``results.json`` (``records``: ``Results``), the text summary
(``summary``) and the figure (``figure``).

``tl_transplant.sweeps`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "sweep": "protocol",
    "SweepOptions": "options",
    "Choice": "stages",
    "DevRun": "stages",
    "GENERIC_RETENTION_NOTE": "stages",
    "Models": "stages",
    "SweepPlan": "stages",
    "TestRun": "stages",
    "assemble": "stages",
    "assess": "stages",
    "choose": "stages",
    "compare_controls": "stages",
    "plan_sweep": "stages",
    "report_on_test": "stages",
    "run_on_dev": "stages",
    "run_sweep": "stages",
    "SweepResult": "result",
    "Baselines": "records",
    "CellRecord": "records",
    "ChoiceRecord": "records",
    "ComparisonRecord": "records",
    "ControlRecord": "records",
    "MaskRecord": "records",
    "RESULT_KEYS": "records",
    "Record": "records",
    "Results": "records",
    "ResultsFileError": "records",
    "RetentionControl": "records",
    "RetentionRecord": "records",
    "SearchRecord": "records",
    "TestRecord": "records",
    "TrustRecord": "records",
    "VsRecord": "records",
    "COMPARISON_NOTE": "summary",
    "NO_CHOICE": "summary",
    "format_comparison": "summary",
    "format_controls": "summary",
    "format_sweep_summary": "summary",
    "plot_sweep": "figure",
    "ComparisonCell": "rows",
    "SweepRow": "rows",
    "clean_json": "rows",
    "Config": "search",
    "DEFAULT_KS": "search",
    "EXTRAPOLATING": "search",
    "GRAIN_DENSE": "search",
    "GRAIN_UNIT": "search",
    "GRAIN_WEIGHT": "search",
    "HasSplits": "search",
    "INVERSE_FRACTION": "search",
    "Kinds": "search",
    "RankedSource": "search",
    "RankedUnits": "search",
    "ScoresLike": "search",
    "SweepError": "search",
    "TaskLike": "search",
    "alpha_scale_of": "search",
    "budget_units": "search",
    "grain_of": "search",
    "mask_summary": "search",
    "method_label": "search",
    "normalize_methods": "search",
    "plan_search": "search",
    "resolve_ks": "search",
    "scored_kinds": "search",
    "selection_key": "search",
    "split_task": "search",
    "suggested_units": "search",
    "top_units": "search",
    "CrossValidation": "selection",
    "DEFAULT_CV_FOLDS": "selection",
    "SelectionTrust": "selection",
    "SelectionWarning": "selection",
    "assess_selection": "selection",
    "check_test_against_dev": "selection",
    "choose_best": "selection",
    "cross_validated_selection": "selection",
    "describe_search": "selection",
    "fold_indices": "selection",
    "is_feasible": "selection",
    "pareto_front": "selection",
    "ControlResult": "verdict",
    "DEFAULT_CONTROL_METHODS": "verdict",
    "DENSE_AT_COST": "verdict",
    "DevPoint": "verdict",
    "Evaluate": "verdict",
    "MatchedControl": "verdict",
    "compare_with_controls": "verdict",
    "control_sources": "verdict",
    "dense_alpha_at_cost": "verdict",
    "match_control": "verdict",
}

if TYPE_CHECKING:
    from tl_transplant.sweeps.figure import (
        plot_sweep as plot_sweep,
    )
    from tl_transplant.sweeps.options import (
        SweepOptions as SweepOptions,
    )
    from tl_transplant.sweeps.protocol import (
        sweep as sweep,
    )
    from tl_transplant.sweeps.records import (
        RESULT_KEYS as RESULT_KEYS,
    )
    from tl_transplant.sweeps.records import (
        Baselines as Baselines,
    )
    from tl_transplant.sweeps.records import (
        CellRecord as CellRecord,
    )
    from tl_transplant.sweeps.records import (
        ChoiceRecord as ChoiceRecord,
    )
    from tl_transplant.sweeps.records import (
        ComparisonRecord as ComparisonRecord,
    )
    from tl_transplant.sweeps.records import (
        ControlRecord as ControlRecord,
    )
    from tl_transplant.sweeps.records import (
        MaskRecord as MaskRecord,
    )
    from tl_transplant.sweeps.records import (
        Record as Record,
    )
    from tl_transplant.sweeps.records import (
        Results as Results,
    )
    from tl_transplant.sweeps.records import (
        ResultsFileError as ResultsFileError,
    )
    from tl_transplant.sweeps.records import (
        RetentionControl as RetentionControl,
    )
    from tl_transplant.sweeps.records import (
        RetentionRecord as RetentionRecord,
    )
    from tl_transplant.sweeps.records import (
        SearchRecord as SearchRecord,
    )
    from tl_transplant.sweeps.records import (
        TestRecord as TestRecord,
    )
    from tl_transplant.sweeps.records import (
        TrustRecord as TrustRecord,
    )
    from tl_transplant.sweeps.records import (
        VsRecord as VsRecord,
    )
    from tl_transplant.sweeps.result import (
        SweepResult as SweepResult,
    )
    from tl_transplant.sweeps.rows import (
        ComparisonCell as ComparisonCell,
    )
    from tl_transplant.sweeps.rows import (
        SweepRow as SweepRow,
    )
    from tl_transplant.sweeps.rows import (
        clean_json as clean_json,
    )
    from tl_transplant.sweeps.search import (
        DEFAULT_KS as DEFAULT_KS,
    )
    from tl_transplant.sweeps.search import (
        EXTRAPOLATING as EXTRAPOLATING,
    )
    from tl_transplant.sweeps.search import (
        GRAIN_DENSE as GRAIN_DENSE,
    )
    from tl_transplant.sweeps.search import (
        GRAIN_UNIT as GRAIN_UNIT,
    )
    from tl_transplant.sweeps.search import (
        GRAIN_WEIGHT as GRAIN_WEIGHT,
    )
    from tl_transplant.sweeps.search import (
        INVERSE_FRACTION as INVERSE_FRACTION,
    )
    from tl_transplant.sweeps.search import (
        Config as Config,
    )
    from tl_transplant.sweeps.search import (
        HasSplits as HasSplits,
    )
    from tl_transplant.sweeps.search import (
        Kinds as Kinds,
    )
    from tl_transplant.sweeps.search import (
        RankedSource as RankedSource,
    )
    from tl_transplant.sweeps.search import (
        RankedUnits as RankedUnits,
    )
    from tl_transplant.sweeps.search import (
        ScoresLike as ScoresLike,
    )
    from tl_transplant.sweeps.search import (
        SweepError as SweepError,
    )
    from tl_transplant.sweeps.search import (
        TaskLike as TaskLike,
    )
    from tl_transplant.sweeps.search import (
        alpha_scale_of as alpha_scale_of,
    )
    from tl_transplant.sweeps.search import (
        budget_units as budget_units,
    )
    from tl_transplant.sweeps.search import (
        grain_of as grain_of,
    )
    from tl_transplant.sweeps.search import (
        mask_summary as mask_summary,
    )
    from tl_transplant.sweeps.search import (
        method_label as method_label,
    )
    from tl_transplant.sweeps.search import (
        normalize_methods as normalize_methods,
    )
    from tl_transplant.sweeps.search import (
        plan_search as plan_search,
    )
    from tl_transplant.sweeps.search import (
        resolve_ks as resolve_ks,
    )
    from tl_transplant.sweeps.search import (
        scored_kinds as scored_kinds,
    )
    from tl_transplant.sweeps.search import (
        selection_key as selection_key,
    )
    from tl_transplant.sweeps.search import (
        split_task as split_task,
    )
    from tl_transplant.sweeps.search import (
        suggested_units as suggested_units,
    )
    from tl_transplant.sweeps.search import (
        top_units as top_units,
    )
    from tl_transplant.sweeps.selection import (
        DEFAULT_CV_FOLDS as DEFAULT_CV_FOLDS,
    )
    from tl_transplant.sweeps.selection import (
        CrossValidation as CrossValidation,
    )
    from tl_transplant.sweeps.selection import (
        SelectionTrust as SelectionTrust,
    )
    from tl_transplant.sweeps.selection import (
        SelectionWarning as SelectionWarning,
    )
    from tl_transplant.sweeps.selection import (
        assess_selection as assess_selection,
    )
    from tl_transplant.sweeps.selection import (
        check_test_against_dev as check_test_against_dev,
    )
    from tl_transplant.sweeps.selection import (
        choose_best as choose_best,
    )
    from tl_transplant.sweeps.selection import (
        cross_validated_selection as cross_validated_selection,
    )
    from tl_transplant.sweeps.selection import (
        describe_search as describe_search,
    )
    from tl_transplant.sweeps.selection import (
        fold_indices as fold_indices,
    )
    from tl_transplant.sweeps.selection import (
        is_feasible as is_feasible,
    )
    from tl_transplant.sweeps.selection import (
        pareto_front as pareto_front,
    )
    from tl_transplant.sweeps.stages import (
        GENERIC_RETENTION_NOTE as GENERIC_RETENTION_NOTE,
    )
    from tl_transplant.sweeps.stages import (
        Choice as Choice,
    )
    from tl_transplant.sweeps.stages import (
        DevRun as DevRun,
    )
    from tl_transplant.sweeps.stages import (
        Models as Models,
    )
    from tl_transplant.sweeps.stages import (
        SweepPlan as SweepPlan,
    )
    from tl_transplant.sweeps.stages import (
        TestRun as TestRun,
    )
    from tl_transplant.sweeps.stages import (
        assemble as assemble,
    )
    from tl_transplant.sweeps.stages import (
        assess as assess,
    )
    from tl_transplant.sweeps.stages import (
        choose as choose,
    )
    from tl_transplant.sweeps.stages import (
        compare_controls as compare_controls,
    )
    from tl_transplant.sweeps.stages import (
        plan_sweep as plan_sweep,
    )
    from tl_transplant.sweeps.stages import (
        report_on_test as report_on_test,
    )
    from tl_transplant.sweeps.stages import (
        run_on_dev as run_on_dev,
    )
    from tl_transplant.sweeps.stages import (
        run_sweep as run_sweep,
    )
    from tl_transplant.sweeps.summary import (
        COMPARISON_NOTE as COMPARISON_NOTE,
    )
    from tl_transplant.sweeps.summary import (
        NO_CHOICE as NO_CHOICE,
    )
    from tl_transplant.sweeps.summary import (
        format_comparison as format_comparison,
    )
    from tl_transplant.sweeps.summary import (
        format_controls as format_controls,
    )
    from tl_transplant.sweeps.summary import (
        format_sweep_summary as format_sweep_summary,
    )
    from tl_transplant.sweeps.verdict import (
        DEFAULT_CONTROL_METHODS as DEFAULT_CONTROL_METHODS,
    )
    from tl_transplant.sweeps.verdict import (
        DENSE_AT_COST as DENSE_AT_COST,
    )
    from tl_transplant.sweeps.verdict import (
        ControlResult as ControlResult,
    )
    from tl_transplant.sweeps.verdict import (
        DevPoint as DevPoint,
    )
    from tl_transplant.sweeps.verdict import (
        Evaluate as Evaluate,
    )
    from tl_transplant.sweeps.verdict import (
        MatchedControl as MatchedControl,
    )
    from tl_transplant.sweeps.verdict import (
        compare_with_controls as compare_with_controls,
    )
    from tl_transplant.sweeps.verdict import (
        control_sources as control_sources,
    )
    from tl_transplant.sweeps.verdict import (
        dense_alpha_at_cost as dense_alpha_at_cost,
    )
    from tl_transplant.sweeps.verdict import (
        match_control as match_control,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
