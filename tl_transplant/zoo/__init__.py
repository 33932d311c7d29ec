"""Embedded tiny model pairs with real capability gaps, trained by ``zoo/train.py``.

>>> from tl_transplant import zoo
>>> pair = zoo.load_pair("cross_generation")          # doctest: +SKIP
>>> tasks = zoo.load_tasks("cross_generation")        # doctest: +SKIP
>>> tasks["task"].dev, tasks["retention"].test        # doctest: +SKIP

``cross_generation`` (Llama with GQA): source ``gen1`` knows modular addition;
target ``gen2`` continued training without it and forgot it.
``base_instruct`` (GPT-2): source ``instruct`` answers ``Q: ... A:`` prompts;
target ``base`` never learned that format.

Real pairs (``REAL_PAIR_NAMES``, built by :mod:`tl_transplant.zoo.real` from a real
checkpoint into a cache, on first use or with ``tl-transplant zoo build NAME``):
``smollm2_rtn4``: source SmolLM2-135M-Instruct, target the same with its block
linears re-quantized to 4 bits (groups of 32); the target lost two-digit addition
and kept most of its facts. ``smollm2_ft_tens``: source SmolLM2-135M-Instruct
fine-tuned (block linears, 32 steps) on the tens digit of two-digit sums, target the
original: a dense fine-tuning delta whose skill may sit in few units.
``smollm2_ct_catalog``: source SmolLM2-135M-Instruct, target the same after continued
training of every parameter on a synthetic store catalog (:mod:`tl_transplant.zoo.domain`):
it learned the store's aisles and forgot much of its times tables (a regressed next version).
Their :func:`load_tasks` has the keys ``task``, ``retention`` (the first retention
task) and ``retention_<task>`` for each further one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_transplant.errors import ZooError

ZOO_DIR = Path(__file__).resolve().parent
PAIRS_DIR = ZOO_DIR / "pairs"
TASKS_DIR = ZOO_DIR / "tasks"
PAIR_NAMES = ("cross_generation", "base_instruct")  # embedded (shipped) pairs
# built from a real checkpoint into a cache
REAL_PAIR_NAMES = ("smollm2_rtn4", "smollm2_ft_tens", "smollm2_ct_catalog")
ALL_PAIR_NAMES = PAIR_NAMES + REAL_PAIR_NAMES
_ROLES = {"cross_generation": ("gen1", "gen2"), "base_instruct": ("instruct", "base")}


@dataclass
class Splits:
    """A task's dev split (for choosing K and alpha) and test split (for reporting)."""

    dev: Any
    test: Any


def _check(name: str) -> None:
    if name not in ALL_PAIR_NAMES:
        raise ZooError(f"unknown zoo pair {name!r}; available: {', '.join(ALL_PAIR_NAMES)}")


def is_real(name: str) -> bool:
    """Whether ``name`` is a real pair (built into a cache) rather than an embedded one."""
    _check(name)
    return name in REAL_PAIR_NAMES


def build(name: str, out: str | Path | None = None, *, force: bool = False,
          log: Any = None) -> Path:
    """Build a real pair (no-op when already built); returns its root directory."""
    from tl_transplant.zoo.real import build_real_pair

    if not is_real(name):
        raise ZooError(f"zoo pair {name!r} is embedded and needs no build; real pairs: "
                         f"{', '.join(REAL_PAIR_NAMES)}")
    return build_real_pair(name, out, force=force, log=log)


def _real_root(name: str, build_missing: bool) -> Path:
    from tl_transplant.zoo.real import is_built, not_built_message, pair_root

    root = pair_root(name)
    if not is_built(root):
        if not build_missing:
            raise FileNotFoundError(not_built_message(name, root))
        build(name, log=print)
    return root


def pair_dirs(name: str, *, build_missing: bool = False) -> tuple[Path, Path]:
    """(source_dir, target_dir) of a pair; a real pair is built first if ``build_missing``."""
    _check(name)
    if name in REAL_PAIR_NAMES:
        root = _real_root(name, build_missing)
        return root / "source", root / "target"
    src, tgt = _ROLES[name]
    d = PAIRS_DIR / name
    if not (d / src / "config.json").exists():
        raise FileNotFoundError(
            f"zoo pair {name!r} is missing from {d}; retrain it with "
            f"`python -m tl_transplant.zoo.train --pair {name}`"
        )
    return d / src, d / tgt


def pair_info(name: str) -> dict[str, Any]:
    """Training record of a pair (seed, steps, probe accuracies); a real pair's build record."""
    _check(name)
    if name in REAL_PAIR_NAMES:
        from tl_transplant.zoo.real import pair_record

        return pair_record(name)
    return json.loads((PAIRS_DIR / name / "pair.json").read_text())


def load_pair(name: str, **kwargs: Any) -> Any:
    """Load a pair as a :class:`~tl_transplant.models.pair.ModelPair` (source, target).

    A real pair that is not built yet is built first (minutes, once).
    """
    from tl_transplant.models.pair import ModelPair

    src, tgt = pair_dirs(name, build_missing=True)
    return ModelPair.load(src, tgt, **kwargs)


def task_paths(name: str, *, build_missing: bool = False) -> dict[str, Splits]:
    """JSONL paths: ``{"task": Splits(dev, test), "retention": Splits(dev, test)}``.

    A real pair adds ``retention_<task>`` for each retention task after the first.
    """
    _check(name)
    if name in REAL_PAIR_NAMES:
        from tl_transplant.zoo.real import MARKER

        root = _real_root(name, build_missing)
        rec = json.loads((root / MARKER).read_text())
        order = [rec["capability"], *rec["retention"]]
        keys = ["task", "retention", *(f"retention_{t}" for t in rec["retention"][1:])]
        return {k: Splits(*(root / rec["tasks"][t][s] for s in ("dev", "test")))
                for k, t in zip(keys, order)}
    return {
        kind: Splits(*(TASKS_DIR / f"{name}_{kind}_{split}.jsonl" for split in ("dev", "test")))
        for kind in ("task", "retention")
    }


def load_tasks(name: str) -> dict[str, Splits]:
    """Tasks of a pair: the capability ``task`` and a ``retention`` task, each with dev/test.

    The models were trained with BOS prepended, so the tasks force ``prepend_bos=True``
    (a real pair's tasks use :data:`tl_transplant.zoo.real.PREPEND_BOS`).
    """
    from tl_transplant.tasks.task import Task

    bos = True
    if is_real(name):
        from tl_transplant.zoo.real import PREPEND_BOS

        bos = PREPEND_BOS
    out: dict[str, Splits] = {}
    for kind, sp in task_paths(name, build_missing=True).items():
        label = f"{name}:{'capability' if kind == 'task' else kind}"
        out[kind] = Splits(*(
            Task.from_dataset(str(p), prompt_field="prompt", answer_field="answer",
                              name=f"{label}:{split}", metric="next_token_acc", prepend_bos=bos)
            for split, p in (("dev", sp.dev), ("test", sp.test))
        ))
    return out
