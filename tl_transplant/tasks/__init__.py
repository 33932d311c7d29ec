"""Tasks: the ``Task`` model (``task``), where tasks come from (``sources``), the built-in
synthetic tasks (``builtin``), answer extraction (``extract``), the metric registry
(``metrics``: one object per metric, read by evaluation, statistics, config and scorers)
and the tokenization rule shared by scoring and evaluation (``tokens``).

``tl_transplant.tasks`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Task": "task",
    "ACCURACY_METRICS": "metrics",
    "METRICS": "metrics",
    "AGREEMENT_ATOL": "metrics",
    "METRIC_REGISTRY": "metrics",
    "Metric": "metrics",
    "LogitMetric": "metrics",
    "GenerationMetric": "metrics",
    "MetricError": "metrics",
    "Rows": "metrics",
    "Batch": "metrics",
    "register_metric": "metrics",
    "get_metric": "metrics",
    "available_metrics": "metrics",
    "is_accuracy": "metrics",
    "reference_answer": "metrics",
    "parse_reference": "metrics",
    "extract_strip": "extract",
    "extract_first_word": "extract",
    "extract_first_line": "extract",
    "extract_last_number": "extract",
    "normalize_answer": "extract",
    "extract_boxed": "extract",
    "EXTRACTORS": "extract",
    "NORMALIZED_EXTRACTORS": "extract",
    "resolve_extract": "extract",
    "FORMATS": "sources",
    "DEFAULT_WORDS": "builtin",
    "list_builtin_tasks": "builtin",
    "builtin_task": "builtin",
    "PrependBos": "tokens",
    "resolve_prepend_bos": "tokens",
    "Encoded": "tokens",
    "encode": "tokens",
    "answer_logprobs": "tokens",
    "last_prompt_logits": "tokens",
    "first_answer_token": "tokens",
    "context_limit": "tokens",
    "check_context": "tokens",
    "ChoiceBatch": "tokens",
    "encode_choices": "tokens",
    "choice_logprobs": "tokens",
    "mc_scores": "tokens",
    "run_batches": "tokens",
}

if TYPE_CHECKING:
    from tl_transplant.tasks.builtin import (
        DEFAULT_WORDS as DEFAULT_WORDS,
    )
    from tl_transplant.tasks.builtin import (
        builtin_task as builtin_task,
    )
    from tl_transplant.tasks.builtin import (
        list_builtin_tasks as list_builtin_tasks,
    )
    from tl_transplant.tasks.extract import (
        EXTRACTORS as EXTRACTORS,
    )
    from tl_transplant.tasks.extract import (
        NORMALIZED_EXTRACTORS as NORMALIZED_EXTRACTORS,
    )
    from tl_transplant.tasks.extract import (
        extract_boxed as extract_boxed,
    )
    from tl_transplant.tasks.extract import (
        extract_first_line as extract_first_line,
    )
    from tl_transplant.tasks.extract import (
        extract_first_word as extract_first_word,
    )
    from tl_transplant.tasks.extract import (
        extract_last_number as extract_last_number,
    )
    from tl_transplant.tasks.extract import (
        extract_strip as extract_strip,
    )
    from tl_transplant.tasks.extract import (
        normalize_answer as normalize_answer,
    )
    from tl_transplant.tasks.extract import (
        resolve_extract as resolve_extract,
    )
    from tl_transplant.tasks.metrics import (
        ACCURACY_METRICS as ACCURACY_METRICS,
    )
    from tl_transplant.tasks.metrics import (
        AGREEMENT_ATOL as AGREEMENT_ATOL,
    )
    from tl_transplant.tasks.metrics import (
        METRIC_REGISTRY as METRIC_REGISTRY,
    )
    from tl_transplant.tasks.metrics import (
        METRICS as METRICS,
    )
    from tl_transplant.tasks.metrics import (
        Batch as Batch,
    )
    from tl_transplant.tasks.metrics import (
        GenerationMetric as GenerationMetric,
    )
    from tl_transplant.tasks.metrics import (
        LogitMetric as LogitMetric,
    )
    from tl_transplant.tasks.metrics import (
        Metric as Metric,
    )
    from tl_transplant.tasks.metrics import (
        MetricError as MetricError,
    )
    from tl_transplant.tasks.metrics import (
        Rows as Rows,
    )
    from tl_transplant.tasks.metrics import (
        available_metrics as available_metrics,
    )
    from tl_transplant.tasks.metrics import (
        get_metric as get_metric,
    )
    from tl_transplant.tasks.metrics import (
        is_accuracy as is_accuracy,
    )
    from tl_transplant.tasks.metrics import (
        parse_reference as parse_reference,
    )
    from tl_transplant.tasks.metrics import (
        reference_answer as reference_answer,
    )
    from tl_transplant.tasks.metrics import (
        register_metric as register_metric,
    )
    from tl_transplant.tasks.sources import (
        FORMATS as FORMATS,
    )
    from tl_transplant.tasks.task import (
        Task as Task,
    )
    from tl_transplant.tasks.tokens import (
        ChoiceBatch as ChoiceBatch,
    )
    from tl_transplant.tasks.tokens import (
        Encoded as Encoded,
    )
    from tl_transplant.tasks.tokens import (
        PrependBos as PrependBos,
    )
    from tl_transplant.tasks.tokens import (
        answer_logprobs as answer_logprobs,
    )
    from tl_transplant.tasks.tokens import (
        check_context as check_context,
    )
    from tl_transplant.tasks.tokens import (
        choice_logprobs as choice_logprobs,
    )
    from tl_transplant.tasks.tokens import (
        context_limit as context_limit,
    )
    from tl_transplant.tasks.tokens import (
        encode as encode,
    )
    from tl_transplant.tasks.tokens import (
        encode_choices as encode_choices,
    )
    from tl_transplant.tasks.tokens import (
        first_answer_token as first_answer_token,
    )
    from tl_transplant.tasks.tokens import (
        last_prompt_logits as last_prompt_logits,
    )
    from tl_transplant.tasks.tokens import (
        mc_scores as mc_scores,
    )
    from tl_transplant.tasks.tokens import (
        resolve_prepend_bos as resolve_prepend_bos,
    )
    from tl_transplant.tasks.tokens import (
        run_batches as run_batches,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
