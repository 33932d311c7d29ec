"""Tasks: prompts, answers and a metric.

Contract used by scoring and evaluation (extend, don't break):

* ``Task.prompts`` / ``Task.answers``: parallel lists of strings;
* ``Task.metric``: ``next_token_acc`` | ``answer_logprob`` | ``logit_diff`` | ``exact_match``;
* ``Task.prepend_bos``: ``"auto"`` | True | False, resolved per pair by
  :func:`tl_transplant.tokens.resolve_prepend_bos`;
* ``Task.encode(tokenizer, prepend_bos)`` -> :class:`tl_transplant.tokens.Encoded`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tl_transplant.tokens import Encoded, PrependBos, encode

METRICS = ("next_token_acc", "answer_logprob", "logit_diff", "exact_match")


@dataclass
class Task:
    """A named set of (prompt, answer) examples with a metric."""

    name: str
    prompts: list[str]
    answers: list[str]
    metric: str = "next_token_acc"
    wrong_answers: list[list[str]] | None = None
    max_new_tokens: int = 16
    extract: Callable[[str], str] | None = None
    prepend_bos: PrependBos = "auto"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.answers):
            raise ValueError(
                f"task {self.name!r}: {len(self.prompts)} prompts but {len(self.answers)} answers"
            )
        if self.metric not in METRICS:
            raise ValueError(
                f"task {self.name!r}: unknown metric {self.metric!r}; valid: {', '.join(METRICS)}"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def encode(self, tokenizer: Any, prepend_bos: bool) -> Encoded:
        """Teacher-forced batch of ``[BOS] prompt answer`` for all examples."""
        return encode(tokenizer, self.prompts, self.answers, prepend_bos=prepend_bos)
