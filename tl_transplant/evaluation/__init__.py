"""Evaluation: running a model on a task (``evaluator``; how a model is run: ``runner``;
greedy decoding for generative metrics: ``generation``), the statistics (``stats``: TIR,
recovery, paired bootstrap) and the generic retention proxy (``generic``). What each
metric computes is the metric registry's (:mod:`tl_transplant.tasks.metrics`).

``tl_transplant.evaluation`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "DEFAULT_GAP_TOL": "evaluator",
    "DEFAULT_N_BOOT": "evaluator",
    "EvalResult": "evaluator",
    "Retention": "evaluator",
    "TransplantMetrics": "evaluator",
    "TransplantReport": "evaluator",
    "UndefinedMetricWarning": "evaluator",
    "bootstrap_means": "evaluator",
    "evaluate": "evaluator",
    "evaluate_transplant": "evaluator",
    "recovery": "evaluator",
    "reference_top1": "evaluator",
    "retention": "evaluator",
    "tir": "evaluator",
    "transplant_metrics": "evaluator",
    "EvalModel": "runner",
    "Intervention": "runner",
    "Runner": "runner",
    "resolve_model": "runner",
    "generate_texts": "generation",
    "generation_config": "generation",
    "MAX_UNKNOWN_FRACTION": "generic",
    "METRIC": "generic",
    "NAME": "generic",
    "TEXT_PATH": "generic",
    "general_text": "generic",
    "generic_retention": "generic",
    "text_chunks": "generic",
    "unknown_fraction": "generic",
    "ACCURACY_METRICS": "stats",
    "paired_diff_ci": "stats",
    "paired_metrics": "stats",
    "percentile_ci": "stats",
}

if TYPE_CHECKING:
    from tl_transplant.evaluation.evaluator import (
        DEFAULT_GAP_TOL as DEFAULT_GAP_TOL,
    )
    from tl_transplant.evaluation.evaluator import (
        DEFAULT_N_BOOT as DEFAULT_N_BOOT,
    )
    from tl_transplant.evaluation.evaluator import (
        EvalResult as EvalResult,
    )
    from tl_transplant.evaluation.evaluator import (
        Retention as Retention,
    )
    from tl_transplant.evaluation.evaluator import (
        TransplantMetrics as TransplantMetrics,
    )
    from tl_transplant.evaluation.evaluator import (
        TransplantReport as TransplantReport,
    )
    from tl_transplant.evaluation.evaluator import (
        UndefinedMetricWarning as UndefinedMetricWarning,
    )
    from tl_transplant.evaluation.evaluator import (
        bootstrap_means as bootstrap_means,
    )
    from tl_transplant.evaluation.evaluator import (
        evaluate as evaluate,
    )
    from tl_transplant.evaluation.evaluator import (
        evaluate_transplant as evaluate_transplant,
    )
    from tl_transplant.evaluation.evaluator import (
        recovery as recovery,
    )
    from tl_transplant.evaluation.evaluator import (
        reference_top1 as reference_top1,
    )
    from tl_transplant.evaluation.evaluator import (
        retention as retention,
    )
    from tl_transplant.evaluation.evaluator import (
        tir as tir,
    )
    from tl_transplant.evaluation.evaluator import (
        transplant_metrics as transplant_metrics,
    )
    from tl_transplant.evaluation.generation import (
        generate_texts as generate_texts,
    )
    from tl_transplant.evaluation.generation import (
        generation_config as generation_config,
    )
    from tl_transplant.evaluation.generic import (
        MAX_UNKNOWN_FRACTION as MAX_UNKNOWN_FRACTION,
    )
    from tl_transplant.evaluation.generic import (
        METRIC as METRIC,
    )
    from tl_transplant.evaluation.generic import (
        NAME as NAME,
    )
    from tl_transplant.evaluation.generic import (
        TEXT_PATH as TEXT_PATH,
    )
    from tl_transplant.evaluation.generic import (
        general_text as general_text,
    )
    from tl_transplant.evaluation.generic import (
        generic_retention as generic_retention,
    )
    from tl_transplant.evaluation.generic import (
        text_chunks as text_chunks,
    )
    from tl_transplant.evaluation.generic import (
        unknown_fraction as unknown_fraction,
    )
    from tl_transplant.evaluation.runner import (
        EvalModel as EvalModel,
    )
    from tl_transplant.evaluation.runner import (
        Intervention as Intervention,
    )
    from tl_transplant.evaluation.runner import (
        Runner as Runner,
    )
    from tl_transplant.evaluation.runner import (
        resolve_model as resolve_model,
    )
    from tl_transplant.evaluation.stats import (
        ACCURACY_METRICS as ACCURACY_METRICS,
    )
    from tl_transplant.evaluation.stats import (
        paired_diff_ci as paired_diff_ci,
    )
    from tl_transplant.evaluation.stats import (
        paired_metrics as paired_metrics,
    )
    from tl_transplant.evaluation.stats import (
        percentile_ci as percentile_ci,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
