"""``activation_patch``: the exact effect on the metric of patching each unit, one at a time.

``score_u = mean over prompts of metric(target with alpha * delta_u added) - metric(target)``,
with ``delta_u`` as in :mod:`tl_transplant.scoring.effects` (the source's
activation of the unit put into the target, at every position). It is the
ground truth that ``attribution`` approximates to first order; as ``alpha -> 0``
``score / alpha`` tends to the attribution score.

Cost: per batch, one clean forward of each model, then one forward per unit;
``units_per_pass`` units are patched in one forward by replicating the batch
(memory grows with ``units_per_pass * batch_size``). Use it on a shortlist
(e.g. ``units=attribution_scores.top(50)``) for large models.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from tl_transplant.hooks import Handler, HookRunner, capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.effects import Delta, Effects, units_in_order
from tl_transplant.scoring.registry import RawScores, Scorer, ScorerOptions, register
from tl_transplant.tokens import Encoded
from tl_transplant.units import Unit


@register
class ActivationPatch(Scorer):
    """metric(target with the unit's source activation) - metric(target), per unit."""

    name = "activation_patch"
    default_kinds = ("head",)
    needs_answers = True
    signed = True

    class Options(ScorerOptions):
        #: Patch strength: ``alpha * delta_u`` is added.
        alpha: Annotated[float, Field(allow_inf_nan=False)] = 1.0
        #: Units patched in one forward (the batch is replicated this many times).
        units_per_pass: Annotated[int, Field(ge=1)] = 8

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        pair, layout = self.ctx.pair, self.ctx.layout
        alpha = float(self.opts.alpha)
        per_pass = int(self.opts.units_per_pass)
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        vals, writes = table.value_hooks(), table.write_hooks()
        names = list(dict.fromkeys(vals + writes))
        metric_fn = self.ctx.metric_fn()
        order = units_in_order(table)
        with self.ctx.hooks(names) as runner, torch.no_grad():
            for enc, _ in self.ctx.batches(data, answers=True, desc="activation_patch"):
                b = len(enc)
                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                runner.run(pair.source, enc.input_ids,
                           {n: capturer(src, n) for n in vals}, table.max_layer())
                logits = runner.run(pair.target, enc.input_ids, {n: capturer(tgt, n) for n in vals})
                assert logits is not None
                clean = metric_fn(logits, enc.to(logits.device)).double().cpu()
                del logits
                effects = Effects(pair, table, src, tgt)
                per = acc.new_batch(b)
                for start in range(0, len(order), per_pass):
                    chunk = order[start : start + per_pass]
                    deltas = [effects.delta(u) for _, u in chunk]
                    patched = self._patched_metric(runner, enc, deltas, alpha)
                    eff = patched.view(len(chunk), b) - clean[None, :]
                    per[:, [i for i, _ in chunk]] = eff.T
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(b)
        return RawScores(acc.mean("score"), acc.consistency(), meta={"alpha": alpha})

    def _patched_metric(self, runner: HookRunner, enc: Encoded, deltas: list[Delta],
                        alpha: float) -> torch.Tensor:
        """The metric of ``len(deltas)`` replicas of the batch, replica r patched by deltas[r]."""
        pair = self.ctx.pair
        b, n_rep = len(enc), len(deltas)
        by_hook: dict[str, list[tuple[int, tuple, torch.Tensor]]] = {}
        for r, delta in enumerate(deltas):
            for name, index, d in delta:
                by_hook.setdefault(name, []).append((r, index, d))

        def patcher(items: list[tuple[int, tuple, torch.Tensor]]) -> Handler:
            def h(t: torch.Tensor) -> torch.Tensor:
                t = t.clone()
                for r, index, d in items:
                    sl = (slice(r * b, (r + 1) * b), *index)
                    t[sl] = t[sl] + (alpha * d).to(t.dtype)
                return t

            return h

        rep = Encoded(enc.input_ids.repeat(n_rep, 1), enc.prompt_len.repeat(n_rep),
                      enc.answer_len.repeat(n_rep), enc.pad_id)
        logits = runner.run(pair.target, rep.input_ids,
                            {n: patcher(items) for n, items in by_hook.items()})
        assert logits is not None
        return self.ctx.metric_fn()(logits, rep.to(logits.device)).double().cpu()
