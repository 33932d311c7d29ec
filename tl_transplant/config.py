"""The run configuration (``tl-transplant run CONFIG.yaml``), validated with pydantic.

Every error names the key and what is allowed, e.g.
``sweep.alpha: each alpha must be in [0, 1] (got 1.5)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tl_transplant.tasks import METRICS
from tl_transplant.units import normalize_kinds


class ConfigError(ValueError):
    """A malformed run configuration; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Strict):
    """A task from a local JSONL/CSV/parquet file (read with ``datasets``)."""

    path: str
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    metric: Literal["next_token_acc", "answer_logprob", "logit_diff", "exact_match"] = (
        "next_token_acc"
    )
    max_new_tokens: int = Field(16, ge=1, le=4096)
    prepend_bos: bool | Literal["auto"] = "auto"
    test_path: str | None = None
    dev_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    name: str | None = None
    wrong_field: str = "wrong_answers"
    limit: int | None = Field(None, ge=1)

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, v: Any) -> Any:
        if v not in METRICS:
            raise ValueError(f"must be one of {', '.join(METRICS)} (got {v!r})")
        return v


class SelectionConfig(_Strict):
    """Which scorers rank units, over which unit kinds; which controls to report."""

    methods: list[str] = Field(default_factory=lambda: ["attribution", "activation_diff"])
    units: list[str] = Field(default_factory=lambda: ["head", "neuron"])
    controls: list[str] = Field(default_factory=lambda: ["random"])
    contrast_lambda: float | None = Field(
        None, description="retention-aware scoring: penalise by lam x score on the first control"
    )

    @field_validator("methods", "controls")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from tl_transplant.scoring import available_methods

        ok = available_methods()
        for m in v:
            if m not in ok:
                raise ValueError(f"unknown scoring method {m!r}; valid: {', '.join(ok)}")
        return v

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, v: Any) -> list[str]:
        items = [v] if isinstance(v, str) else list(v)
        try:
            return list(normalize_kinds(items))
        except ValueError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _nonempty(self) -> SelectionConfig:
        if not self.methods:
            raise ValueError("methods: give at least one scoring method")
        return self


class SweepConfig(_Strict):
    """The K x alpha grid, chosen on dev."""

    k: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    alpha: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    max_retention_drop: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError(f"give a non-empty list of K >= 1 (got {v})")
        return sorted(set(v))

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give a non-empty list of alphas")
        for a in v:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"each alpha must be in [0, 1] (got {a})")
        return sorted(set(v))


class RunConfig(_Strict):
    """A whole run: pair, task, controls, selection, sweep, seed, export."""

    source: str
    target: str
    task: TaskConfig
    control_tasks: list[TaskConfig] = Field(default_factory=list)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    seed: int = 0
    export: bool = True
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    batch_size: int = Field(16, ge=1)
    name: str | None = None

    def resolve_paths(self, base: Path) -> RunConfig:
        """Make relative task paths relative to the config file's folder."""

        def fix(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q))

        def fix_task(t: TaskConfig) -> TaskConfig:
            return t.model_copy(update={"path": fix(t.path), "test_path": fix(t.test_path)})

        local = {}
        for key in ("source", "target"):
            v = getattr(self, key)
            if v.startswith((".", "~")) or (base / v).is_dir():
                local[key] = fix(v)
        return self.model_copy(update={
            **local,
            "task": fix_task(self.task),
            "control_tasks": [fix_task(t) for t in self.control_tasks],
        })


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (see the config reference in README.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(lines)


def load_config(cfg: str | Path | dict[str, Any] | RunConfig) -> RunConfig:
    """Validate a dict, a YAML/JSON path, or a RunConfig; raise :class:`ConfigError`."""
    if isinstance(cfg, RunConfig):
        return cfg
    base = Path.cwd()
    if isinstance(cfg, (str, Path)):
        import yaml

        path = Path(cfg).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        base = path.resolve().parent
    else:
        data = cfg
    if not isinstance(data, dict):
        raise ConfigError("invalid config: the top level must be a mapping of keys to values")
    try:
        rc = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    return rc.resolve_paths(base)
