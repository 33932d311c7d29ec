"""Answer extraction for ``exact_match``: what part of a generation is compared to the answer.

An extractor maps the decoded generation to the predicted answer text; named ones are
in :data:`EXTRACTORS` (``Task.extract`` takes a name or any callable). With ``boxed`` and
``last_number`` both sides are normalised by :func:`normalize_answer` before comparing
(:data:`NORMALIZED_EXTRACTORS`, see :meth:`tl_transplant.tasks.task.Task.matches`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tl_transplant.errors import TaskError


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


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _brace_matches(text: str) -> list[int]:
    """For each ``{`` of ``text`` the index of its matching ``}`` (-1: none; other
    positions -1 too), escaped braces ``\\{`` / ``\\}`` skipped. One pass with a stack:
    linear, where scanning from every box start was quadratic (issue 22)."""
    match = [-1] * len(text)
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # an escaped brace does not count
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    match = _brace_matches(text)
    for start in reversed(starts):
        if match[start - 1] != -1:
            return text[start : match[start - 1]]
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
    # Peel "$", a trailing "." and a redundant outer {...} until nothing changes, on a
    # window t[lo:hi] with the braces matched once (linear; it was quadratic in the depth).
    match = _brace_matches(t)
    boxes = [m.end() - 1 for m in _BOX.finditer(t)]  # the "{" of each inner box
    lo, hi = 0, len(t)
    # Whether a box is complete inside the window (then the outer braces are not peeled);
    # asked once: the window only shrinks, so the answer never changes afterwards.
    inner_box: bool | None = None
    while True:
        before = (lo, hi)
        while lo < hi and t[lo] == "$":
            lo += 1
        while hi > lo and t[hi - 1] == "$":
            hi -= 1
        while hi > lo and t[hi - 1] == ".":
            hi -= 1
        if hi - lo >= 2 and t[lo] == "{" and match[lo] == hi - 1:
            if inner_box is None:
                inner_box = any(lo <= b and -1 < match[b] < hi for b in boxes)
            if not inner_box:
                lo, hi = lo + 1, hi - 1
        if (lo, hi) == before:
            break
    t = t[lo:hi]
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
            raise TaskError(
                f"unknown extract {extract!r}; use a callable or one of: {', '.join(EXTRACTORS)}"
            )
        return EXTRACTORS[extract]
    if not callable(extract):
        raise TaskError(f"extract must be a callable or a name, got {type(extract).__name__}")
    return extract


def extract_name(extract: Callable[[str], str] | str | None) -> str:
    """How a result records an extractor: its name, or the callable's ``__name__``."""
    if extract is None:
        return "strip"
    if isinstance(extract, str):
        return extract
    return getattr(extract, "__name__", type(extract).__name__)


__all__ = [
    "EXTRACTORS",
    "NORMALIZED_EXTRACTORS",
    "extract_boxed",
    "extract_first_line",
    "extract_first_word",
    "extract_last_number",
    "extract_name",
    "extract_strip",
    "normalize_answer",
    "resolve_extract",
]
