"""Tasks: prompts, answers and a metric.

Contract used by scoring and evaluation (extend, don't break):

* ``Task.prompts`` / ``Task.answers``: parallel lists of strings;
* ``Task.metric``: ``next_token_acc`` | ``answer_logprob`` | ``logit_diff`` | ``exact_match``
  | ``mc_logprob`` | ``next_token_agreement``;
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
  (:func:`normalize_answer`, see :meth:`Task.matches`);
* ``mc_logprob``: 1.0 if the correct choice has the strictly highest *total*
  (not length-normalised) teacher-forced log-prob among the example's choices,
  each choice tokenized on its own after the prompt exactly as ``answer_logprob``
  tokenizes an answer (:func:`tl_transplant.tasks.tokens.encode_choices`); ties score 0;
* ``next_token_agreement``: the fraction of the prompt's predicted positions (every
  prompt token, BOS excluded) where the model's top-1 next token is the *reference*
  token stored in the answer (space-separated token ids, :func:`reference_answer`),
  teacher-forced on the prompt; a position agrees when the reference token's logit is
  within float noise of the maximum (:data:`AGREEMENT_ATOL` plus a dtype-relative
  term), so the model the references came from scores exactly 1.0. Built by
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

import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.evaluation.stats import ACCURACY_METRICS as ACCURACY_METRICS  # re-exported
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
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

METRICS = (
    "next_token_acc",
    "answer_logprob",
    "logit_diff",
    "exact_match",
    "next_token_agreement",
    "mc_logprob",
)

#: ``next_token_agreement``: logit slack under which the reference token still counts as
#: the top-1 (ties and batch-shape float noise must not read as a change of behaviour).
AGREEMENT_ATOL = 1e-3


def reference_answer(token_ids: Sequence[int]) -> str:
    """The answer string of a ``next_token_agreement`` example: its reference token ids."""
    ids = [int(t) for t in token_ids]
    if not ids or any(t < 0 for t in ids):
        raise ValueError(f"reference token ids must be a non-empty list of ids >= 0, got {ids}")
    return " ".join(map(str, ids))


def parse_reference(answer: str, where: str = "answer") -> list[int]:
    """The reference token ids of a ``next_token_agreement`` answer (inverse of
    :func:`reference_answer`); anything else raises naming ``where``."""
    parts = answer.split()
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"{where}: metric 'next_token_agreement' needs the answer to be the reference "
            f"token ids separated by spaces (build the task with "
            f"tl_transplant.evaluation.generic.generic_retention), got {answer!r:.80}"
        )
    return [int(p) for p in parts]


# ---- answer extraction (exact_match) -------------------------------------------------


def extract_strip(text: str) -> str:
    """The generation with surrounding whitespace removed (the default)."""
    return text.strip()


def extract_first_word(text: str) -> str:
    """The first whitespace-separated word of the generation ('' if none)."""
    parts = text.split()
    return parts[0] if parts else ""


def extract_first_line(text: str) -> str:
    """The first non-empty line of the generation, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# Thousands groups only (1,000 / 12,345,678), so "1,2" stays two numbers; "-.5" is -0.5.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str:
    """The last number in the generation, thousands separators removed ('' if none).

    ``"costs $1,000."`` -> ``"1000"``, ``"-3.5 degrees"`` -> ``"-3.5"``, ``"$5"`` -> ``"5"``.
    """
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else ""


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # an escaped brace does not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
            i += 1
    return None  # no complete box (e.g. generation cut off by max_new_tokens)


def normalize_answer(text: str) -> str:
    """Canonical form for comparing math answers (used with ``boxed``/``last_number``).

    Removes all whitespace, surrounding ``$``/``\\$`` (money or inline math), ``\\!`` and
    ``\\,`` spacing, ``\\left``/``\\right``, a trailing ``.``, thousands commas in a
    plain number, and a redundant outer ``{...}``; ``\\dfrac``/``\\tfrac`` become
    ``\\frac``. Nothing mathematical (no ``0.5 == 1/2``): only spelling differences.
    """
    t = re.sub(r"\s+", "", text)
    t = re.sub(r"\\[!,;:]", "", t).replace("\\$", "$")
    t = t.replace("\\left", "").replace("\\right", "")
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    prev = None
    while prev != t:
        prev = t
        t = t.strip("$").rstrip(".")
        if t.startswith("{") and t.endswith("}") and _last_boxed("\\boxed" + t) == t[1:-1]:
            t = t[1:-1]
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
        t = t.replace(",", "")
    return t


def extract_boxed(text: str) -> str:
    """The last ``\\boxed{...}`` content (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``),
    else the last number, normalised by :func:`normalize_answer` ('' if neither)."""
    boxed = _last_boxed(text)
    return normalize_answer(boxed if boxed is not None else extract_last_number(text))


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "strip": extract_strip,
    "first_word": extract_first_word,
    "first_line": extract_first_line,
    "last_number": extract_last_number,
    "boxed": extract_boxed,
}

#: Extractors whose comparisons normalise both sides with :func:`normalize_answer`.
NORMALIZED_EXTRACTORS = ("boxed", "last_number")


def resolve_extract(extract: Callable[[str], str] | str | None) -> Callable[[str], str]:
    """A callable, or a named extractor: strip, first_word, first_line, last_number, boxed."""
    if extract is None:
        return extract_strip
    if isinstance(extract, str):
        if extract not in EXTRACTORS:
            raise ValueError(
                f"unknown extract {extract!r}; use a callable or one of: {', '.join(EXTRACTORS)}"
            )
        return EXTRACTORS[extract]
    if not callable(extract):
        raise ValueError(f"extract must be a callable or a name, got {type(extract).__name__}")
    return extract


def _extract_name(extract: Callable[[str], str] | str | None) -> str:
    if extract is None:
        return "strip"
    if isinstance(extract, str):
        return extract
    return getattr(extract, "__name__", type(extract).__name__)


# ---- record validation ---------------------------------------------------------------


def _as_text(value: Any, where: str, field_name: str) -> str:
    """A string field of a record; numbers are accepted and converted, anything else is an error."""
    if value is None:
        raise ValueError(f"{where}: field {field_name!r} is missing or null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise ValueError(
            f"{where}: field {field_name!r} must be a string, got {type(value).__name__}: "
            f"{value!r:.80}"
        )
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise ValueError(f"{where}: field {field_name!r} is empty")
    return text


def _choice_answer(
    rec: Mapping[str, Any], where: str, answer_field: str, choices_field: str
) -> tuple[list[str], str]:
    """(choices, correct choice text) of one ``mc_logprob`` record; an int answer is an index."""
    if choices_field not in rec:
        raise ValueError(
            f"{where}: no field {choices_field!r} (fields: {', '.join(map(str, rec)) or 'none'}); "
            "metric 'mc_logprob' needs a list of choices per example"
        )
    raw = rec[choices_field]
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) < 2:
        raise ValueError(
            f"{where}: field {choices_field!r} must be a list of 2+ strings, got {raw!r:.80}"
        )
    cs = [_as_text(c, where, f"{choices_field}[{j}]") for j, c in enumerate(raw)]
    a = rec[answer_field]
    if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
        if not 0 <= int(a) < len(cs):
            raise ValueError(
                f"{where}: answer index {int(a)} is out of range for {len(cs)} choices"
            )
        return cs, cs[int(a)]
    text = _as_text(a, where, answer_field)
    if text not in cs:
        raise ValueError(
            f"{where}: answer {text!r:.40} is neither one of the choices {cs!r:.80} nor an "
            "integer index into them"
        )
    return cs, text


def _as_text_list(value: Any, where: str, field_name: str) -> list[str]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [_as_text(value, where, field_name)]
    if value is None:
        raise ValueError(f"{where}: field {field_name!r} is missing or null")
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{where}: field {field_name!r} must be a string or a list of strings, got "
            f"{type(value).__name__}"
        )
    if not value:
        raise ValueError(f"{where}: field {field_name!r} is an empty list")
    return [_as_text(v, where, f"{field_name}[{j}]") for j, v in enumerate(value)]


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
            raise ValueError(
                f"task {self.name!r}: {len(self.prompts)} prompts but {len(self.answers)} answers"
            )
        if self.metric not in METRICS:
            raise ValueError(
                f"task {self.name!r}: unknown metric {self.metric!r}; valid: {', '.join(METRICS)}"
            )
        for i, (p, a) in enumerate(zip(self.prompts, self.answers)):
            where = f"task {self.name!r}: example {i}"
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{where}: prompt must be a non-empty string, got {p!r:.80}")
            if not isinstance(a, str) or not a.strip():
                raise ValueError(f"{where}: answer must be a non-empty string, got {a!r:.80}")
        if self.wrong_answers is not None:
            self.wrong_answers = [
                [w] if isinstance(w, str) else list(w) for w in self.wrong_answers
            ]
            if len(self.wrong_answers) != len(self.prompts):
                raise ValueError(
                    f"task {self.name!r}: {len(self.prompts)} prompts but "
                    f"{len(self.wrong_answers)} wrong-answer lists"
                )
            for i, ws in enumerate(self.wrong_answers):
                if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                    raise ValueError(
                        f"task {self.name!r}: example {i}: wrong_answers must be a non-empty "
                        f"list of non-empty strings, got {ws!r:.80}"
                    )
        if self.choices is not None:
            self.choices = [list(c) for c in self.choices]
            if len(self.choices) != len(self.prompts):
                raise ValueError(
                    f"task {self.name!r}: {len(self.prompts)} prompts but "
                    f"{len(self.choices)} choice lists"
                )
            for i, (cs, a) in enumerate(zip(self.choices, self.answers)):
                where = f"task {self.name!r}: {self.row_label(i)}"
                if len(cs) < 2 or not all(isinstance(c, str) and c.strip() for c in cs):
                    raise ValueError(
                        f"{where}: choices must be a list of 2+ non-empty strings, got {cs!r:.80}"
                    )
                if a not in cs:
                    raise ValueError(
                        f"{where}: the answer {a!r:.40} is not one of its choices {cs!r:.80}"
                    )
        if self.metric == "mc_logprob" and self.choices is None:
            raise ValueError(
                f"task {self.name!r}: metric 'mc_logprob' needs choices, one list per example"
            )
        if self.metric == "next_token_agreement":
            for i, a in enumerate(self.answers):
                parse_reference(a, f"task {self.name!r}: {self.row_label(i)}")
        if self.metric == "logit_diff" and self.wrong_answers is None:
            raise ValueError(
                f"task {self.name!r}: metric 'logit_diff' needs wrong_answers, one list per example"
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"task {self.name!r}: max_new_tokens must be a positive int, got "
                f"{self.max_new_tokens!r}"
            )
        if not (self.prepend_bos == "auto" or isinstance(self.prepend_bos, bool)):
            raise ValueError(
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
            raise ValueError(f"task {self.name!r} has no choices")
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
            raise ValueError(f"task {self.name!r} has no choices")
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

        Encodes as the metric will (choices for ``mc_logprob``; the prompt plus
        ``max_new_tokens`` for ``exact_match``; prompt + answer otherwise) and checks
        against :func:`~tl_transplant.tasks.tokens.context_limit` of ``hf_config`` (no limit
        declared: nothing to check). The error names the task, example, source line
        and the limit.
        """
        limit = context_limit(hf_config)
        if limit is None:
            return
        if self.metric == "mc_logprob":
            self.check_context(self.encode_choices(tokenizer, prepend_bos), limit)
        elif self.metric == "exact_match":
            enc = encode(tokenizer, self.prompts, None, prepend_bos=prepend_bos)
            self.check_context(enc, limit, extra=self.max_new_tokens)
        elif self.metric == "next_token_agreement":  # the answer holds ids, not text
            self.check_context(encode(tokenizer, self.prompts, None, prepend_bos=prepend_bos),
                               limit)
        else:
            self.check_context(self.encode(tokenizer, prepend_bos), limit)

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
            raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
        if n < 2:
            raise ValueError(f"task {self.name!r} has {n} example(s); a dev/test split needs 2+")
        n_dev = min(max(int(round(n * dev_fraction)), 1), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        dev_idx, test_idx = sorted(perm[:n_dev].tolist()), sorted(perm[n_dev:].tolist())
        info = {"seed": seed, "dev_fraction": dev_fraction, "parent": self.name}
        dev = self.subset(dev_idx, name=f"{self.name}:dev")
        test = self.subset(test_idx, name=f"{self.name}:test")
        dev.meta["split"] = {**info, "part": "dev"}
        test.meta["split"] = {**info, "part": "test"}
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
            "extract": _extract_name(self.extract),
            "meta": meta,
        }

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        *,
        name: str = "task",
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        wrong_field: str | None = "wrong_answers",
        choices_field: str = "choices",
        row_label: Callable[[int], str] | None = None,
        **kwargs: Any,
    ) -> Task:
        """Build a task from dicts; a malformed record raises naming its row and field.

        ``wrong_field`` is read when present (a string or a list of strings) and is
        required for ``metric="logit_diff"``. For ``metric="mc_logprob"`` each record
        needs ``choices_field`` (a list of strings) and its answer is the correct
        choice's text or, when the answer is an integer, its 0-based index. Numbers are
        accepted as text. Other keyword arguments go to :class:`Task` (``metric``,
        ``max_new_tokens``, ...). ``row_label`` (e.g. ``"line 7"``) is kept in
        ``meta["row_labels"]`` so later errors (:meth:`check_context`) name the source row.
        """
        label = row_label or (lambda i: f"record {i}")
        metric = kwargs.get("metric", "next_token_acc")
        prompts: list[str] = []
        answers: list[str] = []
        wrongs: list[list[str]] = []
        choices: list[list[str]] = []
        labels: list[str] = []
        any_wrong = False
        for i, rec in enumerate(records):
            where = f"task {name!r}: {label(i)}"
            if not isinstance(rec, Mapping):
                raise ValueError(f"{where}: expected a mapping of fields, got {type(rec).__name__}")
            for f in (prompt_field, answer_field):
                if f not in rec:
                    raise ValueError(
                        f"{where}: no field {f!r} (fields: {', '.join(map(str, rec)) or 'none'})"
                    )
            prompts.append(_as_text(rec[prompt_field], where, prompt_field))
            if metric == "mc_logprob":
                cs, a = _choice_answer(rec, where, answer_field, choices_field)
                choices.append(cs)
                answers.append(a)
            else:
                answers.append(_as_text(rec[answer_field], where, answer_field))
            labels.append(label(i))
            w = rec.get(wrong_field) if wrong_field else None
            if w is None:
                if metric == "logit_diff":
                    raise ValueError(
                        f"{where}: field {wrong_field!r} is missing or null; metric 'logit_diff' "
                        "needs wrong answers for every example"
                    )
                wrongs.append([])
            else:
                any_wrong = True
                wrongs.append(_as_text_list(w, where, str(wrong_field)))
        if not prompts:
            raise ValueError(f"task {name!r}: no records")
        # Wrong answers are kept only when every record has them (logit_diff requires that).
        wrong_answers = wrongs if any_wrong and all(wrongs) else None
        if row_label is not None:
            kwargs["meta"] = {**dict(kwargs.get("meta") or {}), "row_labels": labels}
        return cls(
            name=name,
            prompts=prompts,
            answers=answers,
            wrong_answers=wrong_answers,
            choices=choices if metric == "mc_logprob" else None,
            **kwargs,
        )

    @classmethod
    def from_dataset(
        cls,
        data: datasets.Dataset | datasets.DatasetDict | str | Path,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        *,
        split: str = "train",
        config_name: str | None = None,
        name: str | None = None,
        wrong_field: str | None = "wrong_answers",
        choices_field: str = "choices",
        limit: int | None = None,
        **kwargs: Any,
    ) -> Task:
        """Build a task from a ``datasets.Dataset``/``DatasetDict``, a local file or
        folder, or a hub dataset name.

        A string or path is resolved in this order:

        1. an existing file: by suffix, ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet``
           read with ``datasets.load_dataset`` (the single file is its ``"train"``
           split; slices such as ``"train[:50]"`` work). Errors name the JSONL line,
           or the row for other formats; a file that is not UTF-8 names its byte/line;
        2. an existing folder written by ``save_to_disk`` (``dataset_info.json`` +
           ``state.json``, or a ``DatasetDict``'s ``dataset_dict.json``): read with
           ``datasets.load_from_disk``; ``split`` picks a DatasetDict's split;
        3. any other existing folder (data files, or a hub repo laid out locally,
           e.g. ``data/test-00000-of-00001.parquet``): ``datasets.load_dataset(folder,
           config_name, split=split)``;
        4. otherwise a hub name (``HuggingFaceH4/MATH-500``):
           ``datasets.load_dataset(name, config_name, split=split)``, an error saying
           to download it first when that fails (offline, unknown name).

        ``config_name`` is ``load_dataset``'s second argument (a dataset's subset).
        ``limit`` keeps the first N rows.
        """
        import datasets

        label: Callable[[int], str] = lambda i: f"row {i}"  # noqa: E731
        source = "datasets"
        if isinstance(data, (str, Path)):
            path = Path(data).expanduser()
            source = str(data)
            if path.is_file():
                name = name or path.stem
                try:
                    ds, label = _load_local(path, split)
                except _JsonlLoadError as e:
                    # datasets could not build a table; our own per-line check names the culprit.
                    bad_lines = e.lines
                    cls.from_records(
                        e.records,
                        name=name,
                        prompt_field=prompt_field,
                        answer_field=answer_field,
                        wrong_field=wrong_field,
                        choices_field=choices_field,
                        row_label=lambda i: f"line {bad_lines[i]}",
                        **{k: v for k, v in kwargs.items() if k != "meta"},
                    )
                    raise ValueError(str(e)) from e.__cause__
            elif path.is_dir():
                name = name or path.name
                ds = _load_folder(path, split, config_name)
            elif path.suffix.lower() in _FORMATS or isinstance(data, Path) or path.is_absolute():
                raise FileNotFoundError(f"no such dataset file: {path}")
            else:
                name = name or str(data).rstrip("/").split("/")[-1]
                ds = _load_hub(str(data), split, config_name)
        elif isinstance(data, datasets.DatasetDict):
            ds = _pick_split(data, split, "dataset")
        elif isinstance(data, datasets.Dataset):
            ds = data
        else:
            raise TypeError(
                "from_dataset takes a datasets.Dataset/DatasetDict, a path to a local "
                ".jsonl/.json/.csv/.tsv/.parquet file or dataset folder, or a hub dataset name, "
                f"got {type(data).__name__}"
            )
        name = name or "dataset"
        cols = list(ds.column_names)
        for f in (prompt_field, answer_field):
            if f not in cols:
                raise ValueError(
                    f"task {name!r}: the dataset has no field {f!r} (fields: {', '.join(cols)})"
                )
        if wrong_field is not None and wrong_field not in cols:
            if kwargs.get("metric") == "logit_diff":
                raise ValueError(
                    f"task {name!r}: metric 'logit_diff' needs a wrong-answers field, but the "
                    f"dataset has no field {wrong_field!r} (fields: {', '.join(cols)})"
                )
            wrong_field = None
        if limit is not None:
            ds = ds.select(range(min(int(limit), len(ds))))
        meta = dict(kwargs.pop("meta", {}) or {})
        meta.setdefault("source", source)
        if isinstance(data, (str, Path)) and not Path(data).expanduser().is_file():
            meta.setdefault("split", split)
            if config_name is not None:
                meta.setdefault("config_name", config_name)
        meta.setdefault("fields", {"prompt": prompt_field, "answer": answer_field})
        if kwargs.get("metric") == "mc_logprob":
            meta["fields"]["choices"] = choices_field
            if choices_field not in cols:
                raise ValueError(
                    f"task {name!r}: metric 'mc_logprob' needs a choices field, but the dataset "
                    f"has no field {choices_field!r} (fields: {', '.join(cols)})"
                )
        return cls.from_records(
            iter(ds),
            name=name,
            prompt_field=prompt_field,
            answer_field=answer_field,
            wrong_field=wrong_field,
            choices_field=choices_field,
            row_label=label,
            meta=meta,
            **kwargs,
        )


_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class _JsonlLoadError(ValueError):
    """datasets failed on a JSONL file whose lines all parse; carries them for a precise error."""

    def __init__(self, msg: str, records: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(msg)
        self.records = records
        self.lines = lines


def _check_utf8(path: Path) -> str:
    """The file's text; a non-UTF-8 file raises naming its byte offset and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _pick_split(dd: datasets.DatasetDict, split: str, what: str) -> datasets.Dataset:
    if split not in dd:
        raise ValueError(f"{what} has no split {split!r} (splits: {', '.join(dd)})")
    return dd[split]


def _load_folder(path: Path, split: str, config_name: str | None) -> datasets.Dataset:
    """A ``save_to_disk`` folder (Dataset or DatasetDict), else a folder of data files."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    ):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types; name the folder
            raise ValueError(f"{path}: could not read the save_to_disk folder: {e}") from e
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, split, f"{path}")
        return loaded
    try:
        ds = datasets.load_dataset(str(path), config_name, split=split)
    except Exception as e:
        raise ValueError(
            f"{path}: could not load the folder with datasets.load_dataset (split {split!r}"
            f"{'' if config_name is None else f', config {config_name!r}'}): {e}"
        ) from e
    return ds


def _load_hub(name: str, split: str, config_name: str | None) -> datasets.Dataset:
    """``datasets.load_dataset(name, config_name, split=split)`` with an actionable error."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # offline, unknown name, bad split: all name the dataset
        raise ValueError(
            f"{name!r} is not a local file or folder, and could not load dataset {name!r} "
            f"from the hub (split {split!r}"
            f"{'' if config_name is None else f', config {config_name!r}'}): "
            f"{type(e).__name__}: {e}; download it first (datasets.load_dataset(...)"
            ".save_to_disk(DIR)) or pass a local path"
        ) from e


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int], bool]:
    """Records, their 1-based line numbers, and whether blank lines were skipped."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    blank = False
    with io.StringIO(_check_utf8(path), newline=None) as fh:  # lines as open() splits them
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                blank = True
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}"
                )
            records.append(obj)
            lines.append(n)
    return records, lines, blank


def _load_local(path: Path, split: str) -> tuple[Any, Callable[[int], str]]:
    import tempfile

    import datasets

    suffix = path.suffix.lower()
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_FORMATS)}"
        )
    extra: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if fmt in ("csv", "json"):
        _check_utf8(path)
    if suffix != ".jsonl":
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split=split, **extra)
        except Exception as e:  # datasets raises many types; name the file
            raise ValueError(f"{path}: could not read as {fmt}: {e}") from e
        if fmt == "csv":
            return ds, lambda i: f"row {i} (data row {i + 1} after the header)"
        return ds, lambda i: f"row {i}"
    records, lines, blank = _read_jsonl(path)  # validates each line first: precise errors
    if not records:
        raise ValueError(f"{path}: no records")
    with tempfile.TemporaryDirectory(prefix="tl_transplant_jsonl_") as tmp:
        src = path
        if blank:  # datasets' fallback parser trips on blank lines; give it a clean copy
            src = Path(tmp) / path.name
            src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        try:
            ds = datasets.load_dataset("json", data_files=str(src), split=split)
        except Exception as e:
            raise _JsonlLoadError(f"{path}: could not read as json: {e}", records, lines) from e
    if len(ds) == len(lines) and "[" not in split:
        return ds, lambda i: f"line {lines[i]}"
    return ds, lambda i: f"row {i}"


# ---- built-in synthetic tasks ----------------------------------------------------------

#: Default vocabulary: the words of :func:`tl_transplant.testing.word_tokenizer`.
DEFAULT_WORDS: tuple[str, ...] = tuple(f"w{i}" for i in range(92))


def _words(words: Sequence[str] | None, need: int, task: str) -> list[str]:
    ws = list(DEFAULT_WORDS if words is None else words)
    if len(set(ws)) != len(ws):
        raise ValueError(f"builtin task {task!r}: the word list has duplicates")
    if any(not isinstance(w, str) or not w.strip() or len(w.split()) != 1 for w in ws):
        raise ValueError(f"builtin task {task!r}: each word must be one non-empty token-like word")
    if len(ws) < need:
        raise ValueError(f"builtin task {task!r} needs at least {need} words, got {len(ws)}")
    return ws


#: (prompt words, answer words, wrong-answer words) of one generated example.
_Example = tuple[list[str], list[str], list[str]]


def _successor(
    rng: np.random.Generator, ws: list[str], span: int = 3, n_answer: int = 1
) -> _Example:
    start = int(rng.integers(0, len(ws) - span - n_answer + 1))
    prompt = ws[start : start + span]
    answer = ws[start + span : start + span + n_answer]
    return prompt, answer, [prompt[-1]]


def _induction(
    rng: np.random.Generator, ws: list[str], length: int = 6, repeat: int = 2, n_answer: int = 1
) -> _Example:
    if repeat + n_answer > length:
        raise ValueError("induction: repeat + n_answer must be <= length")
    seq = [ws[int(i)] for i in rng.choice(len(ws), size=length, replace=False)]
    prompt = seq + seq[:repeat]
    answer = seq[repeat : repeat + n_answer]
    others = [w for w in seq if w != answer[0] and w != prompt[-1]]
    return prompt, answer, [others[int(rng.integers(len(others)))]]


def _lookup(rng: np.random.Generator, ws: list[str], n_pairs: int = 3) -> _Example:
    pick = [ws[int(i)] for i in rng.choice(len(ws), size=2 * n_pairs, replace=False)]
    keys, vals = pick[:n_pairs], pick[n_pairs:]
    q = int(rng.integers(n_pairs))
    prompt = [t for kv in zip(keys, vals) for t in kv] + [keys[q]]
    wrong = vals[(q + 1) % n_pairs]
    return prompt, [vals[q]], [wrong]


def _first(rng: np.random.Generator, ws: list[str], length: int = 4) -> _Example:
    seq = [ws[int(i)] for i in rng.choice(len(ws), size=length, replace=False)]
    return seq, [seq[0]], [seq[-1]]


_BUILTINS: dict[str, tuple[Callable[..., Any], Callable[[dict[str, Any]], int], str]] = {
    "successor": (
        _successor,
        lambda p: p.get("span", 3) + p.get("n_answer", 1) + 1,
        "continue a run of consecutive words from the list: w3 w4 w5 -> w6",
    ),
    "induction": (
        _induction,
        lambda p: p.get("length", 6) + 1,
        "a random sequence then a repeat of its start; predict what came next",
    ),
    "lookup": (
        _lookup,
        lambda p: 2 * p.get("n_pairs", 3),
        "key value pairs then a key; answer its value",
    ),
    "first": (_first, lambda p: p.get("length", 4), "a random sequence; answer its first word"),
}


def list_builtin_tasks() -> dict[str, str]:
    """Names and one-line descriptions of the built-in synthetic tasks."""
    return {k: v[2] for k, v in _BUILTINS.items()}


def builtin_task(
    name: str,
    *,
    words: Sequence[str] | None = None,
    n: int = 64,
    seed: int = 0,
    metric: str = "next_token_acc",
    answer_prefix: str = " ",
    prepend_bos: PrependBos = "auto",
    max_new_tokens: int | None = None,
    **params: Any,
) -> Task:
    """A synthetic task over a word list (default ``w0 .. w91``), needing no download.

    ``name``: ``successor`` (``span``, ``n_answer``), ``induction`` (``length``,
    ``repeat``, ``n_answer``), ``lookup`` (``n_pairs``) or ``first`` (``length``).
    Prompts are the words joined by spaces; the answer is ``answer_prefix`` plus
    the answer words (a leading space suits BPE vocabularies; word-level ones
    ignore it). Each example has one wrong answer, so every metric works;
    ``max_new_tokens`` defaults to the number of answer words. Deterministic in ``seed``.
    """
    if name not in _BUILTINS:
        raise ValueError(f"unknown builtin task {name!r}; choose from {', '.join(_BUILTINS)}")
    fn, need, _ = _BUILTINS[name]
    ws = _words(words, need(params), name)
    rng = np.random.default_rng(seed)
    prompts, answers, wrongs = [], [], []
    for _ in range(int(n)):
        try:
            p, a, w = fn(rng, ws, **params)
        except TypeError as e:
            raise ValueError(f"builtin task {name!r}: bad parameters {params}: {e}") from None
        prompts.append(" ".join(p))
        answers.append(answer_prefix + " ".join(a))
        wrongs.append([answer_prefix + x for x in w])
    n_answer = int(params.get("n_answer", 1))
    return Task(
        name=name,
        prompts=prompts,
        answers=answers,
        metric=metric,
        wrong_answers=wrongs,
        max_new_tokens=max_new_tokens or n_answer,
        prepend_bos=prepend_bos,
        meta={"builtin": name, "seed": seed, "params": dict(params), "n_words": len(ws)},
    )
