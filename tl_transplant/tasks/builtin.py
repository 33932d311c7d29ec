"""Built-in synthetic tasks over a word list: no download, deterministic in a seed.

:func:`builtin_task` makes one (``successor``, ``induction``, ``lookup``, ``first``);
:func:`list_builtin_tasks` names them. Each example has one wrong answer, so every
built-in metric works on them (``mc_logprob`` needs choices added).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tl_transplant.errors import TaskError
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import PrependBos

#: Default vocabulary: the words of :func:`tl_transplant.testing.word_tokenizer`.
DEFAULT_WORDS: tuple[str, ...] = tuple(f"w{i}" for i in range(92))


def _words(words: Sequence[str] | None, need: int, task: str) -> list[str]:
    ws = list(DEFAULT_WORDS if words is None else words)
    if len(set(ws)) != len(ws):
        raise TaskError(f"builtin task {task!r}: the word list has duplicates")
    if any(not isinstance(w, str) or not w.strip() or len(w.split()) != 1 for w in ws):
        raise TaskError(f"builtin task {task!r}: each word must be one non-empty token-like word")
    if len(ws) < need:
        raise TaskError(f"builtin task {task!r} needs at least {need} words, got {len(ws)}")
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
        raise TaskError("induction: repeat + n_answer must be <= length")
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
        raise TaskError(f"unknown builtin task {name!r}; choose from {', '.join(_BUILTINS)}")
    fn, need, _ = _BUILTINS[name]
    ws = _words(words, need(params), name)
    rng = np.random.default_rng(seed)
    prompts, answers, wrongs = [], [], []
    for _ in range(int(n)):
        try:
            p, a, w = fn(rng, ws, **params)
        except TypeError as e:
            raise TaskError(f"builtin task {name!r}: bad parameters {params}: {e}") from None
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


__all__ = ["DEFAULT_WORDS", "builtin_task", "list_builtin_tasks"]
