"""The scorer registry: the :class:`Scorer` base class, typed options, and plugin loading.

A scorer subclasses :class:`Scorer`, declares its keyword options as a nested
``Options`` model (a :class:`ScorerOptions` subclass, i.e. pydantic), implements
:meth:`Scorer.run` and is decorated with :func:`register`. Built-in scorers are
the modules of this package; third-party ones are found through the entry point
group :data:`ENTRY_POINT_GROUP` (``tl_transplant.scorers``; entry point name =
method name, value = the module that registers it or the class itself), loaded
only when asked for by name.
"""

from __future__ import annotations

import importlib.metadata as _md
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, cast

import annotated_types
import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from tl_transplant.arch.units import UNIT_KINDS, Unit, UnitError, UnitKind, parse_units
from tl_transplant.edit.budget import BudgetRule, check_rule
from tl_transplant.edit.weights import WeightMask
from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from tl_transplant.scoring.data import Context, ScoringData

#: Entry point group through which installed packages add scorers.
ENTRY_POINT_GROUP = "tl_transplant.scorers"


class ScoringError(TLTransplantError, ValueError):
    """A scoring request that cannot be carried out (bad method, units, data or option)."""


class ScorerOptions(BaseModel):
    """Base of every scorer's ``Options``: strict types, unknown names rejected, immutable.

    Strict means no silent coercion: ``"3"`` or ``True`` is not an int.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


#: ``alpha_scale`` of a method whose alpha the sweep multiplies by block params / params
#: moved (DARE's 1/p): an extrapolating control.
INVERSE_FRACTION = "inverse_fraction"
AlphaScale: TypeAlias = Literal["inverse_fraction"]


def _rule(meta: Mapping[str, Any], given: str | None, who: str) -> BudgetRule | None:
    """The fill rule: ``given``, else ``meta["budget_rule"]`` (how scorers said it before the
    typed field), checked; None when neither says."""
    rule = given if given is not None else meta.get("budget_rule")
    if rule is None:
        return None
    try:
        return check_rule(rule)
    except ValueError as e:
        raise ScoringError(f"{who}: {e}") from None


def _alpha_scale(meta: Mapping[str, Any], given: str | None, who: str) -> AlphaScale | None:
    scale = given if given is not None else meta.get("alpha_scale")
    if scale is not None and scale != INVERSE_FRACTION:
        raise ScoringError(f"{who}: alpha_scale must be {INVERSE_FRACTION!r} or None, got "
                           f"{scale!r}")
    return cast("AlphaScale | None", scale)


def _dense_alphas(meta: Mapping[str, Any], given: Sequence[float] | None) -> list[float] | None:
    if given is not None:
        return sorted({float(a) for a in given})
    if meta.get("dense"):
        got = meta.get("alphas")
        if not got:
            raise ScoringError("a dense method's scores need its own alpha grid "
                               "(dense_alphas, or meta['alphas'])")
        return sorted({float(a) for a in got})
    return None


@dataclass
class RawScores:
    """What a scorer returns: one value per unit, in the order of the units it was given.

    The typed fields say how the sweep uses the scores: ``budget_rule`` (how a parameter
    budget is filled, :mod:`tl_transplant.edit.budget`; None = ``"per_param"``),
    ``suggested`` (the scorer's own unit set, e.g. learned_mask's gates > 0.5),
    ``alpha_scale`` and ``dense_alphas`` (the ``dense`` baseline: every block weight at
    its own alpha grid). A scorer may still set them as ``meta`` keys (``"budget_rule"``,
    ``"suggested"``, ``"alpha_scale"``, ``"dense"`` + ``"alphas"``), as before 0.2: they
    are read into the fields here. :meth:`meta_record` is ``meta`` with the fields
    written in (what a scores file records).
    """

    values: Float[torch.Tensor, " n"]
    consistency: Float[torch.Tensor, " n"] | None = None
    columns: dict[str, Float[torch.Tensor, " n"]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    budget_rule: BudgetRule | None = None
    suggested: list[Unit] | None = None
    alpha_scale: AlphaScale | None = None
    dense_alphas: list[float] | None = None

    def __post_init__(self) -> None:
        self.budget_rule = _rule(self.meta, self.budget_rule, "RawScores")
        self.alpha_scale = _alpha_scale(self.meta, self.alpha_scale, "RawScores")
        self.dense_alphas = _dense_alphas(self.meta, self.dense_alphas)
        sugg: Any = self.suggested if self.suggested is not None else self.meta.get("suggested")
        if sugg is not None:
            try:
                self.suggested = parse_units(list(sugg))
            except (UnitError, TypeError) as e:
                raise ScoringError(f"RawScores: suggested must be a list of units: {e}") from None

    def meta_record(self) -> dict[str, Any]:
        """``meta`` with the typed fields written in under their old keys (for files)."""
        return traits_meta(self.meta, budget_rule=self.budget_rule, alpha_scale=self.alpha_scale,
                       suggested=None if self.suggested is None
                       else [str(u) for u in self.suggested],
                       dense_alphas=self.dense_alphas)


def traits_meta(meta: Mapping[str, Any], *, budget_rule: str | None, alpha_scale: str | None,
                suggested: Any, dense_alphas: list[float] | None) -> dict[str, Any]:
    """``meta`` with the typed fields written under the keys scorers used before 0.2 (a key
    already there is kept): what a scores file records, so it reloads the same."""
    out = dict(meta)
    if budget_rule is not None:
        out.setdefault("budget_rule", budget_rule)
    if alpha_scale is not None:
        out.setdefault("alpha_scale", alpha_scale)
    if suggested is not None:
        out.setdefault("suggested", suggested)
    if dense_alphas is not None:
        out.setdefault("dense", True)
        out.setdefault("alphas", list(dense_alphas))
    return out


@dataclass
class WeightRawScores:
    """What a weight-level scorer returns: one score tensor per HF tensor (its shape).

    Typed fields as :class:`RawScores`: ``budget_rule``, ``alpha_scale`` (DARE) and
    ``suggested``, here a :class:`~tl_transplant.edit.weights.WeightMask` (the scorer's own
    weight set, ``WeightScores.suggested``); the same ``meta`` keys are still read.
    """

    values: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    budget_rule: BudgetRule | None = None
    suggested: WeightMask | None = None
    alpha_scale: AlphaScale | None = None

    def __post_init__(self) -> None:
        self.budget_rule = _rule(self.meta, self.budget_rule, "WeightRawScores")
        self.alpha_scale = _alpha_scale(self.meta, self.alpha_scale, "WeightRawScores")
        sugg = self.suggested if self.suggested is not None else self.meta.get("suggested")
        if sugg is not None and not isinstance(sugg, WeightMask):
            raise ScoringError("a weight-level suggested set must be a WeightMask")
        self.suggested = sugg


class Scorer:
    """Base class. Subclasses set the class attributes and implement :meth:`run`
    (and :meth:`run_weights` when ``weight_level``).

    ``self.ctx`` is the run's :class:`~tl_transplant.scoring.data.Context` (pair,
    batching, hooks, metric, ``seed``); ``self.opts`` the validated ``Options``.
    """

    name: ClassVar[str] = ""
    #: Unit kinds this scorer can score, and the ones it scores when ``units=None``.
    kinds: ClassVar[tuple[UnitKind, ...]] = UNIT_KINDS
    default_kinds: ClassVar[tuple[UnitKind, ...]] = ("head", "neuron")
    needs_data: ClassVar[bool] = True
    needs_answers: ClassVar[bool] = False
    #: Signed scores (positive = the transplant should help) vs magnitudes.
    signed: ClassVar[bool] = False
    #: Whether the scorer also scores individual weights (``units="weight"``,
    #: :meth:`run_weights`); see :mod:`tl_transplant.edit.weights`.
    weight_level: ClassVar[bool] = False
    #: Whether it scores units at all (False for weight-only scorers such as ``magnitude``).
    unit_level: ClassVar[bool] = True
    #: The scorer's keyword options (a :class:`ScorerOptions` subclass); none by default.
    Options: ClassVar[type[BaseModel]] = ScorerOptions
    #: Option name -> default, filled in by :func:`register` (read-only introspection).
    options: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})

    def __init__(self, ctx: Context, opts: BaseModel | None = None) -> None:
        self.ctx = ctx
        self.opts: Any = opts if opts is not None else self.Options()

    def check(self) -> None:
        """Cross-option checks before any model runs (single options are typed in ``Options``)."""

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        raise NotImplementedError

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        """Score every weight of the block linears (``layout.unit_tensors()``)."""
        raise NotImplementedError

    def combine_weights(
        self, task: WeightRawScores, contrast: WeightRawScores, lam: float
    ) -> WeightRawScores:
        """Retention-aware weight scores: ``task - lam * contrast``, tensor by tensor."""
        vals = {n: v - lam * contrast.values[n] for n, v in task.values.items()}
        return replace(task, values=vals, meta=dict(task.meta))

    def combine(self, task: RawScores, contrast: RawScores, lam: float) -> RawScores:
        """Retention-aware score: ``task - lam * contrast`` (consistency from the task)."""
        cols = {f"{k}_task": v for k, v in task.columns.items()}
        cols.update({f"{k}_contrast": v for k, v in contrast.columns.items()})
        cols["score_task"] = task.values
        cols["score_contrast"] = contrast.values
        return replace(task, values=task.values - lam * contrast.values, columns=cols)


# ---- registry -------------------------------------------------------------------------

SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available to :func:`~tl_transplant.scoring.score`."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    if SCORERS.get(cls.name, cls) is not cls:
        raise TypeError(f"two scorers are named {cls.name!r}")
    opts = getattr(cls, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
        raise TypeError(f"{cls.__name__}.Options must be a pydantic model (subclass ScorerOptions)")
    try:
        defaults = opts()
    except ValidationError as e:
        raise TypeError(f"{cls.__name__}.Options needs a default for every option: {e}") from None
    cls.options = types.MappingProxyType(dict(defaults))
    SCORERS[cls.name] = cls
    return cls


def _plugins() -> dict[str, _md.EntryPoint]:
    """Installed scorer entry points by name (re-read each call: cheap, and sys.path may change)."""
    return {ep.name: ep for ep in _md.entry_points(group=ENTRY_POINT_GROUP)}


def _load_plugin(ep: _md.EntryPoint) -> None:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
    where = f"scorer plugin {ep.name!r} (entry point {ep.value!r} of {dist})"
    try:
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Scorer) and obj.name == ep.name:
            register(obj)
    except Exception as e:
        raise ScoringError(f"{where} failed to load: {type(e).__name__}: {e}") from e
    if ep.name not in SCORERS:
        raise ScoringError(
            f"{where} loaded but registered no scorer named {ep.name!r}; its entry point must "
            "name a module that @register-s it, or the Scorer class itself"
        )


def available_methods() -> list[str]:
    """Names of the registered scoring methods, including installed (not yet loaded) plugins."""
    return sorted(set(SCORERS) | set(_plugins()))


def get_scorer(method: str) -> type[Scorer]:
    """The scorer class registered as ``method`` (loading its plugin), or a clear error."""
    if isinstance(method, str) and method not in SCORERS:
        ep = _plugins().get(method)
        if ep is not None:
            _load_plugin(ep)
    if not isinstance(method, str) or method not in SCORERS:
        raise ScoringError(
            f"unknown scoring method {method!r}; valid methods are: "
            + ", ".join(available_methods())
        )
    return SCORERS[method]


# ---- options --------------------------------------------------------------------------


def _constraints(text: str, metadata: Iterable[Any]) -> str:
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                text += f" {op} {getattr(m, attr)}"
        if getattr(m, "allow_inf_nan", None) is False:
            text = text.replace("a number", "a finite number")
        # pydantic's Field(...) inside a union keeps its constraints in its own metadata
        if isinstance(m, FieldInfo):
            text = _constraints(text, m.metadata)
    return text


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return _constraints(_type_text(base), meta)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if tp is bool:
        return "True or False"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "None"
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if typing.get_origin(tp) is list:
        return "a list"
    return getattr(tp, "__name__", repr(tp))


def describe_option(info: FieldInfo) -> str:
    """What an option allows, in words (``"an int >= 0"``, ``"one of last, answer, all"``);
    an option with a ``Field(description=...)`` is described by that text."""
    if info.description:
        return info.description
    return _constraints(_type_text(info.annotation), info.metadata)


def option_help(scorer: type[Scorer]) -> str:
    """``name (allowed, default ...)`` for each option of ``scorer``, or ``none``."""
    fields = scorer.Options.model_fields
    if not fields:
        return "none"
    return "; ".join(
        f"{n} ({describe_option(f)}, default {f.default!r})" for n, f in sorted(fields.items())
    )


def check_options(scorer: type[Scorer], options: Mapping[str, Any]) -> BaseModel:
    """Validate user options against ``scorer.Options``: a ScoringError names what is wrong."""
    fields = scorer.Options.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ScoringError(
            f"{scorer.name} does not take option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(fields)) or 'none'}"
            + (f" [{option_help(scorer)}]" if fields else "")
            + " (batch_size, seed, metric, contrast, lam, prepend_bos and progress are "
            "arguments of score() itself)"
        )
    try:
        return scorer.Options(**options)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "?"
        allowed = describe_option(fields[name]) if name in fields else option_help(scorer)
        raise ScoringError(
            f"{scorer.name}: option {name}={options.get(name)!r} is invalid ({err['msg']}); "
            f"{name} must be {allowed}"
        ) from None


__all__ = [
    "ENTRY_POINT_GROUP",
    "INVERSE_FRACTION",
    "SCORERS",
    "AlphaScale",
    "RawScores",
    "Scorer",
    "ScorerOptions",
    "ScoringError",
    "WeightRawScores",
    "available_methods",
    "check_options",
    "describe_option",
    "get_scorer",
    "option_help",
    "register",
    "traits_meta",
]
