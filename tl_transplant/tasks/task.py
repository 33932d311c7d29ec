"""The Task model: prompts, answers and a metric name, with its checks and derived tasks.

This module holds the :class:`Task` dataclass (fields, validation, ``split``/``subset``,
records, context checks). Where tasks come from is :mod:`tl_transplant.tasks.sources`
(``Task.from_records``/``Task.from_dataset``), the built-in synthetic tasks are
:mod:`tl_transplant.tasks.builtin`, answer extraction for ``exact_match`` is
:mod:`tl_transplant.tasks.extract`, and what a metric *is* (its encoding, scoring,
needed fields) is :mod:`tl_transplant.tasks.metrics` (the registry: add one there).

Contract used by scoring and evaluation (extend, don't break):

* ``Task.prompts`` / ``Task.answers``: parallel lists of strings;
* ``Task.metric``: ``next_token_acc`` | ``answer_logprob`` | ``logit_diff`` | ``exact_match``
  | ``mc_logprob`` | ``next_token_agreement``, or any registered metric
  (:func:`tl_transplant.tasks.metrics.register_metric`);
* ``Task.choices``: for ``mc_logprob``, one list of option strings per example; the
  answer is then the correct option's text (an integer answer field is its index);
* ``Task.prepend_bos``: ``"auto"`` | True | False, resolved per pair by
  :func:`tl_transplant.tasks.tokens.resolve_prepend_bos`;
* ``Task.encode(tokenizer, prepend_bos)`` -> :class:`tl_transplant.tasks.tokens.Encoded`.

Metrics (per example; the task score is their mean, higher is better):

* ``next_token_acc``: 1.0 if the argmax at the last prompt position is the
  first answer token, else 0.0;
* ``answer_logprob``: sum over answer tokens of ``log p(token | prefix)``,
  teacher-forced;
* ``logit_diff``: logit of the first answer token minus the mean logit of the
  first tokens of ``wrong_answers`` (one list per example), at the last prompt
  position;
* ``exact_match``: greedy generation (KV cache unless hooked, at most ``max_new_tokens``,
  stops at EOS), decoded without special tokens, passed through ``extract``
  (default: strip whitespace) and compared to ``answer.strip()``; with
  ``extract="boxed"`` or ``"last_number"`` both sides are normalised first
  (:func:`~tl_transplant.tasks.extract.normalize_answer`, see :meth:`Task.matches`);
* ``mc_logprob``: 1.0 if the correct choice has the strictly highest *total*
  (not length-normalised) teacher-forced log-prob among the example's choices,
  each choice tokenized on its own after the prompt exactly as ``answer_logprob``
  tokenizes an answer (:func:`tl_transplant.tasks.tokens.encode_choices`); ties score 0;
* ``next_token_agreement``: the fraction of the prompt's predicted positions (every
  prompt token, BOS excluded) where the model's top-1 next token is the *reference*
  token stored in the answer (space-separated token ids,
  :func:`~tl_transplant.tasks.metrics.reference_answer`),
  teacher-forced on the prompt; a position agrees when the reference token's logit is
  within float noise of the maximum (:data:`~tl_transplant.tasks.metrics.AGREEMENT_ATOL`
  plus a dtype-relative term), so the model the references came from scores exactly 1.0. Built by
  :func:`tl_transplant.evaluation.generic.generic_retention` from the unedited target.

Tokenization and BOS (one rule for both models of a pair): the prompt and the
answer are tokenized *separately* without special tokens and concatenated;
BOS is prepended iff ``prepend_bos`` resolves to True. ``"auto"`` follows the
hooked model (``bridge.cfg.default_prepend_bos``: True for GPT-2, Llama,
Gemma, Phi-3; False for GPT-NeoX, Qwen2, Phi), resolved on the *target* so
that source and target see identical token ids; ``True``/``False`` force it.
Generation starts from exactly the same ``[BOS] prompt`` ids. Because answers
are tokenized on their own, BPE vocabularies usually want the answer's leading
space in the answer (``" Paris"``), which is what the built-in tasks do.
The resolved value is recorded in every result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.errors import TaskError
from tl_transplant.tasks import sources
from tl_transplant.tasks.extract import (
    NORMALIZED_EXTRACTORS,
    extract_name,
    normalize_answer,
    resolve_extract,
)
from tl_transplant.tasks.metrics import available_metrics, get_metric
from tl_transplant.tasks.tokens import (
    ChoiceBatch,
    Encoded,
    PrependBos,
    check_context,
    context_limit,
    encode,
    encode_choices,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def shared_prompts(dev: Task, test: Task) -> list[str]:
    """The prompts found in both ``dev`` and ``test`` (in test's order, each once)."""
    seen = set(dev.prompts)
    return list(dict.fromkeys(p for p in test.prompts if p in seen))


def warn_shared_prompts(dev: Task, test: Task, stacklevel: int = 2) -> list[str]:
    """Warn once when a prompt is in both dev and test (a duplicated row of the task file,
    or files that overlap): the test score is then partly on examples the choice saw."""
    shared = shared_prompts(dev, test)
    if shared:
        warnings.warn(
            f"task {dev.name!r}: {len(shared)} prompt(s) appear in both dev and test (e.g. "
            f"{shared[0]!r:.60}); the test score is then partly on examples K and alpha were "
            "chosen on. Remove the duplicated rows from the task file(s).",
            UserWarning, stacklevel=stacklevel + 1,
        )
    return shared


@dataclass
class Task:
    """A named set of (prompt, answer) examples with a metric (see the module docstring)."""

    name: str
    prompts: list[str]
    answers: list[str]
    metric: str = "next_token_acc"
    wrong_answers: list[list[str]] | None = None
    max_new_tokens: int = 16
    extract: Callable[[str], str] | str | None = None
    prepend_bos: PrependBos = "auto"
    meta: dict[str, Any] = field(default_factory=dict)
    choices: list[list[str]] | None = None

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        self.answers = list(self.answers)
        if len(self.prompts) != len(self.answers):
            raise TaskError(
                f"task {self.name!r}: {len(self.prompts)} prompts but {len(self.answers)} answers"
            )
        if not isinstance(self.metric, str) or self.metric not in available_metrics():
            raise TaskError(
                f"task {self.name!r}: unknown metric {self.metric!r}; valid: "
                f"{', '.join(available_metrics())}"
            )
        metric = get_metric(self.metric)  # loads an installed plugin; failing, says which
        for i, (p, a) in enumerate(zip(self.prompts, self.answers)):
            where = f"task {self.name!r}: example {i}"
            if not isinstance(p, str) or not p.strip():
                raise TaskError(f"{where}: prompt must be a non-empty string, got {p!r:.80}")
            if not isinstance(a, str) or not a.strip():
                raise TaskError(f"{where}: answer must be a non-empty string, got {a!r:.80}")
        if self.wrong_answers is not None:
            self.wrong_answers = [
                [w] if isinstance(w, str) else list(w) for w in self.wrong_answers
            ]
            if len(self.wrong_answers) != len(self.prompts):
                raise TaskError(
                    f"task {self.name!r}: {len(self.prompts)} prompts but "
                    f"{len(self.wrong_answers)} wrong-answer lists"
                )
            for i, ws in enumerate(self.wrong_answers):
                if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                    raise TaskError(
                        f"task {self.name!r}: example {i}: wrong_answers must be a non-empty "
                        f"list of non-empty strings, got {ws!r:.80}"
                    )
        if self.choices is not None:
            self.choices = [list(c) for c in self.choices]
            if len(self.choices) != len(self.prompts):
                raise TaskError(
                    f"task {self.name!r}: {len(self.prompts)} prompts but "
                    f"{len(self.choices)} choice lists"
                )
            for i, (cs, a) in enumerate(zip(self.choices, self.answers)):
                where = f"task {self.name!r}: {self.row_label(i)}"
                if len(cs) < 2 or not all(isinstance(c, str) and c.strip() for c in cs):
                    raise TaskError(
                        f"{where}: choices must be a list of 2+ non-empty strings, got {cs!r:.80}"
                    )
                if a not in cs:
                    raise TaskError(
                        f"{where}: the answer {a!r:.40} is not one of its choices {cs!r:.80}"
                    )
                dup = sorted({c for c in cs if cs.count(c) > 1})
                if dup:  # the correct choice would tie with its copy: no model is ever right
                    raise TaskError(
                        f"{where}: choice(s) {', '.join(repr(c)[:40] for c in dup)} appear more "
                        "than once; every choice must be different (a duplicated choice ties "
                        "with itself, so mc_logprob scores it wrong for every model). Remove "
                        "the duplicates."
                    )
        for needed in metric.needs:
            if getattr(self, needed) is None:
                raise TaskError(
                    f"task {self.name!r}: metric {self.metric!r} needs {needed}, one list per "
                    "example"
                )
        metric.check_task(self)
        if (not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool)
                or self.max_new_tokens < 1):
            raise TaskError(
                f"task {self.name!r}: max_new_tokens must be a positive int, got "
                f"{self.max_new_tokens!r}"
            )
        if not (self.prepend_bos == "auto" or isinstance(self.prepend_bos, bool)):
            raise TaskError(
                f"task {self.name!r}: prepend_bos must be 'auto', True or False, got "
                f"{self.prepend_bos!r}"
            )
        resolve_extract(self.extract)  # validate early

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, n={len(self)}, metric={self.metric}, "
            f"prepend_bos={self.prepend_bos!r})"
        )

    @property
    def extract_fn(self) -> Callable[[str], str]:
        """The answer-extraction function used by ``exact_match``."""
        return resolve_extract(self.extract)

    def matches(self, pred: str, answer: str) -> bool:
        """Whether an extracted prediction counts as ``answer`` under ``exact_match``.

        With ``extract`` ``boxed``/``last_number`` both sides go through
        :func:`normalize_answer` (``"$1,000"`` == ``"1000"``, ``"\\dfrac12"`` spellings);
        otherwise ``pred == answer.strip()`` as before.
        """
        if isinstance(self.extract, str) and self.extract in NORMALIZED_EXTRACTORS:
            return normalize_answer(pred) == normalize_answer(answer)
        return pred == answer.strip()

    @property
    def correct_choice(self) -> list[int]:
        """For ``mc_logprob``: the index of the correct choice of each example."""
        if self.choices is None:
            raise TaskError(f"task {self.name!r} has no choices")
        return [cs.index(a) for cs, a in zip(self.choices, self.answers)]

    def row_label(self, i: int) -> str:
        """Where example ``i`` came from: ``"example 3 (line 5)"`` for files, else ``"example 3"``.
        """
        labels = self.meta.get("row_labels")
        root = self.meta.get("indices")
        j = root[i] if root is not None else i
        if labels is not None and 0 <= j < len(labels):
            return f"example {i} ({labels[j]})"
        return f"example {i}"

    def encode(self, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Encoded:
        """Teacher-forced batch of ``[BOS] prompt answer`` for all examples."""
        return encode(tokenizer, self.prompts, self.answers, prepend_bos=prepend_bos)

    def encode_choices(self, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> ChoiceBatch:
        """For ``mc_logprob``: one ``[BOS] prompt choice`` row per (example, choice)."""
        if self.choices is None:
            raise TaskError(f"task {self.name!r} has no choices")
        return encode_choices(tokenizer, self.prompts, self.choices, prepend_bos=prepend_bos)

    def check_context(
        self, enc: Encoded | ChoiceBatch, limit: int | None, extra: int = 0
    ) -> None:
        """Raise naming the example and its source row if any row exceeds ``limit`` tokens.

        ``enc``: this task's :meth:`encode` or :meth:`encode_choices`; ``extra``: tokens
        still to come (``max_new_tokens`` for generation). ``limit`` is
        :func:`tl_transplant.tasks.tokens.context_limit` of the model's config.
        """
        if isinstance(enc, ChoiceBatch):
            check_context(enc.enc, limit, self.name, label=self.row_label, extra=extra,
                          rows=enc.example.tolist())
        else:
            check_context(enc, limit, self.name, label=self.row_label, extra=extra)

    def check_fits(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prepend_bos: bool,
        hf_config: PretrainedConfig | dict | None,
    ) -> None:
        """Raise before any forward if an example is longer than the model's context.

        Encodes as the metric will (:meth:`Metric.context_batch
        <tl_transplant.tasks.metrics.Metric.context_batch>`: choices for ``mc_logprob``; the
        prompt plus ``max_new_tokens`` for ``exact_match``; prompt + answer by default) and
        checks against :func:`~tl_transplant.tasks.tokens.context_limit` of ``hf_config`` (no
        limit declared: nothing to check). The error names the task, example, source line
        and the limit.
        """
        limit = context_limit(hf_config)
        if limit is None:
            return
        enc, extra = get_metric(self.metric).context_batch(self, tokenizer, prepend_bos)
        self.check_context(enc, limit, extra=extra)

    # ---- derived tasks ----------------------------------------------------------------
    def replace(self, **changes: Any) -> Task:
        """A copy with some fields changed (e.g. ``task.replace(metric="exact_match")``)."""
        kw: dict[str, Any] = dict(
            name=self.name,
            prompts=list(self.prompts),
            answers=list(self.answers),
            metric=self.metric,
            wrong_answers=None
            if self.wrong_answers is None
            else [list(w) for w in self.wrong_answers],
            max_new_tokens=self.max_new_tokens,
            extract=self.extract,
            prepend_bos=self.prepend_bos,
            meta=dict(self.meta),
            choices=None if self.choices is None else [list(c) for c in self.choices],
        )
        kw.update(changes)
        return Task(**kw)

    def subset(self, indices: Sequence[int], name: str | None = None) -> Task:
        """The examples at ``indices``, in order; ``meta["indices"]`` maps back to the root."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < len(self):
                raise IndexError(f"task {self.name!r}: index {i} out of range for {len(self)}")
        root = self.meta.get("indices")
        meta = dict(self.meta)
        meta["indices"] = [root[i] for i in idx] if root is not None else idx
        return self.replace(
            name=name or self.name,
            prompts=[self.prompts[i] for i in idx],
            answers=[self.answers[i] for i in idx],
            wrong_answers=None
            if self.wrong_answers is None
            else [list(self.wrong_answers[i]) for i in idx],
            choices=None if self.choices is None else [list(self.choices[i]) for i in idx],
            meta=meta,
        )

    def split(self, dev_fraction: float = 0.5, seed: int = 0) -> tuple[Task, Task]:
        """Shuffle indices with ``seed`` and cut into ``(dev, test)``.

        The split depends only on ``len(self)``, ``dev_fraction`` and ``seed``, never on
        the answers, so the same examples land in the same part whatever their labels.
        ``round(n * dev_fraction)`` examples go to dev, clipped so both parts are non-empty.
        """
        n = len(self)
        if not 0.0 < dev_fraction < 1.0:
            raise TaskError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
        if n < 2:
            raise TaskError(f"task {self.name!r} has {n} example(s); a dev/test split needs 2+")
        n_dev = min(max(int(round(n * dev_fraction)), 1), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        dev_idx, test_idx = sorted(perm[:n_dev].tolist()), sorted(perm[n_dev:].tolist())
        info = {"seed": seed, "dev_fraction": dev_fraction, "parent": self.name}
        dev = self.subset(dev_idx, name=f"{self.name}:dev")
        test = self.subset(test_idx, name=f"{self.name}:test")
        dev.meta["split"] = {**info, "part": "dev"}
        test.meta["split"] = {**info, "part": "test"}
        warn_shared_prompts(dev, test, stacklevel=3)
        return dev, test

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per example (``prompt``, ``answer`` and ``wrong_answers`` if any)."""
        out = []
        for i, (p, a) in enumerate(zip(self.prompts, self.answers)):
            rec: dict[str, Any] = {"prompt": p, "answer": a}
            if self.wrong_answers is not None:
                rec["wrong_answers"] = list(self.wrong_answers[i])
            if self.choices is not None:
                rec["choices"] = list(self.choices[i])
            out.append(rec)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (no examples)."""
        meta = {k: v for k, v in self.meta.items() if k not in ("indices", "row_labels")}
        return {
            "name": self.name,
            "n": len(self),
            "metric": self.metric,
            "prepend_bos": self.prepend_bos,
            "max_new_tokens": self.max_new_tokens,
            "extract": extract_name(self.extract),
            "meta": meta,
        }


    # ---- constructors (tl_transplant.tasks.sources) -------------------------------------
    from_records = classmethod(sources.from_records)
    from_dataset = classmethod(sources.from_dataset)


__all__ = ["Task", "shared_prompts", "warn_shared_prompts"]
