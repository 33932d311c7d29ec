"""Parameter budgets: pick units whose distinct weights fit a fraction of the block parameters.

>>> pick = fill_budget(scores.top(len(scores)), pair.layout, 0.01,
...                    values=[scores[u] for u in scores.top(len(scores))])  # doctest: +SKIP
>>> pick.units, pick.n_params, pick.pct_params                              # doctest: +SKIP

Conventions (shared by every scorer and the sweep):

* **Block parameters** = the sum of ``layout.n_params(u)`` over every Linear unit of
  every layer (:func:`block_params`): all weights a unit can touch. Embeddings, norms
  and the LM head are not in it.
* **Cost** of a set of units = its *distinct* weights (:class:`ParamCounter`); with
  ``kv="group"`` each query head brings its KV group along, and that group counts.
  Overlaps (a head inside a whole linear, two heads sharing a KV group) count once,
  exactly as :func:`tl_transplant.edit.edits.plan_transplant` counts ``Plan.n_params``.
* **Fill rules** (``RawScores.meta["budget_rule"]``, default ``"per_param"``):

  - ``"per_param"``: greedy by ``score / cost`` where cost is the unit's own cost
    (with its KV group under ``kv="group"``), best first; units that no longer fit
    are skipped. Only units with a finite score > 0 are candidates: a score <= 0
    predicts no gain (or, for signed scorers, harm), so such a unit is never bought,
    even when budget is left. The pick may then stay under the budget.
  - ``"score"``: walk the ranking in score order (the order given) and add each
    unit that still fits, whatever the sign of its score: for rank-like or gate-like
    scorers (random, iterative, learned masks) and plain ranked lists, whose values
    are ranks rather than gains per weight.

  A unit is added when its *marginal* cost (weights not already covered) fits in
  what is left, so a budget is never exceeded. The number of weights picked never
  decreases as the budget grows (tested), although the unit sets need not be nested.

* **Weight-level selections** (:class:`~tl_transplant.edit.weights.WeightMask`) cost their
  number of weights; :func:`count_params` and :func:`selection_size` take either kind,
  and :func:`budget_cap` is the number of weights a fraction allows (the same floor
  for units and weights), so a unit row and a weight row can be matched in weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from tl_transplant.arch.units import Head, Unit, parse_unit, parse_units
from tl_transplant.edit.weights import WeightMask
from tl_transplant.errors import BudgetError

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.edit.weights import Selection

BudgetRule: TypeAlias = Literal["per_param", "score"]
#: The fill rules a scorer may name in ``meta["budget_rule"]``.
BUDGET_RULES: tuple[str, ...] = ("per_param", "score")
DEFAULT_BUDGET_RULE: BudgetRule = "per_param"


def check_fraction(fraction: object, what: str = "budget") -> float:
    """A budget fraction in (0, 1] as a float; ``ValueError`` names the bad value."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise BudgetError(
            f"{what} must be a fraction of the block parameters in (0, 1], e.g. 0.01 for 1% "
            f"(got {fraction!r})"
        )
    f = float(fraction)
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise BudgetError(
            f"{what} must be a fraction of the block parameters in (0, 1], e.g. 0.01 for 1% "
            f"(got {fraction!r})"
        )
    return f


def check_rule(rule: object) -> BudgetRule:
    """A valid fill rule, or ``ValueError`` listing the valid ones."""
    if rule not in BUDGET_RULES:
        raise BudgetError(f"budget_rule must be one of {', '.join(BUDGET_RULES)} (got {rule!r})")
    return rule  # type: ignore[return-value]


def block_params(layout: ModelLayout) -> int:
    """Sum of ``layout.n_params`` over every Linear unit of every layer."""
    return int(sum(layout.n_params(u) for u in layout.units("linear")))


class ParamCounter:
    """Distinct weights covered by a growing set of units (overlaps counted once).

    Every unit slice spans a range of one dimension of one tensor and all of the
    others, so per tensor it keeps the covered indices of each dimension; an element
    is uncovered when none of its indices is, so covered = prod(n) - prod(n - |S_d|).
    """

    def __init__(self, layout: ModelLayout, kv: str = "group") -> None:
        if kv not in ("group", "none"):
            raise BudgetError(f"kv must be 'group' or 'none', got {kv!r}")
        self.layout = layout
        self.kv = kv
        self.units: list[Unit] = []
        self.n_params = 0
        self._cov: dict[str, list[set[int]]] = {}
        self._seen: set[Unit] = set()

    def _expand(self, unit: Unit) -> list[Unit]:
        if self.kv == "group" and isinstance(unit, Head):
            return [unit, self.layout.kv_group_of(unit)]
        return [unit]

    def _count(self, param: str, sizes: Sequence[int]) -> int:
        shape = self.layout.shapes[param]
        total = math.prod(shape)
        return total - math.prod(n - s for n, s in zip(shape, sizes))

    def _delta(self, unit: Unit) -> tuple[int, dict[str, list[set[int]]]]:
        """(marginal weights, new indices per tensor and dim) if ``unit`` were added."""
        new: dict[str, list[set[int]]] = {}
        shapes = self.layout.shapes
        for u in self._expand(unit):
            for s in self.layout.slices(u):
                add = new.get(s.param)
                if add is None:
                    add = new[s.param] = [set() for _ in shapes[s.param]]
                cov = self._cov.get(s.param)
                idx = range(s.start, s.stop)
                add[s.dim].update(idx if cov is None else set(idx).difference(cov[s.dim]))
        gain = 0
        for param, add in new.items():
            cov = self._cov.get(param)
            old = [len(c) for c in cov] if cov is not None else [0] * len(add)
            if any(add):
                gain += self._count(param, [o + len(a) for o, a in zip(old, add)])
                gain -= self._count(param, old)
        return gain, new

    def cost(self, unit: Unit | str) -> int:
        """Weights ``unit`` (and its KV group under ``kv="group"``) would add."""
        return self._delta(self.layout.validate(unit))[0]

    def add(self, unit: Unit | str) -> int:
        """Add ``unit``; returns the weights it added."""
        u = self.layout.validate(unit)
        gain, new = self._delta(u)
        for param, add in new.items():
            cov = self._cov.setdefault(param, [set() for _ in add])
            for c, a in zip(cov, add):
                c.update(a)
        self.n_params += gain
        if u not in self._seen:
            self._seen.add(u)
            self.units.append(u)
        return gain


def budget_cap(layout: ModelLayout, fraction: float) -> int:
    """The most weights ``fraction`` of the block parameters allows (floored)."""
    return int(math.floor(check_fraction(fraction) * block_params(layout) + 1e-9))


def count_params(
    layout: ModelLayout, units: Selection | Iterable[Unit | str], kv: str = "group"
) -> int:
    """Distinct weights a selection covers (equals ``plan_transplant(...).n_params``).

    ``units``: units (KV groups counted under ``kv="group"``) or a
    :class:`~tl_transplant.edit.weights.WeightMask` (its number of weights; it must fit the
    layout's block tensors, else ``ValueError``).
    """
    if isinstance(units, WeightMask):
        from tl_transplant.edit.weights import block_tensors

        blocks = block_tensors(layout)
        units.check(blocks, blocks)
        return units.n_params
    c = ParamCounter(layout, kv)
    for u in parse_units(list(units)):
        c.add(u)
    return c.n_params


def selection_size(
    layout: ModelLayout, selection: Selection | Iterable[Unit | str], kv: str = "group"
) -> tuple[int, float]:
    """``(weights moved, fraction of the block parameters)`` of units or a weight mask:
    the size every row and control is matched on."""
    n = count_params(layout, selection, kv)
    return n, n / max(1, block_params(layout))


@dataclass(frozen=True)
class BudgetPick:
    """The units picked for one budget and what they cost."""

    units: list[Unit]
    n_params: int
    budget_params: int
    block_params: int
    fraction: float
    rule: str

    @property
    def pct_params(self) -> float:
        """Fraction of the block parameters picked (<= ``fraction``)."""
        return self.n_params / max(1, self.block_params)


def fill_budget(
    ranked: Sequence[Unit | str],
    layout: ModelLayout,
    fraction: float,
    *,
    values: Sequence[float] | None = None,
    rule: str = DEFAULT_BUDGET_RULE,
    kv: str = "group",
) -> BudgetPick:
    """Units of ``ranked`` (best first) whose distinct weights fit ``fraction`` of the block.

    ``values`` (aligned with ``ranked``) are needed by ``rule="per_param"``; see the
    module docstring for both rules and the treatment of scores <= 0.
    """
    f = check_fraction(fraction)
    check_rule(rule)
    units = list(dict.fromkeys(parse_unit(u) for u in ranked))
    total = block_params(layout)
    cap = budget_cap(layout, f)
    order: list[Unit]
    if rule == "score":
        order = units
    else:
        if values is None:
            raise BudgetError("budget_rule 'per_param' needs the scores (values=...)")
        vals = dict(zip((parse_unit(u) for u in ranked), (float(v) for v in values)))
        if len(values) != len(ranked):
            raise BudgetError(f"{len(ranked)} units but {len(values)} values")
        cand = [(i, u) for i, u in enumerate(units) if math.isfinite(vals[u]) and vals[u] > 0]
        # A unit's own cost depends on its kind and layer only (every head of a layer has
        # the same slices' sizes, ...); only the order uses it, the fit check is exact.
        own: dict[tuple[str, int, str], int] = {}
        alone = {}
        for _, u in cand:
            sig = (u.kind, u.layer, getattr(u, "name", ""))
            if sig not in own:
                own[sig] = ParamCounter(layout, kv).cost(u)
            alone[u] = own[sig]
        order = [u for _, u in sorted(cand, key=lambda p: (-vals[p[1]] / max(1, alone[p[1]]),
                                                         p[0]))]
    counter = ParamCounter(layout, kv)
    low = _lower_bounds(order, layout)
    floor = min(low.values(), default=0)
    for u in order:
        left = cap - counter.n_params
        if left < floor:
            break  # nothing left can fit
        if low[u] <= left and counter.cost(u) <= left:
            counter.add(u)
    return BudgetPick(list(counter.units), counter.n_params, cap, total, f, rule)


def _lower_bounds(units: Sequence[Unit], layout: ModelLayout) -> dict[Unit, int]:
    """A lower bound on each unit's marginal cost, to skip exact counts that cannot fit.

    Heads and neurons of a layout have disjoint slices (a head's q rows and o columns,
    a neuron's rows and column), so without a whole linear of their layer among
    ``units`` a head adds at least its own slices (its KV group may be there already)
    and a neuron exactly its own; anything else gets 0 (always counted exactly). The
    bound depends on kind and layer only; a wrong bound could only skip a unit, never
    exceed the budget (every add is counted exactly).
    """
    lin_layers = {u.layer for u in units if u.kind == "linear"}
    sig: dict[tuple[str, int], int] = {}
    out: dict[Unit, int] = {}
    for u in units:
        if u.kind not in ("head", "neuron") or u.layer in lin_layers:
            out[u] = 0
            continue
        key = (u.kind, u.layer)
        if key not in sig:
            sig[key] = ParamCounter(layout, "none").cost(u)
        out[u] = sig[key]
    return out


def budget_label(fraction: float) -> str:
    """``0.01`` -> ``"1%"``, ``0.005`` -> ``"0.5%"`` (for tables)."""
    return f"{100 * fraction:.4g}%"


__all__ = [
    "BUDGET_RULES",
    "BudgetPick",
    "ParamCounter",
    "block_params",
    "budget_cap",
    "budget_label",
    "check_fraction",
    "check_rule",
    "count_params",
    "fill_budget",
    "selection_size",
]
