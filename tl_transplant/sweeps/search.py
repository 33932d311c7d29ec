"""The search space of a sweep: which (method, size, alpha) configurations are evaluated.

A *method* is a scores object under a label (``{"attribution": scores}``). Its *grain*
says what it ranks and so which sizes it gets (:func:`grain_of`):

* ``"unit"`` (heads, KV groups, neurons, linears): top-K rows, one row per parameter
  budget (filled by its ``within_budget``), and its suggested set (``Scores.suggested``);
* ``"weight"`` (:class:`~tl_transplant.edit.weights.WeightScores`): budget rows only (each a
  :class:`~tl_transplant.edit.weights.WeightMask`; weights have no K) and its suggested mask
  (``WeightScores.suggested``);
* ``"dense"`` (the ``dense`` scorer, ``Scores.grain == "dense"``): one size, every block
  weight, at its own alpha grid (``Scores.dense_alphas``), the interpolation baseline.

:func:`plan_search` turns methods x sizes x alphas into :class:`Config` objects; the
sweep evaluates each once on dev (identical (selection, effective alpha) pairs share one
evaluation, :func:`selection_key`). A scorer's own size (suggested set, dense) is shown
but *selectable* only within the largest budget asked for (:attr:`Config.over_budget`);
with no budget asked, it is selectable. A method whose ``alpha_scale`` is
``"inverse_fraction"`` (DARE) moves its weights at ``alpha x block_params / n_params``:
an extrapolating control, labelled so.

These traits are typed attributes of the scores objects
(:class:`~tl_transplant.scoring.scores.Scores`,
:class:`~tl_transplant.scoring.weight_scores.WeightScores`); a plain ranking without them
is a unit ranking with none of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast, runtime_checkable

from tl_transplant.arch.units import Unit, normalize_kinds, parse_units
from tl_transplant.edit.budget import block_params, count_params, fill_budget
from tl_transplant.edit.weights import WEIGHT, WeightMask
from tl_transplant.errors import TLTransplantError
from tl_transplant.scoring.registry import INVERSE_FRACTION
from tl_transplant.tasks.task import Task, warn_shared_prompts

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.evaluation.evaluator import UnitsLike

#: Unit kinds as :func:`~tl_transplant.arch.units.normalize_kinds` takes them (None: all).
Kinds: TypeAlias = "str | Iterable[str] | None"
#: What a transplant moves in one configuration: units, or a weight mask.
Chosen: TypeAlias = "list[Unit] | WeightMask"

GRAIN_UNIT, GRAIN_WEIGHT, GRAIN_DENSE = "unit", WEIGHT, "dense"
#: ``sweep(ks=None)`` without budgets: these unit counts.
DEFAULT_KS: tuple[int, ...] = (8, 16, 32, 64, 128)
EXTRAPOLATING = "extrapolating control: alpha x block params / params moved (DARE's 1/p)"


class SweepError(TLTransplantError, ValueError):
    """A sweep that cannot run as asked (no size or alpha, clashing task names, a control
    that is not a method, ...)."""


@runtime_checkable
class RankedSource(Protocol):
    """What a sweep needs of a scores object (a :class:`~tl_transplant.Scores` is one)."""

    def top(self, k: int, kinds: Kinds = None) -> Sequence[Unit | str]: ...


@runtime_checkable
class HasSplits(Protocol):
    """Given dev/test splits of a task (e.g. the zoo's ``Splits``)."""

    @property
    def dev(self) -> Task: ...

    @property
    def test(self) -> Task: ...


#: A task to split here, its given splits, or a ``(dev, test)`` tuple.
TaskLike: TypeAlias = "Task | HasSplits | tuple[Task, Task] | list[Task]"
#: ``scores`` as :func:`~tl_transplant.sweeps.protocol.sweep` takes it.
ScoresLike: TypeAlias = (
    "RankedSource | Sequence[RankedSource] | UnitsLike "
    "| Mapping[str, RankedSource | Sequence[Unit | str] | str]"
)


class RankedUnits:
    """A plain ranked list of units as a scores object: ``top(k, kinds)`` filters then cuts."""

    def __init__(self, units: UnitsLike, method: str = "ranked") -> None:
        self.units = parse_units(units)
        self.method = method

    def top(self, k: int, kinds: Kinds = None) -> list[Unit]:
        allowed = normalize_kinds(kinds)
        return [u for u in self.units if u.kind in allowed][: int(k)]

    def within_budget(
        self, fraction: float, layout: ModelLayout, kinds: Kinds = None, kv: str = "group"
    ) -> list[Unit]:
        """Walk the ranking, keep each unit that still fits (a plain ranking: rule "score")."""
        return fill_budget(self.top(len(self.units), kinds), layout, fraction, rule="score",
                           kv=kv).units

    def __repr__(self) -> str:
        return f"RankedUnits({self.method!r}, n={len(self.units)})"


def _is_unit_like(x: object) -> bool:
    return isinstance(x, str) or hasattr(x, "kind") and hasattr(x, "layer")


def normalize_methods(scores: ScoresLike) -> list[tuple[str, RankedSource]]:
    """Normalize ``scores`` to ``[(label, object with .top)]`` (labels made distinct)."""
    if isinstance(scores, Mapping):
        items: list[tuple[str | None, Any]] = [(str(k), v) for k, v in scores.items()]
    elif hasattr(scores, "top"):
        items = [(None, scores)]
    elif isinstance(scores, (list, tuple)) and scores and all(hasattr(s, "top") for s in scores):
        items = [(None, s) for s in scores]
    elif isinstance(scores, (str, list, tuple)) and all(
        _is_unit_like(u) for u in ([scores] if isinstance(scores, str) else scores)
    ):
        items = [("ranked", RankedUnits(scores))]
    else:
        raise TypeError(
            "scores must be an object with .top(k, kinds=...), a ranked list of units, a list "
            f"of scores objects or a {{method: scores}} mapping; got {type(scores).__name__}"
        )
    out: list[tuple[str, RankedSource]] = []
    for name, obj in items:
        if isinstance(obj, (list, tuple, str)):
            obj = RankedUnits(obj, method=name or "ranked")
        if not hasattr(obj, "top"):
            raise TypeError(f"scores for method {name!r} has no .top(k)")
        base = name or _default_label(obj)
        label, n = base, 2
        while label in {m for m, _ in out}:
            label, n = f"{base}#{n}", n + 1
        out.append((label, obj))
    return out


def _default_label(obj: object) -> str:
    """A scores object's own name: its method, ``@weight`` added at the weight grain
    (except weight-only scorers such as ``magnitude`` and ``dare``)."""
    name = str(getattr(obj, "method", None) or type(obj).__name__)
    if grain_of(obj) == GRAIN_WEIGHT and not _weight_only(name):
        return f"{name}@{WEIGHT}"
    return name


def _weight_only(method: str) -> bool:
    try:
        from tl_transplant.scoring.registry import SCORERS
    except ImportError:  # pragma: no cover - the registry always imports
        return False
    cls = SCORERS.get(method)
    return cls is not None and not cls.unit_level


def method_label(method: str, grain: str, *, unit_level: bool = True) -> str:
    """The label of a method at a grain: ``attribution``, ``attribution@weight``; a
    weight-only scorer (``unit_level`` False: ``magnitude``, ``dare``) keeps its name."""
    return f"{method}@{WEIGHT}" if grain == GRAIN_WEIGHT and unit_level else method


def split_task(t: TaskLike, dev_fraction: float, seed: int, what: str) -> tuple[str, Task, Task]:
    """``(name, dev, test)`` from a Task (split here) or given splits (.dev/.test, or a pair)."""
    if isinstance(t, Task):
        dev, test = t.split(dev_fraction, seed)
        return t.name, dev, test
    if hasattr(t, "dev") and hasattr(t, "test"):
        given = cast("HasSplits", t)
        dev, test = given.dev, given.test
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        dev, test = t
    else:
        raise TypeError(
            f"{what} must be a Task (split into dev/test here) or its given (dev, test) splits, "
            f"got {type(t).__name__}"
        )
    if not isinstance(dev, Task) or not isinstance(test, Task):
        raise TypeError(f"{what}: dev and test must be Tasks")
    if dev.metric != test.metric:
        raise SweepError(f"{what}: dev uses {dev.metric} but test uses {test.metric}")
    warn_shared_prompts(dev, test, stacklevel=4)
    name = dev.name[: -len(":dev")] if dev.name.endswith(":dev") else dev.name
    return name, dev, test


#: The fewest dev examples K and alpha may be chosen on (``sweep(dev_fraction=0.001)`` on
#: a 100-example task would choose on one); below :data:`FEW_DEV_EXAMPLES` a warning.
MIN_DEV_EXAMPLES = 2
FEW_DEV_EXAMPLES = 8


def check_dev_size(dev: Task, what: str = "task") -> None:
    """Refuse a dev split too small to choose on (:data:`MIN_DEV_EXAMPLES`); warn below
    :data:`FEW_DEV_EXAMPLES` (the choice of K and alpha is then mostly noise)."""
    split = dev.meta.get("split") or {}
    how = f" (dev_fraction={split['dev_fraction']:g})" if "dev_fraction" in split else ""
    if len(dev) < MIN_DEV_EXAMPLES:
        raise SweepError(
            f"{what}: the dev split has {len(dev)} example(s){how}; choosing K and alpha needs "
            f"at least {MIN_DEV_EXAMPLES}. Raise dev_fraction or give more dev examples."
        )
    if len(dev) < FEW_DEV_EXAMPLES:
        warnings.warn(
            f"{what}: K and alpha are chosen on {len(dev)} dev examples{how}; with so few the "
            f"choice is mostly noise. Give {FEW_DEV_EXAMPLES}+ dev examples (raise dev_fraction "
            "or add examples).", UserWarning, stacklevel=3,
        )


# ---- grains -------------------------------------------------------------------------


def grain_of(obj: object) -> str:
    """``"dense"``, ``"weight"`` (weight scores) or ``"unit"``: the object's ``grain``
    (:class:`~tl_transplant.scoring.scores.Scores` and ``WeightScores`` have one; a plain
    ranking is a unit ranking)."""
    grain = getattr(obj, "grain", None)
    return grain if grain in (GRAIN_DENSE, GRAIN_WEIGHT) else GRAIN_UNIT


def alpha_scale_of(obj: object, n_params: int | None, n_block: int | None) -> float:
    """The factor a method's alpha is multiplied by: ``block / n_params`` for a method whose
    ``alpha_scale`` is ``"inverse_fraction"`` (DARE), else 1."""
    if getattr(obj, "alpha_scale", None) != INVERSE_FRACTION:
        return 1.0
    if not n_params or not n_block:
        return 1.0
    return n_block / n_params


def dense_alphas(obj: object) -> list[float]:
    """The dense method's own alpha grid (``dense_alphas``)."""
    got = getattr(obj, "dense_alphas", None)
    if not got:
        raise SweepError("a dense method's scores need their own alpha grid (dense_alphas)")
    return sorted({float(a) for a in got})


def top_units(obj: RankedSource, k: int, kinds: Kinds) -> list[Unit]:
    """The ``k`` best units of a ranking (distinct, parsed)."""
    if k == 0:
        return []
    got = obj.top(k) if kinds is None else obj.top(k, kinds=kinds)
    return list(dict.fromkeys(parse_units(list(got))))


def scored_kinds(obj: object, units: Kinds) -> tuple[str, ...]:
    """The unit kinds a method ranks: ``units`` if given, else what it scored."""
    if units is not None:
        return normalize_kinds(units)
    got = getattr(obj, "kinds", None)
    if got and WEIGHT not in got:
        return normalize_kinds(list(got))
    ranked = getattr(obj, "units", None)
    if ranked:
        return normalize_kinds(sorted({u.kind for u in parse_units(list(ranked))}))
    return normalize_kinds(None)


def budget_units(
    obj: object, fraction: float, layout: ModelLayout, kinds: Kinds, kv: str
) -> list[Unit]:
    """``obj.within_budget`` if it has one; else its ranking walked with the "score" rule."""
    if hasattr(obj, "within_budget"):
        got = obj.within_budget(fraction, layout, kinds=kinds, kv=kv)
    else:
        n = len(layout.units(None))
        rank = cast(RankedSource, obj)
        ranked = rank.top(n) if kinds is None else rank.top(n, kinds=kinds)
        got = fill_budget(list(ranked), layout, fraction, rule="score", kv=kv).units
    return list(dict.fromkeys(parse_units(list(got))))


def suggested_units(obj: object, kinds: Kinds) -> list[Unit] | None:
    """A unit scorer's suggested set (its ``suggested`` units), filtered to ``kinds``."""
    got = getattr(obj, "suggested", None)
    if got is None or isinstance(got, WeightMask):
        return None
    allowed = normalize_kinds(kinds)
    return [u for u in dict.fromkeys(parse_units(list(got))) if u.kind in allowed]


def budget_cap(fraction: float, n_block: int) -> int:
    """The most weights a budget allows (as :func:`~tl_transplant.edit.budget.fill_budget`)."""
    return int(math.floor(fraction * n_block + 1e-9))


def mask_summary(mask: WeightMask, max_tensors: int = 8) -> dict[str, Any]:
    """A compact JSON description of a weight mask (never its indices): count, digest,
    number of tensors, and the ``max_tensors`` tensors with the most selected weights."""
    counts = mask.counts()
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_tensors]
    return {"n_params": mask.n_params, "sha256": mask.sha256, "n_tensors": len(counts),
            "top_tensors": dict(top)}


def selection_key(sel: Chosen, alpha: float) -> tuple[Any, ...]:
    """The evaluation cache key of (selection, effective alpha); the target itself is one key."""
    if not sel or alpha == 0.0:
        return ("target",)
    if isinstance(sel, WeightMask):
        return ("mask", sel.sha256, float(alpha))
    return ("units", frozenset(sel), float(alpha))


# ---- the plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration to evaluate on dev: a method's selection at one size and alpha."""

    method: str
    grain: str
    k: int
    #: The budget fraction, ``"suggested"`` (the scorer's own set), ``"dense"``, or None (K).
    budget: float | str | None
    alpha: float
    selection: Chosen
    n_params: int | None
    pct_units: float | None
    #: Multiplies alpha for this row (DARE: block params / params moved), else 1.
    alpha_scale: float = 1.0
    #: A scorer's own size above the largest budget asked for: shown, never chosen.
    over_budget: bool = False
    #: Evaluated for a control's sake only (dense as a control): not a row of the sweep.
    control_only: bool = False

    @property
    def effective_alpha(self) -> float:
        return self.alpha * self.alpha_scale

    @property
    def key(self) -> tuple[Any, ...]:
        return selection_key(self.selection, self.effective_alpha)


def plan_search(
    methods: Sequence[tuple[str, object]],
    *,
    ks: Sequence[int],
    fracs: Sequence[float],
    alphas: Sequence[float],
    layout: ModelLayout | None,
    units: Kinds,
    kv: str,
    control_only: Iterable[str] = (),
) -> tuple[list[Config], list[str]]:
    """Every (method, size, alpha) configuration, and notes on what was left out.

    Unit methods: K rows, budget rows, suggested set. Weight methods: budget rows and the
    suggested mask (no K). Dense: one size at its own alphas. ``control_only`` labels
    are planned for a control's sake (:attr:`Config.control_only`).
    """
    only = set(control_only)
    n_block = block_params(layout) if layout is not None else None
    cap = budget_cap(max(fracs), n_block) if fracs and n_block is not None else None
    plans: list[Config] = []
    notes: list[str] = []

    def count(sel: Chosen) -> int | None:
        if isinstance(sel, WeightMask):
            return sel.n_params
        if layout is None:
            return None
        return count_params(layout, sel, kv) if sel else 0

    for m, obj in methods:
        grain = grain_of(obj)
        sized: list[tuple[int, float | str | None, Chosen]] = []
        n_kind: int | None = None
        grid = list(alphas)
        if grain == GRAIN_DENSE:
            if layout is None:
                raise TypeError("a dense method needs pair.layout (a ModelPair)")
            sized.append((0, "dense", list(layout.units("linear"))))
            grid = dense_alphas(obj)
        elif grain == GRAIN_WEIGHT:
            if layout is None:
                raise TypeError("weight-level scores need pair.layout (a ModelPair)")
            if ks:
                notes.append(f"{m}: weight-level scores rank single weights, so they get no "
                             "K rows (only budgets and their suggested set)")
            for f in fracs:
                if (why := _budget_buys_nothing(m, f, n_block, 1)) is not None:
                    notes.append(why)
                    continue
                sized.append((0, f, cast(WeightMask, obj.within_budget(  # type: ignore[attr-defined]
                    f, layout, kinds=units, kv=kv))))
            sugg = getattr(obj, "suggested", None)
            if isinstance(sugg, WeightMask):
                sized.append((0, "suggested", sugg))
        else:
            kinds_m = scored_kinds(obj, units)
            n_kind = len(layout.units(kinds_m)) if layout is not None else None
            for k in ks:
                us = top_units(cast(RankedSource, obj), k, units)
                if len(us) < k:
                    notes.append(f"{m}: K={k} asked but only {len(us)} units are ranked")
                sized.append((k, None, us))
            for f in fracs:
                assert layout is not None
                smallest = min((count_params(layout, [kind_units[0]], kv)
                                for kind_units in map(layout.units, kinds_m) if kind_units),
                               default=1)
                if (why := _budget_buys_nothing(m, f, n_block, smallest)) is not None:
                    notes.append(why)
                    continue
                us = budget_units(obj, f, layout, units, kv)
                sized.append((len(us), f, us))
            sugg_u = suggested_units(obj, units)
            if sugg_u is not None:
                sized.append((len(sugg_u), "suggested", sugg_u))
        if grain == GRAIN_WEIGHT and not sized:
            notes.append(f"{m}: no budget was given, so this weight-level method has no row")
        for k, bud, sel in sized:
            n = count(sel)
            over = isinstance(bud, str) and cap is not None and n is not None and n > cap
            pct_u = (None if grain != GRAIN_UNIT or not n_kind
                     else len(cast(list, sel)) / n_kind)
            scale = alpha_scale_of(obj, n, n_block)
            for a in grid:
                plans.append(Config(m, grain, k, bud, float(a), sel, n, pct_u, scale, over,
                                    m in only))
    if not any((p.n_params or 0) > 0 or (isinstance(p.selection, list) and p.selection)
                         for p in plans if not p.control_only):
        raise SweepError("nothing to sweep: " + ("; ".join(notes) or "every size is empty"))
    return plans, notes


def _budget_buys_nothing(method: str, frac: float, n_block: int | None,
                         smallest: int) -> str | None:
    """Why a budget smaller than the smallest unit it could buy has no row (1e-9 of the
    block parameters would be a row with K=0: the target itself), else None."""
    if n_block is None or frac * n_block >= smallest:
        return None
    return (f"{method}: budget {frac:g} is {frac * n_block:.3g} of the {n_block:,} block "
            f"parameters, less than the smallest unit it could buy ({smallest:,} parameters), "
            f"so it has no row; use a budget of at least {smallest / n_block:.2g}")


def resolve_ks(ks: Sequence[int] | None, fracs: Sequence[float]) -> list[int]:
    """``ks`` as given; None means :data:`DEFAULT_KS` unless budgets are given (then none)."""
    if ks is None:
        return [] if fracs else list(DEFAULT_KS)
    return [int(k) for k in ks]


__all__ = [
    "DEFAULT_KS",
    "FEW_DEV_EXAMPLES",
    "MIN_DEV_EXAMPLES",
    "check_dev_size",
    "EXTRAPOLATING",
    "GRAIN_DENSE",
    "INVERSE_FRACTION",
    "GRAIN_UNIT",
    "GRAIN_WEIGHT",
    "Config",
    "HasSplits",
    "Kinds",
    "RankedSource",
    "RankedUnits",
    "ScoresLike",
    "SweepError",
    "TaskLike",
    "alpha_scale_of",
    "budget_units",
    "grain_of",
    "mask_summary",
    "method_label",
    "normalize_methods",
    "plan_search",
    "resolve_ks",
    "scored_kinds",
    "selection_key",
    "split_task",
    "suggested_units",
    "top_units",
]
