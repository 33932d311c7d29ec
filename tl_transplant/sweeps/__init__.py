"""The sweep on dev and the report on test: the protocol (``protocol``: ``sweep``), the
search space (``search``), rows and comparison cells (``rows``), the selection rule and
how much to trust it (``selection``), parameter-matched controls (``verdict``) and the
figure (``figure``).

``tl_transplant.sweeps`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "COMPARISON_NOTE": "protocol",
    "GENERIC_RETENTION_NOTE": "protocol",
    "ComparisonCell": "protocol",
    "HasSplits": "protocol",
    "RankedSource": "protocol",
    "RankedUnits": "protocol",
    "SweepResult": "protocol",
    "SweepRow": "protocol",
    "choose_best": "protocol",
    "pareto_front": "protocol",
    "register_report_writer": "protocol",
    "sweep": "protocol",
    "plot_sweep": "figure",
    "clean_json": "rows",
    "DEFAULT_KS": "search",
    "EXTRAPOLATING": "search",
    "GRAIN_DENSE": "search",
    "GRAIN_UNIT": "search",
    "GRAIN_WEIGHT": "search",
    "Config": "search",
    "Kinds": "search",
    "ScoresLike": "search",
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
    "DEFAULT_CV_FOLDS": "selection",
    "CrossValidation": "selection",
    "SelectionWarning": "selection",
    "SelectionTrust": "selection",
    "assess_selection": "selection",
    "check_test_against_dev": "selection",
    "cross_validated_selection": "selection",
    "describe_search": "selection",
    "fold_indices": "selection",
    "is_feasible": "selection",
    "DEFAULT_CONTROL_METHODS": "verdict",
    "DENSE_AT_COST": "verdict",
    "ControlResult": "verdict",
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
    from tl_transplant.sweeps.protocol import (
        COMPARISON_NOTE as COMPARISON_NOTE,
    )
    from tl_transplant.sweeps.protocol import (
        GENERIC_RETENTION_NOTE as GENERIC_RETENTION_NOTE,
    )
    from tl_transplant.sweeps.protocol import (
        ComparisonCell as ComparisonCell,
    )
    from tl_transplant.sweeps.protocol import (
        HasSplits as HasSplits,
    )
    from tl_transplant.sweeps.protocol import (
        RankedSource as RankedSource,
    )
    from tl_transplant.sweeps.protocol import (
        RankedUnits as RankedUnits,
    )
    from tl_transplant.sweeps.protocol import (
        SweepResult as SweepResult,
    )
    from tl_transplant.sweeps.protocol import (
        SweepRow as SweepRow,
    )
    from tl_transplant.sweeps.protocol import (
        choose_best as choose_best,
    )
    from tl_transplant.sweeps.protocol import (
        pareto_front as pareto_front,
    )
    from tl_transplant.sweeps.protocol import (
        register_report_writer as register_report_writer,
    )
    from tl_transplant.sweeps.protocol import (
        sweep as sweep,
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
        Config as Config,
    )
    from tl_transplant.sweeps.search import (
        Kinds as Kinds,
    )
    from tl_transplant.sweeps.search import (
        ScoresLike as ScoresLike,
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
