"""What an lm-eval task source asks for: the task, where dev and test documents come from.

The YAML form (``task:`` or a ``control_tasks`` entry, once integrated)::

    task:
      lm_eval: gsm8k              # lm-eval's task name
      include_path: my_tasks/     # lm-eval's own name: a folder (or list) of task YAMLs
      dev: {split: train, limit: 200}          # or {task: OTHER_TASK, split: ..., limit: ...}
      test: {split: test, limit: 500}
      num_fewshot: 5
      allow_test_selection: false
      seed: 1234                  # lm-eval's fewshot_random_seed; also draws dev documents
      metric: exact_match,strict-match         # lm-eval's "metric,filter" key (optional)
      max_gen_toks: 512           # generate_until: overrides the task's max_gen_toks

:meth:`HarnessSpec.from_dict` checks keys and values and says what is allowed; it is what
the config loader will call. Nothing here imports lm-eval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_transplant.harness.errors import HarnessError

#: lm-eval's default ``fewshot_random_seed`` (lm_eval.defaults.DEFAULT_OTHER_SEED): with it, the
#: few-shot contexts of the test documents equal those of a plain ``lm_eval`` run.
LM_EVAL_FEWSHOT_SEED = 1234

_SPEC_KEYS = (
    "lm_eval",
    "include_path",
    "include_defaults",
    "dev",
    "test",
    "num_fewshot",
    "allow_test_selection",
    "seed",
    "metric",
    "max_gen_toks",
)
_DEV_KEYS = ("task", "split", "limit")
_TEST_KEYS = ("split", "limit")


def _check_limit(limit: Any, where: str) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise HarnessError(f"{where}.limit must be a positive integer or null, got {limit!r}")
    if limit <= 0:
        raise HarnessError(
            f"{where}.limit must be a positive number of documents, got {limit}; leave it out "
            "(null) to take every document of the split"
        )
    return limit


@dataclass(frozen=True)
class SplitSpec:
    """Where one role's documents come from.

    ``task``: another lm-eval task to draw the documents from (dev only; e.g. MATH training
    problems as the dev set of MATH-500); ``split``: a split of that task's dataset (default:
    see :func:`tl_transplant.harness.load_task`); ``limit``: at most this many documents.
    """

    split: str | None = None
    limit: int | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        _check_limit(self.limit, "split")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise HarnessError(f"split must be a non-empty string, got {self.split!r}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise HarnessError(f"task must be a non-empty string, got {self.task!r}")

    @classmethod
    def from_value(cls, value: Any, role: str) -> SplitSpec:
        """A ``dev:``/``test:`` mapping, a split name, a SplitSpec or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, SplitSpec):
            if role == "test" and value.task is not None:
                raise HarnessError("test: documents come from the named task itself; no 'task'")
            return value
        if isinstance(value, str):
            return cls(split=value)
        if not isinstance(value, Mapping):
            raise HarnessError(
                f"{role} must be a mapping like {{split: train, limit: 200}} or a split name, "
                f"got {type(value).__name__}"
            )
        allowed = _DEV_KEYS if role == "dev" else _TEST_KEYS
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise HarnessError(
                f"{role}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                f"{', '.join(allowed)}"
            )
        _check_limit(value.get("limit"), role)
        return cls(split=value.get("split"), limit=value.get("limit"), task=value.get("task"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"split": self.split, "limit": self.limit}
        if self.task is not None:
            d["task"] = self.task
        return d


def _paths(value: Any, check: bool = True) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        raise HarnessError(
            f"include_path must be a folder or a list of folders, got {type(value).__name__}"
        )
    out = []
    for p in items:
        if not isinstance(p, (str, Path)):
            raise HarnessError(f"include_path entries must be paths, got {p!r}")
        path = Path(p).expanduser()
        if not check:
            out.append(str(path))
            continue
        if not path.exists():
            raise HarnessError(f"include_path {str(p)!r} does not exist")
        out.append(str(path.resolve()))
    return tuple(out)


@dataclass(frozen=True)
class HarnessSpec:
    """An lm-eval task as a tl_transplant task source (see the module docstring).

    ``include_defaults``: whether lm-eval's ~15k built-in task configs are indexed (about
    half a minute on 2 cores, once per process). ``None`` (default): only when the name is
    not found in ``include_path`` or the miniature tasks shipped here.
    """

    name: str
    include_path: tuple[str, ...] = ()
    include_defaults: bool | None = None
    dev: SplitSpec = field(default_factory=SplitSpec)
    test: SplitSpec = field(default_factory=SplitSpec)
    num_fewshot: int | None = None
    allow_test_selection: bool = False
    seed: int = LM_EVAL_FEWSHOT_SEED
    metric: str | None = None
    max_gen_toks: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise HarnessError(f"lm_eval: a task name is required, got {self.name!r}")
        if self.num_fewshot is not None and (
            isinstance(self.num_fewshot, bool)
            or not isinstance(self.num_fewshot, int)
            or self.num_fewshot < 0
        ):
            raise HarnessError(f"num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HarnessError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.allow_test_selection, bool):
            raise HarnessError(
                f"allow_test_selection must be true or false, got {self.allow_test_selection!r}"
            )
        if self.test.task is not None:
            raise HarnessError("test: documents come from the named task itself; no 'task'")
        if self.max_gen_toks is not None and (
            isinstance(self.max_gen_toks, bool)
            or not isinstance(self.max_gen_toks, int)
            or self.max_gen_toks < 1
        ):
            raise HarnessError(
                f"max_gen_toks must be a positive integer, got {self.max_gen_toks!r}"
            )
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise HarnessError(f"metric must be lm-eval's metric name, got {self.metric!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, check_paths: bool = True) -> HarnessSpec:
        """Check a YAML/Python mapping (keys: see the module docstring) and build the spec
        (``check_paths=False``: ``include_path`` folders are not looked for yet)."""
        if not isinstance(d, Mapping):
            raise HarnessError(f"an lm_eval task must be a mapping, got {type(d).__name__}")
        unknown = [k for k in d if k not in _SPEC_KEYS]
        if unknown:
            raise HarnessError(
                f"lm_eval task: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                f"{', '.join(_SPEC_KEYS)}"
            )
        if "lm_eval" not in d:
            raise HarnessError("lm_eval task: the key 'lm_eval' (the task name) is required")
        return cls(
            name=d["lm_eval"],
            include_path=_paths(d.get("include_path"), check_paths),
            include_defaults=d.get("include_defaults"),
            dev=SplitSpec.from_value(d.get("dev"), "dev"),
            test=SplitSpec.from_value(d.get("test"), "test"),
            num_fewshot=d.get("num_fewshot"),
            allow_test_selection=d.get("allow_test_selection", False),
            seed=d.get("seed", LM_EVAL_FEWSHOT_SEED),
            metric=d.get("metric"),
            max_gen_toks=d.get("max_gen_toks"),
        )

    @classmethod
    def coerce(cls, value: HarnessSpec | str | Mapping[str, Any], **overrides: Any) -> HarnessSpec:
        """A spec from a spec, a task name or a mapping, with keyword overrides (YAML keys)."""
        if isinstance(value, HarnessSpec):
            d: dict[str, Any] = value.to_dict()
        elif isinstance(value, str):
            d = {"lm_eval": value}
        else:
            d = dict(value)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (round-trips through :meth:`from_dict`)."""
        return {
            "lm_eval": self.name,
            "include_path": list(self.include_path) or None,
            "include_defaults": self.include_defaults,
            "dev": self.dev.to_dict(),
            "test": self.test.to_dict(),
            "num_fewshot": self.num_fewshot,
            "allow_test_selection": self.allow_test_selection,
            "seed": self.seed,
            "metric": self.metric,
            "max_gen_toks": self.max_gen_toks,
        }


__all__ = ["LM_EVAL_FEWSHOT_SEED", "HarnessSpec", "SplitSpec"]
