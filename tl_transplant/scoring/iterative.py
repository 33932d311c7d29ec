"""``iterative``: greedy selection with re-scoring, each round against the target edited so far.

Round ``r``: score the units not yet picked with an inner method (``inner``,
its options in ``inner_options``; not ``method``, which is ``score()``'s own
argument), pick the best ``chunk`` of them (highest score first; with a
``budget`` a unit that does not fit is skipped), transplant them into the
target at ``alpha = 1`` (:func:`tl_transplant.edit.edits.transplant`, ``kv`` as
given: a query head brings its KV group), and go on with the rest.
The loop stops when ``k`` units are picked, when nothing left fits in the
``budget``, or when no unit is left. Every edit is undone at the end, also on
an error: the target is bit for bit what it was.

The result is a ranking: ``values`` descend in pick order (the first pick gets
``n``, the next ``n - 1``, ...), and the units never picked follow, ordered by
their last inner score (NaN scores last). ``meta["budget_rule"] = "score"``:
fill a budget by walking this ranking. Columns: ``round`` (1-based, NaN if not
picked), ``score_at_pick`` (the inner score in the round it was picked, NaN if
not picked) and ``last_score`` (the last inner score of every unit).
``meta["rounds"]`` lists each round's picks; ``meta["iterative"]`` the stop
reason and the parameters moved.

Budget: ``budget`` is a fraction of the block parameters (the sum of
``layout.n_params`` over every whole linear of every layer); a unit costs its
``n_params`` plus, for a query head under ``kv="group"``, its KV group's unless
that group was already moved. A KV group moved along with a picked head is in
the edit: if it is among the scored units it is taken off the candidates and
ranked right after that head (``score_at_pick`` NaN).

Chunk: ``chunk`` units per round, or ``ceil(chunk_fraction * N)`` where ``N`` is
``k`` if given, else the number of average-sized units the ``budget`` holds,
else the number of units scored (default ``chunk_fraction = 0.1``: ~10 rounds).

Cost: one inner run per round over the units left. The inner scorer comes from
the registry (``get_scorer`` + ``check_options``, validated before any model
runs) and is given this run's Context (batch size, metric, seed, progress) and
data, rather than going through ``score()``, which would re-resolve units and
data and rebuild its metadata every round. ``contrast=`` is not supported (each
round would need both data sets): ``score()`` refuses it, since this scorer
declares ``needs_data=False`` (whether data is needed is the inner method's
call, checked when the run starts). ``k`` counts entries of the ranking, KV
groups moved along included.
"""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from tl_transplant.arch.units import Head, Unit
from tl_transplant.edit.budget import block_params
from tl_transplant.edit.edits import transplant
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    check_options,
    get_scorer,
    register,
)


@register
class Iterative(Scorer):
    """Pick the top chunk, transplant it, re-score the rest; the pick order is the ranking."""

    name = "iterative"
    default_kinds = ("head", "neuron")
    # The inner method decides what data it needs (checked at the start of run()).
    needs_data = False

    class Options(ScorerOptions):
        #: The inner scoring method, run once per round on the units left.
        inner: str = "attribution"
        #: The inner method's options.
        inner_options: dict[str, Any] = Field(default_factory=dict)
        #: Units picked per round (exclusive with chunk_fraction).
        chunk: Annotated[int, Field(ge=1)] | None = None
        #: Units picked per round as a fraction of k / the budget's units / all units.
        chunk_fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        #: Stop after this many units.
        k: Annotated[int, Field(ge=1)] | None = None
        #: Stop when the picks fill this fraction of the block parameters.
        budget: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        #: The transplant's KV mode between rounds (and in the budget's count).
        kv: Literal["group", "none"] = "group"

    def check(self) -> None:
        o = self.opts
        if o.chunk is not None and o.chunk_fraction is not None:
            raise ScoringError("iterative: give chunk or chunk_fraction, not both")
        if o.inner == self.name:
            raise ScoringError("iterative: inner='iterative' would nest the loop in itself; "
                               "name the method that scores each round, e.g. 'attribution'")
        try:
            inner = get_scorer(o.inner)
        except ScoringError as e:
            raise ScoringError(f"iterative: inner={o.inner!r}: {e}") from None
        self._inner_opts = check_options(inner, o.inner_options)
        self._inner = inner

    # ---- helpers --------------------------------------------------------------------------
    def _check_inner(self, units: list[Unit], data: ScoringData | None) -> None:
        inner = self._inner
        bad = sorted({u.kind for u in units} - set(inner.kinds))
        if bad:
            raise ScoringError(f"iterative: {inner.name} cannot score {bad[0]} units; it scores "
                               + ", ".join(inner.kinds))
        if inner.needs_data and data is None:
            raise ScoringError(f"iterative: {inner.name} needs data: pass a Task or a list of "
                               "prompt strings")
        if inner.needs_answers and (data is None or data.answers is None):
            raise ScoringError(f"iterative: {inner.name} needs answers (its metric is the "
                               "answer log-prob): pass a Task with answers, not plain prompts")

    def _chunk(self, n_units: int, costs: list[int], block: int) -> int:
        o = self.opts
        if o.chunk is not None:
            return int(o.chunk)
        frac = 0.1 if o.chunk_fraction is None else float(o.chunk_fraction)
        if o.k is not None:
            target = min(int(o.k), n_units)
        elif o.budget is not None:
            mean = sum(costs) / max(1, len(costs))
            target = min(n_units, max(1, int(o.budget * block / max(1.0, mean))))
        else:
            target = n_units
        return max(1, math.ceil(frac * target))

    # ---- run ------------------------------------------------------------------------------
    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        if not hasattr(self, "_inner"):  # built without score() (e.g. as a candidate ranker)
            self.check()
        self._check_inner(units, data)
        pair, layout, o = self.ctx.pair, self.ctx.layout, self.opts
        n = len(units)
        block = block_params(layout)
        limit = None if o.budget is None else float(o.budget) * block
        group = o.kv == "group"
        kv_of: dict[Unit, Unit] = {u: layout.kv_group_of(u) for u in units
                                   if group and isinstance(u, Head)}
        own = {u: int(layout.n_params(u)) for u in units}
        kv_cost = {g: int(layout.n_params(g)) for g in set(kv_of.values())}
        pos = {u: i for i, u in enumerate(units)}

        def cost(u: Unit, moved: set[Unit]) -> int:
            if u in moved:
                return 0
            g = kv_of.get(u)
            return own[u] + (kv_cost[g] if g is not None and g not in moved else 0)

        chunk = self._chunk(n, [cost(u, set()) for u in units], block)
        last = torch.full((n,), math.nan, dtype=torch.float64)
        round_col = torch.full((n,), math.nan, dtype=torch.float64)
        at_pick = torch.full((n,), math.nan, dtype=torch.float64)
        order: list[int] = []  # positions in pick order
        moved: set[Unit] = set()
        used = 0
        remaining = list(units)
        rounds: list[dict[str, Any]] = []
        stop = "all units picked"
        expect = math.ceil(min(n, o.k or n) / chunk)
        bar = tqdm(total=expect, desc=f"iterative [{o.inner}]", unit="round",
                   disable=not self.ctx.progress, leave=False)
        inner = self._inner
        try:
            with contextlib.ExitStack() as edits:
                r = 0
                while remaining:
                    r += 1
                    scorer = inner(self.ctx, self._inner_opts)
                    scorer.check()
                    raw = scorer.run(remaining, data)
                    vals = raw.values.detach().to(torch.float64).cpu()
                    for u, v in zip(remaining, vals.tolist()):
                        last[pos[u]] = v
                    ranked = sorted(
                        (j for j in range(len(remaining)) if not math.isnan(float(vals[j]))),
                        key=lambda j: (-float(vals[j]), j),
                    )
                    picked: list[Unit] = []
                    for j in ranked:
                        if len(picked) >= chunk or (o.k is not None and len(order) >= o.k):
                            break
                        u = remaining[j]
                        c = cost(u, moved)
                        if limit is not None and used + c > limit:
                            continue
                        picked.append(u)
                        used += c
                        moved.add(u)
                        order.append(pos[u])
                        round_col[pos[u]] = r
                        at_pick[pos[u]] = float(vals[j])
                        g = kv_of.get(u)
                        if g is not None and g not in moved:
                            moved.add(g)
                            if g in pos and math.isnan(float(round_col[pos[g]])):
                                order.append(pos[g])  # moved along: ranked right after u
                                round_col[pos[g]] = r
                    rounds.append({"round": r, "picked": [str(u) for u in picked],
                                   "n_scored": len(remaining), "params_used": used})
                    bar.update(1)
                    taken = {u for u in remaining if not math.isnan(float(round_col[pos[u]]))}
                    remaining = [u for u in remaining if u not in taken]
                    if not picked:
                        stop = "budget spent" if ranked else "no unit left has a score"
                        break
                    if o.k is not None and len(order) >= o.k:
                        stop = "k units picked"
                        break
                    if limit is not None and remaining and all(
                            used + cost(u, moved) > limit for u in remaining):
                        stop = "budget spent"
                        break
                    if remaining:
                        edits.enter_context(transplant(pair, picked, alpha=1.0, kv=o.kv))
        finally:
            bar.close()
        values = torch.zeros(n, dtype=torch.float64)
        for rank, i in enumerate(order):
            values[i] = n - rank
        done = set(order)
        rest = sorted((i for i in range(n) if i not in done),
                      key=lambda i: (math.isnan(float(last[i])), -float(last[i])
                                     if not math.isnan(float(last[i])) else 0.0, i))
        for j, i in enumerate(rest):
            values[i] = n - len(order) - j
        info = {"inner": o.inner, "chunk": chunk, "k": o.k, "budget": o.budget, "kv": o.kv,
                "block_params": block, "params_used": used,
                "fraction_used": used / max(1, block), "n_picked": len(order),
                "n_rounds": len(rounds), "stop": stop}
        return RawScores(values, None,
                         columns={"round": round_col, "score_at_pick": at_pick,
                                  "last_score": last},
                         meta={"budget_rule": "score", "iterative": info, "rounds": rounds})


__all__ = ["Iterative"]
