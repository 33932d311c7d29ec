"""Tasks: the ``Task`` model, its loaders and built-in generators (``task``) and the
tokenization rule shared by scoring and evaluation (``tokens``).

``tl_transplant.tasks`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ACCURACY_METRICS": "task",
    "METRICS": "task",
    "AGREEMENT_ATOL": "task",
    "reference_answer": "task",
    "parse_reference": "task",
    "extract_strip": "task",
    "extract_first_word": "task",
    "extract_first_line": "task",
    "extract_last_number": "task",
    "normalize_answer": "task",
    "extract_boxed": "task",
    "EXTRACTORS": "task",
    "NORMALIZED_EXTRACTORS": "task",
    "resolve_extract": "task",
    "Task": "task",
    "DEFAULT_WORDS": "task",
    "list_builtin_tasks": "task",
    "builtin_task": "task",
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
}

if TYPE_CHECKING:
    from tl_transplant.tasks.task import (
        ACCURACY_METRICS as ACCURACY_METRICS,
    )
    from tl_transplant.tasks.task import (
        AGREEMENT_ATOL as AGREEMENT_ATOL,
    )
    from tl_transplant.tasks.task import (
        DEFAULT_WORDS as DEFAULT_WORDS,
    )
    from tl_transplant.tasks.task import (
        EXTRACTORS as EXTRACTORS,
    )
    from tl_transplant.tasks.task import (
        METRICS as METRICS,
    )
    from tl_transplant.tasks.task import (
        NORMALIZED_EXTRACTORS as NORMALIZED_EXTRACTORS,
    )
    from tl_transplant.tasks.task import (
        Task as Task,
    )
    from tl_transplant.tasks.task import (
        builtin_task as builtin_task,
    )
    from tl_transplant.tasks.task import (
        extract_boxed as extract_boxed,
    )
    from tl_transplant.tasks.task import (
        extract_first_line as extract_first_line,
    )
    from tl_transplant.tasks.task import (
        extract_first_word as extract_first_word,
    )
    from tl_transplant.tasks.task import (
        extract_last_number as extract_last_number,
    )
    from tl_transplant.tasks.task import (
        extract_strip as extract_strip,
    )
    from tl_transplant.tasks.task import (
        list_builtin_tasks as list_builtin_tasks,
    )
    from tl_transplant.tasks.task import (
        normalize_answer as normalize_answer,
    )
    from tl_transplant.tasks.task import (
        parse_reference as parse_reference,
    )
    from tl_transplant.tasks.task import (
        reference_answer as reference_answer,
    )
    from tl_transplant.tasks.task import (
        resolve_extract as resolve_extract,
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
