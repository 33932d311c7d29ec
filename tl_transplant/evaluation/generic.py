"""Generic retention: a control task that needs nothing from the user.

:func:`generic_retention` builds a :class:`~tl_transplant.tasks.task.Task` named
``generic_retention`` with metric ``next_token_agreement``: on a set of contexts,
teacher-forced, the fraction of positions where the (edited) target's top-1 next
token equals the *unedited* target's top-1, which is computed once here and stored
in the examples (see :mod:`tl_transplant.tasks.task`). Before any edit it is 1.0 (checked
here); an edit that changes the target's behaviour lowers it. It is in accuracy
points, so a sweep's ``max_retention_drop`` applies to it like to any control task.

It is a *generic proxy*: it says how much an edit moves the target's predictions on
general text and on the task's own contexts, not whether a particular skill
survived. A real control task of the capability you care about is always better.

Contexts: ``n_text`` chunks of a small general-English sample shipped with the
package (``tl_transplant/data/general_text.txt``: facts, instructions, dialogue, code,
numbers), cut at word boundaries to at most ``max_tokens`` tokens, plus ``n_task``
of the task's own prompts (contexts only, never answers), both drawn with ``seed``.
A tokenizer that turns the English sample into mostly unknown tokens (the zoo's
word-level vocabularies) gets the task's contexts only, with a note in
``task.meta["notes"]`` and a warning.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.errors import EvaluationError
from tl_transplant.evaluation.evaluator import evaluate, reference_top1
from tl_transplant.tasks.metrics import reference_answer
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import PrependBos, resolve_prepend_bos

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.models.pair import ModelPair

#: The name of the task :func:`generic_retention` returns.
NAME = "generic_retention"
#: The metric it uses (per example: fraction of positions agreeing with the unedited target).
METRIC = "next_token_agreement"
#: The shipped general-English sample (paragraphs separated by blank lines).
TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "general_text.txt"
#: Above this fraction of unknown tokens the sample is not used (the tokenizer cannot read it).
MAX_UNKNOWN_FRACTION = 0.25
#: Chunks shorter than this many tokens are dropped (too little context to say anything).
MIN_CHUNK_TOKENS = 4


@lru_cache(maxsize=1)
def general_text() -> tuple[str, ...]:
    """The paragraphs of the shipped general-English sample, in file order."""
    text = TEXT_PATH.read_text(encoding="utf-8")
    return tuple(p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip())


def _n_tokens(tok: PreTrainedTokenizerBase, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def unknown_fraction(tok: PreTrainedTokenizerBase, texts: tuple[str, ...] | list[str]) -> float:
    """The fraction of ``texts``' tokens that are the tokenizer's unknown token (0 without one)."""
    unk = tok.unk_token_id
    ids = [t for s in texts for t in tok(s, add_special_tokens=False)["input_ids"]]
    if not ids or unk is None:
        return 0.0 if ids else 1.0
    return sum(t == unk for t in ids) / len(ids)


def _fit(tok: PreTrainedTokenizerBase, text: str, max_tokens: int) -> list[str]:
    """``text`` cut at word boundaries (its own whitespace kept) into consecutive chunks of
    at most ``max_tokens`` tokens; a single word longer than that is cut by characters."""
    if _n_tokens(tok, text) <= max_tokens:
        return [text]  # kept exactly, leading whitespace included
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    chunks: list[str] = []
    i = 0
    while i < len(spans):
        lo, hi = i + 1, len(spans)  # largest j with text[spans[i]..spans[j-1]] fitting
        if _n_tokens(tok, text[spans[i][0] : spans[lo - 1][1]]) > max_tokens:
            word = text[spans[i][0] : spans[i][1]]
            while len(word) > 1 and _n_tokens(tok, word) > max_tokens:
                word = word[: len(word) // 2]
            chunks.append(word)
            i += 1
            continue
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _n_tokens(tok, text[spans[i][0] : spans[mid - 1][1]]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        chunks.append(text[spans[i][0] : spans[lo - 1][1]])
        i = lo
    return chunks


def text_chunks(tok: PreTrainedTokenizerBase, max_tokens: int = 48) -> list[str]:
    """All chunks of the shipped sample for this tokenizer, each at most ``max_tokens``
    tokens and at least :data:`MIN_CHUNK_TOKENS` (or a whole short paragraph)."""
    out: list[str] = []
    for para in general_text():
        pieces = _fit(tok, para, max_tokens)
        keep = [c for c in pieces if _n_tokens(tok, c) >= min(MIN_CHUNK_TOKENS, max_tokens)]
        out.extend(keep or pieces[:1])
    return out


def _pick(rng: np.random.Generator, items: list[str], n: int) -> list[str]:
    return [items[int(i)] for i in rng.permutation(len(items))[:n]]


def generic_retention(
    pair: ModelPair,
    task: Task | None = None,
    *,
    n_text: int = 32,
    n_task: int = 32,
    max_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    prepend_bos: PrependBos | str | None = None,
) -> Task:
    """A control task measuring how far an edit moves the *unedited* target (a generic proxy).

    Metric ``next_token_agreement`` (see :mod:`tl_transplant.tasks.task`): per example, the
    fraction of its (non-pad, predicted; BOS excluded) positions where the model's top-1
    next token equals the unedited ``pair.target``'s, teacher-forced on the context.
    The references are computed here, once, and stored in the answers (space-separated
    token ids), so :meth:`Task.split`, :meth:`Task.subset` and ``to_records`` keep them;
    :func:`tl_transplant.evaluation.evaluator.evaluate` scores it like any other task (1.0 before
    the edit, checked here; ``before - after`` is the retention drop).

    Contexts: ``n_text`` chunks of the shipped English sample plus ``n_task`` prompts of
    ``task`` (contexts only), each cut to at most ``max_tokens`` tokens, drawn with
    ``seed`` (two independent streams, so ``n_text`` does not change which prompts are
    drawn). If the target's tokenizer reads the sample as mostly unknown tokens
    (> :data:`MAX_UNKNOWN_FRACTION`), only the task's contexts are used and a note says so.
    ``prepend_bos``: None follows ``task.prepend_bos`` (``"auto"`` without a task),
    resolved on the pair by :func:`~tl_transplant.tasks.tokens.resolve_prepend_bos`; the
    resolved bool is fixed in the returned task (its references depend on it).
    """
    for name, v in (("n_text", n_text), ("n_task", n_task)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise EvaluationError(f"generic_retention: {name} must be an int >= 0, got {v!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EvaluationError(
            f"generic_retention: max_tokens must be an int >= 1, got {max_tokens!r}")
    if n_text + n_task == 0:
        raise EvaluationError(
            "generic_retention: n_text + n_task is 0; ask for some contexts")
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"generic_retention: task must be a Task or None, got {type(task)}")
    setting = prepend_bos if prepend_bos is not None else (task.prepend_bos if task else "auto")
    bos = resolve_prepend_bos(pair, setting)
    tok = pair.target.tokenizer
    notes: list[str] = []

    texts: list[str] = []
    unk = unknown_fraction(tok, general_text())
    if n_text > 0:
        if unk > MAX_UNKNOWN_FRACTION:
            notes.append(
                f"the target's tokenizer reads the shipped English sample as {unk:.0%} unknown "
                f"tokens (limit {MAX_UNKNOWN_FRACTION:.0%}); generic retention uses the task's "
                "contexts only"
            )
        else:
            pool = text_chunks(tok, max_tokens)
            texts = _pick(np.random.default_rng([seed, 0]), pool, n_text)
            if len(texts) < n_text:
                notes.append(f"the English sample has {len(pool)} chunks; n_text={n_text} asked")

    contexts: list[str] = []
    if task is not None and n_task > 0:
        prompts = list(dict.fromkeys(p for p in task.prompts if p.strip()))
        drawn = _pick(np.random.default_rng([seed, 1]), prompts, n_task)
        contexts = [_fit(tok, p, max_tokens)[0] for p in drawn]
        if len(contexts) < n_task:
            notes.append(f"task {task.name!r} has {len(prompts)} distinct prompts; "
                         f"n_task={n_task} asked")

    prompts_all = texts + contexts
    if not prompts_all:
        raise EvaluationError(
            "generic_retention: no contexts: "
            + ("; ".join(notes) if notes else "n_text and n_task drew nothing")
            + "; pass task=... (its prompts serve as contexts) or raise n_text/n_task"
        )
    refs = reference_top1(pair.target, prompts_all, prepend_bos=bos, batch_size=batch_size)
    keep = [i for i, r in enumerate(refs) if r]  # a context of BOS only predicts nothing
    meta: dict[str, Any] = {
        "generic": True,
        "proxy": "agreement of top-1 next tokens with the unedited target",
        "seed": seed,
        "n_text": sum(1 for i in keep if i < len(texts)),
        "n_task": sum(1 for i in keep if i >= len(texts)),
        "max_tokens": max_tokens,
        "source_task": None if task is None else task.name,
        "unknown_fraction": round(float(unk), 4),
        "reference": {
            "model": str(pair.target.name),
            "prepend_bos": bos,
            "vocab_size": int(len(tok)),
            "n_positions": int(sum(len(refs[i]) for i in keep)),
        },
        "notes": notes,
    }
    out = Task(
        name=NAME,
        prompts=[prompts_all[i] for i in keep],
        answers=[reference_answer(refs[i]) for i in keep],
        metric=METRIC,
        prepend_bos=bos,
        meta=meta,
    )
    before = evaluate(pair.target, out, batch_size=batch_size, progress=False).mean
    meta["reference"]["before"] = before
    if before != 1.0:  # batch-shape noise beyond the tolerance: say so, never hide it
        notes.append(f"the unedited target agrees with its own references at {before:.4f}, not 1")
    for n in notes:
        warnings.warn(f"generic_retention: {n}", UserWarning, stacklevel=2)
    return out


__all__ = [
    "MAX_UNKNOWN_FRACTION",
    "METRIC",
    "NAME",
    "TEXT_PATH",
    "general_text",
    "generic_retention",
    "text_chunks",
    "unknown_fraction",
]
