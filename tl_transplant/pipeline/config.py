"""The run configuration (``tl-transplant run CONFIG.yaml``), validated with pydantic.

Every error names the key, the bad value and what is allowed, e.g.
``sweep.alpha: each alpha must be in [0, 1] (got 1.5)``. Everything that can be
checked without loading a model is checked here, so a bad config fails in
seconds rather than after the first scorer ran: booleans are refused where numbers
are expected (YAML's ``yes``/``true`` would otherwise become 1), every scoring
method and control must be able to score at least one of ``selection.units``
(each then scores the kinds it supports among them, see
:meth:`SelectionConfig.kinds_for`), and ``device`` must name a device this machine
has. :func:`load_config` raises only :class:`ConfigError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tl_transplant.arch.units import normalize_kinds
from tl_transplant.edit.weights import WEIGHT
from tl_transplant.errors import TLTransplantError
from tl_transplant.tasks.extract import EXTRACTORS
from tl_transplant.tasks.metrics import available_metrics
from tl_transplant.tasks.sources import FORMATS as _FORMATS


class ConfigError(TLTransplantError, ValueError):
    """A malformed run configuration; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _strict_int(v: Any) -> Any:
    """Refuse booleans and non-integers before pydantic's lax coercion turns ``true`` into 1."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be an integer (got {v!r})")
    return v


def _strict_float(v: Any) -> Any:
    """Refuse booleans and strings; ints such as ``1`` are fine."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number (got {v!r})")
    return float(v)


def _strict_bool(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false (got {v!r})")
    return v


StrictInt = Annotated[int, BeforeValidator(_strict_int)]
StrictFloat = Annotated[float, BeforeValidator(_strict_float)]
StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]

#: ``retention:`` values.
RETENTION_MODES = ("auto", "none")

#: Device strings ``ModelPair.load`` accepts (passed on to torch unchanged).
DEVICE_FORMS = "cpu, cuda, cuda:N (N = 0, 1, ...), mps"
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """Validate a device string and that this machine has it; ``ValueError`` names the fix."""
    if not isinstance(device, str) or not _DEVICE.match(device.strip().lower()):
        raise ValueError(f"unknown device {device!r}; valid forms: {DEVICE_FORMS}")
    dev = device.strip().lower()
    import torch

    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{device!r}: CUDA is not available on this machine; use device: cpu"
            )
        if ":" in dev:
            idx, count = int(dev.split(":")[1]), torch.cuda.device_count()
            if idx >= count:
                raise ValueError(
                    f"{device!r}: this machine has {count} CUDA device(s) "
                    f"(cuda:0..cuda:{count - 1}); pick one of those or use device: cuda"
                )
    elif dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{device!r}: MPS is not available on this machine; use device: cpu")
    return dev


class TaskConfig(_Strict):
    """A task: a local JSONL/CSV/TSV/parquet file, a ``datasets.save_to_disk`` folder,
    a folder of data files, or a hub dataset name (see :meth:`Task.from_dataset`).

    ``split`` and ``config_name`` are ``load_dataset``'s split and second argument
    (a hub dataset's subset); ``extract`` names the answer extractor for
    ``exact_match`` (``boxed`` for MATH-style answers); ``choices_field`` holds the
    options for ``mc_logprob``.
    """

    path: str
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    metric: str = "next_token_acc"
    max_new_tokens: StrictInt = Field(16, ge=1, le=4096)
    prepend_bos: bool | Literal["auto"] = "auto"
    test_path: str | None = None
    dev_fraction: StrictFloat = Field(0.5, gt=0.0, lt=1.0)
    name: str | None = None
    wrong_field: str = "wrong_answers"
    choices_field: str = "choices"
    limit: StrictInt | None = Field(None, ge=1)
    split: str = "train"
    config_name: str | None = None
    extract: str | None = None

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, v: Any) -> Any:
        valid = available_metrics()  # the metric registry (tl_transplant.tasks.metrics)
        if not isinstance(v, str) or v not in valid:
            raise ValueError(f"must be one of {', '.join(valid)} (got {v!r})")
        return v

    @field_validator("prepend_bos", mode="before")
    @classmethod
    def _bos(cls, v: Any) -> Any:
        if not (isinstance(v, bool) or v == "auto"):
            raise ValueError(f"must be true, false or 'auto' (got {v!r:.80})")
        return v

    @field_validator("path", "test_path", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, Path):
            v = str(v)
        if not isinstance(v, str) or not v.strip() or "\x00" in v:
            raise ValueError(
                f"give a local file, a dataset folder or a hub dataset name (got {v!r:.80})"
            )
        return v

    @field_validator("extract", mode="before")
    @classmethod
    def _extract(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or v not in EXTRACTORS):
            raise ValueError(f"must be one of {', '.join(EXTRACTORS)} (got {v!r})")
        return v

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`Task.from_dataset` (everything but path and name)."""
        return dict(
            prompt_field=self.prompt_field,
            answer_field=self.answer_field,
            wrong_field=self.wrong_field,
            choices_field=self.choices_field,
            limit=self.limit,
            split=self.split,
            config_name=self.config_name,
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            prepend_bos=self.prepend_bos,
            extract=self.extract,
        )

    @property
    def label(self) -> str:
        return self.name or self.path

    def input_paths(self) -> list[str]:
        """The local files and folders this task reads (a hub name too; filtered later)."""
        return [p for p in (self.path, self.test_path) if p]


def _require_lm_eval_installed() -> None:
    """Fail at config time (not after the models loaded) when the ``lm_eval`` extra is
    missing; a cheap look-up, lm-eval itself is imported when the task loads."""
    import importlib.util

    from tl_transplant.harness.errors import INSTALL_HINT

    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        raise ValueError(f"lm-evaluation-harness is not installed; {INSTALL_HINT}")


class LmEvalTaskConfig(_Strict):
    """An lm-evaluation-harness task (:mod:`tl_transplant.harness`; the ``lm_eval`` extra).

    ``lm_eval``: lm-eval's task name; ``include_path`` (lm-eval's own key): a folder, or a
    list, of task YAMLs (relative to the config file); ``dev``/``test``: ``{split, limit}``
    (dev also ``task``: another lm-eval task, e.g. MATH training problems for MATH-500) or a
    split name; by default dev is the task's validation or training split and test its test
    split as its YAML names them. Dev documents from a test split are refused unless
    ``allow_test_selection: true`` (then every output says so). ``num_fewshot``, ``seed``
    (lm-eval's ``fewshot_random_seed``; it also draws dev documents), ``metric`` (lm-eval's
    ``"metric,filter"``), ``max_gen_toks``: see :class:`tl_transplant.harness.HarnessSpec`.
    The prompts, few-shot contexts, stop sequences, answer extraction and metric are
    lm-eval's; the per-document results feed the paired statistics like any task's.
    """

    lm_eval: str
    #: How results name it (default: the lm-eval task name); two entries of one lm-eval task
    #: (e.g. the same benchmark as task and, with another metric, as control) need two names.
    name: str | None = None
    include_path: str | list[str] | None = None
    include_defaults: bool | None = None
    dev: dict[str, Any] | str | None = None
    test: dict[str, Any] | str | None = None
    num_fewshot: int | None = None
    allow_test_selection: bool = False
    seed: int = 1234
    metric: str | None = None
    max_gen_toks: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        """lm-eval-free checks with the harness's messages (limits, keys, types)."""
        from tl_transplant.harness.errors import HarnessError
        from tl_transplant.harness.spec import HarnessSpec

        if isinstance(data, dict):
            _require_lm_eval_installed()
            name = data.get("name")
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise ValueError(f"name must be a non-empty string (got {name!r:.80})")
            try:
                HarnessSpec.from_dict({k: v for k, v in data.items() if k != "name"},
                                      check_paths=False)
            except HarnessError as e:
                raise ValueError(str(e)) from None
        return data

    def spec_dict(self) -> dict[str, Any]:
        """The harness's mapping (:meth:`tl_transplant.harness.HarnessSpec.from_dict`)."""
        return self.model_dump(exclude_none=True, exclude={"name"})

    def spec(self) -> Any:
        """The :class:`~tl_transplant.harness.HarnessSpec` (include_path folders checked)."""
        from tl_transplant.harness.spec import HarnessSpec

        return HarnessSpec.from_dict(self.spec_dict())

    @property
    def label(self) -> str:
        return self.name or self.lm_eval

    def input_paths(self) -> list[str]:
        """The local files and folders this task reads."""
        inc = self.include_path
        return [] if inc is None else [inc] if isinstance(inc, str) else list(inc)


def _task_kind(v: Any) -> str:
    if isinstance(v, LmEvalTaskConfig) or (isinstance(v, dict) and "lm_eval" in v):
        return "lm_eval_task"
    return "file_task"


#: A run's task or control task: a file/dataset task, or an lm-eval task (``lm_eval:`` key).
AnyTaskConfig = Annotated[
    Annotated[TaskConfig, Tag("file_task")] | Annotated[LmEvalTaskConfig, Tag("lm_eval_task")],
    Discriminator(_task_kind),
]
_UNION_TAGS = ("file_task", "lm_eval_task")


def _base(name: str) -> str:
    """A method name without its grain suffix (``attribution@weight`` -> ``attribution``)."""
    return name.removesuffix(f"@{WEIGHT}").removesuffix("@unit")


@dataclass(frozen=True)
class MethodRun:
    """One scorer at one grain: ``label`` names it in results (``attribution``,
    ``attribution@weight``; weight-only scorers such as ``magnitude`` keep their name)."""

    label: str
    method: str
    #: ``"unit"`` (the unit kinds of :meth:`SelectionConfig.kinds_for`), ``"weight"``
    #: (single weights, ``score(..., units="weight")``) or ``"dense"`` (every block weight).
    grain: str


class SelectionConfig(_Strict):
    """Which scorers rank units (and single weights), which controls to report.

    ``units`` lists unit kinds and/or ``weight``. A method runs at the unit grain when it
    scores some listed unit kind, and at the weight grain when it scores weights and
    ``weight`` is listed (:meth:`runs`); ``name@weight`` (``name@unit``) asks for the
    weight (unit) grain only. A weight-level control (``magnitude``, ``dare``,
    ``random@weight``) is allowed whatever ``units`` lists: it is a baseline.
    ``dense`` runs once whatever the units. ``cv_folds``: folds of the cross-validated
    selection estimate on dev.
    """

    methods: list[str] = Field(default_factory=lambda: ["attribution", "activation_diff"])
    units: list[str] = Field(default_factory=lambda: ["head", "neuron"])
    controls: list[str] = Field(default_factory=lambda: ["random"])
    contrast_lambda: StrictFloat | None = Field(
        None, description="retention-aware scoring: penalise by lam x score on the first control"
    )
    #: Per-method scorer options, e.g. ``{learned_mask: {steps: 100}}``; validated
    #: against each scorer's typed ``Options`` here, before any model loads.
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cv_folds: StrictInt = Field(5, ge=2, le=100)

    @field_validator("methods", "controls", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> list[str]:
        from tl_transplant.scoring import available_methods

        ok = available_methods()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"give a list of scoring methods (got {v!r}); valid: {', '.join(ok)}")
        for m in items:
            base = _base(m) if isinstance(m, str) else m
            if not isinstance(m, str) or base not in ok:
                raise ValueError(f"unknown scoring method {m!r}; valid: {', '.join(ok)} "
                                 f"(add @{WEIGHT} or @unit for one grain only)")
        return list(dict.fromkeys(items))

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, v: Any) -> list[str]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(
                f"give at least one unit kind: head, kv_head, neuron, linear, or weight "
                f"(single weights) (got {v!r})"
            )
        names = [str(x).strip().lower() for x in items]
        grains = [WEIGHT if n in (WEIGHT, "weights") else n for n in names]
        try:
            kinds = list(normalize_kinds([g for g in grains if g != WEIGHT]))
        except ValueError as e:
            raise ValueError(f"{e}, or weight (single weights)") from None
        return kinds + ([WEIGHT] if WEIGHT in grains else [])

    @property
    def unit_kinds(self) -> list[str]:
        """The listed unit kinds (``weight`` left out)."""
        return [k for k in self.units if k != WEIGHT]

    @model_validator(mode="after")
    def _nonempty(self) -> SelectionConfig:
        if not self.methods:
            raise ValueError("methods: give at least one scoring method")
        for key in ("methods", "controls"):
            for m in getattr(self, key):
                if not self._runs_of(m, control=key == "controls"):
                    raise ValueError(f"{key}: {self._why_none(m)}")
        return self

    def _runs_of(self, name: str, *, control: bool = False) -> list[MethodRun]:
        from tl_transplant.scoring import get_scorer

        only_weight, only_unit = name.endswith(f"@{WEIGHT}"), name.endswith("@unit")
        method = _base(name)
        cls = get_scorer(method)
        if getattr(cls, "grain", None) == "dense":
            return [MethodRun(method, method, "dense")]
        out = []
        if cls.unit_level and not only_weight and self.kinds_for(method):
            out.append(MethodRun(method, method, "unit"))
        # A control may be weight-level whatever ``units`` lists when it can only be one
        # (magnitude, dare) or is asked as ``name@weight``: a baseline, not a search grain.
        weights_ok = WEIGHT in self.units or (control and (only_weight or not cls.unit_level))
        if cls.weight_level and weights_ok and not only_unit:
            label = f"{method}@{WEIGHT}" if cls.unit_level else method
            out.append(MethodRun(label, method, WEIGHT))
        return out

    def _why_none(self, name: str) -> str:
        from tl_transplant.scoring import get_scorer

        method = _base(name)
        cls = get_scorer(method)
        listed = ", ".join(self.units)
        if name.endswith("@unit") and not cls.unit_level:
            return f"{method!r} scores single weights only; write {method!r}, not {name!r}"
        if name.endswith(f"@{WEIGHT}") or not cls.unit_level:
            if not cls.weight_level:
                return f"{method!r} cannot score single weights; drop {name!r}"
            what = ("scores single weights only" if not cls.unit_level
                    else "is asked at the weight grain")
            return (f"{name!r} {what}, and weight is not among selection.units ({listed}); "
                    f"add weight to units or drop {name!r}")
        can = ", ".join(cls.kinds) + (", weight" if cls.weight_level else "")
        return (f"{name!r} scores only {can} units, none of selection.units ({listed}); "
                f"add one of {can} to units or drop {name!r}")

    def runs(self, key: Literal["methods", "controls"] = "methods") -> list[MethodRun]:
        """Every (label, scorer, grain) the listed methods (or controls) run at, in order."""
        out: dict[str, MethodRun] = {}
        for m in getattr(self, key):
            for r in self._runs_of(m, control=key == "controls"):
                out.setdefault(r.label, r)
        return list(out.values())

    @model_validator(mode="after")
    def _options(self) -> SelectionConfig:
        from tl_transplant.scoring import check_options, get_scorer

        used = {_base(m) for m in (*self.methods, *self.controls)}
        for m, opts in self.options.items():
            if m not in used:
                raise ValueError(
                    f"options: {m!r} is not among selection.methods or controls "
                    f"({', '.join(sorted(used))}); add it there or drop its options"
                )
            check_options(get_scorer(m), opts)  # ScoringError (a ValueError) names the fix
        return self

    def kinds_for(self, method: str) -> list[str]:
        """The listed unit kinds that ``method`` can score, in ``units`` order.

        A method scores the intersection of ``units`` with its declared kinds
        (``get_scorer(method).kinds``): ``paper_l1`` with ``units: [head, linear]``
        scores linears only. Validation refuses a method that runs at no grain.
        """
        from tl_transplant.scoring import get_scorer

        kinds = get_scorer(_base(method)).kinds
        return [k for k in self.unit_kinds if k in kinds]


#: ``sweep.k`` when neither ``k`` nor ``budget`` is given.
DEFAULT_K: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


class SweepConfig(_Strict):
    """The (K or parameter budget) x alpha grid, chosen on dev.

    ``budget``: fractions of the block parameters in (0, 1] (``0.01`` = 1%). Budgets
    mean budgets: with ``budget`` given and ``k`` left out, no K rows run
    (:meth:`ks`); an explicit ``k`` runs beside the budgets. ``compare: true``
    evaluates every (method, K or budget) at its best dev alpha on test (the choice
    is still made on dev).
    """

    k: list[int] | None = None
    budget: list[float] = Field(default_factory=list)
    alpha: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    max_retention_drop: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    compare: StrictBool = False

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, v: Any) -> list[int] | None:
        if v is None:
            return None
        if isinstance(v, (list, tuple)) and not v:
            return []  # allowed with a budget; checked in _sizes
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"give a non-empty list of K >= 1 (got {v!r})")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(
                    f"give a non-empty list of K >= 1; each K must be an integer >= 1 "
                    f"(got {x!r})"
                )
        return sorted(set(v))

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, v: Any) -> list[float]:
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"give a non-empty list of alphas in [0, 1] (got {v!r})")
        for a in v:
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise ValueError(f"each alpha must be a number in [0, 1] (got {a!r})")
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"each alpha must be in [0, 1] (got {a})")
        return sorted({float(a) for a in v})

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> list[float]:
        hint = "give a list of fractions of the block parameters in (0, 1], e.g. [0.01, 0.05]"
        items = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{hint} (got {v!r:.80})")
        for b in items:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ValueError(f"{hint}; each budget must be a number (got {b!r:.80})")
            if not (0.0 < b <= 1.0):
                raise ValueError(
                    f"{hint}; each budget must be in (0, 1] (got {b}); write 1% as 0.01"
                )
        return sorted({float(b) for b in items})

    @model_validator(mode="after")
    def _sizes(self) -> SweepConfig:
        if self.k is not None and not self.k and not self.budget:
            raise ValueError(
                "k: give a non-empty list of K >= 1, or a budget list (sweep.budget)"
            )
        return self

    def ks(self) -> list[int]:
        """The unit counts to sweep: ``k`` as given; left out, :data:`DEFAULT_K` without a
        budget and none with one (budgets mean budgets)."""
        if self.k is None:
            return [] if self.budget else list(DEFAULT_K)
        return list(self.k)


class RunConfig(_Strict):
    """A whole run: pair, task, controls, selection, sweep, seed, export."""

    source: str
    target: str
    task: AnyTaskConfig
    control_tasks: list[AnyTaskConfig] = Field(default_factory=list)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    seed: StrictInt = 0
    export: StrictBool = True
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    batch_size: StrictInt = Field(16, ge=1)
    name: str | None = None
    #: ``auto``: without control_tasks, measure retention on the generic proxy
    #: (:func:`tl_transplant.evaluation.generic.generic_retention`); ``none``: no retention at all.
    retention: str = "auto"

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> str:
        if v not in RETENTION_MODES:
            raise ValueError(
                f"must be one of {', '.join(RETENTION_MODES)} (got {v!r:.80}): auto = a generic "
                "retention proxy when no control_tasks are given, none = no retention"
            )
        return str(v)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: Any) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _weights_need_budgets(self) -> RunConfig:
        grains = {r.grain for r in self.selection.runs()}
        if WEIGHT in grains and not self.sweep.budget and grains <= {WEIGHT, "dense"}:
            raise ValueError(
                "sweep.budget: single weights are ranked by parameter budget, not by K; give "
                "sweep.budget (e.g. [0.0001, 0.001, 0.01]) for units: [weight]"
            )
        return self

    def resolve_paths(self, base: Path) -> RunConfig:
        """Make relative task paths relative to the config file's folder."""

        def fix(p: str | None, key: str) -> str | None:
            """Local paths become absolute; a hub dataset name (``org/name``) stays as is."""
            if p is None:
                return None
            try:
                q = Path(p).expanduser()
            except RuntimeError:  # "~user" for a user this machine does not know
                raise ConfigError(
                    f"invalid config: {key}: cannot expand {p!r}: no such user's home "
                    "directory; give an absolute path"
                ) from None
            if q.is_absolute():
                return str(q)
            local = (
                p.startswith((".", "~"))
                or (base / q).exists()
                or q.suffix.lower() in _FORMATS
            )
            return str(base / q) if local else p

        def fix_task(t: TaskConfig | LmEvalTaskConfig, key: str
                     ) -> TaskConfig | LmEvalTaskConfig:
            if isinstance(t, LmEvalTaskConfig):
                return fix_lm_eval(t, key)
            return t.model_copy(update={
                "path": fix(t.path, f"{key}.path"),
                "test_path": fix(t.test_path, f"{key}.test_path"),
            })

        def fix_lm_eval(t: LmEvalTaskConfig, key: str) -> LmEvalTaskConfig:
            """include_path folders relative to the config file, and they must exist."""
            if t.include_path is None:
                return t
            fixed = [fix(p, f"{key}.include_path") or p for p in t.input_paths()]
            for p in fixed:
                if not Path(p).is_dir():
                    raise ConfigError(
                        f"invalid config: {key}.include_path: folder {p!r} does not exist "
                        "(give lm-eval task YAMLs' folder, relative to the config file)"
                    )
            inc = fixed[0] if isinstance(t.include_path, str) else fixed
            return t.model_copy(update={"include_path": inc})

        local = {}
        for key in ("source", "target"):
            v = getattr(self, key)
            if v.startswith((".", "~")) or (base / v).is_dir():
                local[key] = fix(v, key)
        return self.model_copy(update={
            **local,
            "task": fix_task(self.task, "task"),
            "control_tasks": [
                fix_task(t, f"control_tasks.{i}") for i, t in enumerate(self.control_tasks)
            ],
        })


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if x not in _UNION_TAGS) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if not err["msg"].startswith("Value error, ") and "input" in err:
            msg = f"{msg} (got {err['input']!r:.80})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (see the config reference in README.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(lines)


def _merge(data: dict[Any, Any], overrides: dict[str, Any]) -> dict[Any, Any]:
    """``data`` with ``overrides`` applied (one level deep into mappings such as sweep)."""
    out = dict(data)
    for k, v in overrides.items():
        old = out.get(k)
        out[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
    return out


def load_config(
    cfg: str | Path | dict[str, Any] | RunConfig, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Validate a dict, a YAML/JSON path, or a RunConfig; raise :class:`ConfigError`.

    ``overrides`` (e.g. ``{"sweep": {"budget": [0.01]}, "retention": "none"}``, what the
    CLI's flags give) replace keys before validation, so their errors name the key too.
    """
    if isinstance(cfg, RunConfig):
        if not overrides:
            return cfg
        cfg = cfg.model_dump()
    base = Path.cwd()
    if isinstance(cfg, (str, Path)):
        import yaml

        path = Path(cfg).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_message(path, e)) from None
        except RecursionError:
            raise ConfigError(f"{path} is not valid YAML: nested too deeply") from None
        base = path.resolve().parent
    else:
        data = cfg
    if not isinstance(data, dict):
        raise ConfigError("invalid config: the top level must be a mapping of keys to values")
    if overrides:
        data = _merge(data, overrides)
    try:
        rc = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    return rc.resolve_paths(base)


def _yaml_message(path: Path, e: Exception) -> str:
    """``config.yaml:3:7: is not valid YAML: <problem> (<context>)`` with 1-based line:column."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    detail = problem or str(e)
    if context:
        detail = f"{detail} ({context})"
    return f"{where}: is not valid YAML: {detail}"
