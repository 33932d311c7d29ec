"""Embedded tiny model pairs with real capability gaps, trained by ``zoo/train.py``.

>>> from tl_transplant import zoo
>>> pair = zoo.load_pair("cross_generation")          # doctest: +SKIP
>>> tasks = zoo.load_tasks("cross_generation")        # doctest: +SKIP
>>> tasks["task"].dev, tasks["retention"].test        # doctest: +SKIP

``cross_generation`` (Llama with GQA): source ``gen1`` knows modular addition;
target ``gen2`` continued training without it and forgot it.
``base_instruct`` (GPT-2): source ``instruct`` answers ``Q: ... A:`` prompts;
target ``base`` never learned that format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ZOO_DIR = Path(__file__).resolve().parent
PAIRS_DIR = ZOO_DIR / "pairs"
TASKS_DIR = ZOO_DIR / "tasks"
PAIR_NAMES = ("cross_generation", "base_instruct")
_ROLES = {"cross_generation": ("gen1", "gen2"), "base_instruct": ("instruct", "base")}


@dataclass
class Splits:
    """A task's dev split (for choosing K and alpha) and test split (for reporting)."""

    dev: Any
    test: Any


def _check(name: str) -> None:
    if name not in PAIR_NAMES:
        raise ValueError(f"unknown zoo pair {name!r}; available: {', '.join(PAIR_NAMES)}")


def pair_dirs(name: str) -> tuple[Path, Path]:
    """(source_dir, target_dir) of an embedded pair."""
    _check(name)
    src, tgt = _ROLES[name]
    d = PAIRS_DIR / name
    if not (d / src / "config.json").exists():
        raise FileNotFoundError(
            f"zoo pair {name!r} is missing from {d}; retrain it with "
            f"`python -m tl_transplant.zoo.train --pair {name}`"
        )
    return d / src, d / tgt


def pair_info(name: str) -> dict[str, Any]:
    """Training record of a pair (seed, steps, probe accuracies)."""
    _check(name)
    return json.loads((PAIRS_DIR / name / "pair.json").read_text())


def load_pair(name: str, **kwargs: Any) -> Any:
    """Load an embedded pair as a :class:`~tl_transplant.pair.ModelPair` (source, target)."""
    from tl_transplant.pair import ModelPair

    src, tgt = pair_dirs(name)
    return ModelPair.load(src, tgt, **kwargs)


def task_paths(name: str) -> dict[str, Splits]:
    """JSONL paths: ``{"task": Splits(dev, test), "retention": Splits(dev, test)}``."""
    _check(name)
    return {
        kind: Splits(*(TASKS_DIR / f"{name}_{kind}_{split}.jsonl" for split in ("dev", "test")))
        for kind in ("task", "retention")
    }


def load_tasks(name: str) -> dict[str, Splits]:
    """Tasks of a pair: the capability ``task`` and a ``retention`` task, each with dev/test.

    The models were trained with BOS prepended, so the tasks force ``prepend_bos=True``.
    """
    from tl_transplant.tasks import Task

    out: dict[str, Splits] = {}
    for kind, sp in task_paths(name).items():
        label = f"{name}:{'capability' if kind == 'task' else 'retention'}"
        out[kind] = Splits(*(
            Task.from_dataset(str(p), prompt_field="prompt", answer_field="answer",
                              name=f"{label}:{split}", metric="next_token_acc", prepend_bos=True)
            for split, p in (("dev", sp.dev), ("test", sp.test))
        ))
    return out
