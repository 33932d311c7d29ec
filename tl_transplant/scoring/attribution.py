"""``attribution``: first-order estimate of what patching each unit would do to the metric.

``score_u = mean over prompts of sum over positions <grad_target(metric), delta_u>``,
where ``delta_u`` is the change that putting the source's activation of the unit
into the target makes at the hook points where the unit writes (see
:mod:`tl_transplant.scoring.effects`; for a KV group the gradients at
``hook_k``/``hook_v`` of its group, so GQA is handled exactly). Signed:
positive means the transplant should raise the metric.

The metric is the task's differentiable score, by default the summed log-prob
of the answer tokens (:func:`tl_transplant.tasks.tokens.answer_logprobs`); pass
``metric=`` to :func:`tl_transplant.scoring.score` for another one. Cost per
batch: one forward on the source (no gradients), one forward and one backward
(to activations only, never to weights) on the target.

At the weight grain (``units="weight"``, :meth:`Attribution.run_weights`) the score
of weight ``w`` is its first-order gain ``dM/dw * (w_s - w_t)`` (mean over prompts;
``-dL/dw * delta`` for a loss ``L = -M``): the predicted change of the metric from
moving that one weight to the source's value. One forward and one backward of the
target per batch, with gradients to the block weights (through
:class:`~tl_transplant.scoring.functional.FunctionalTarget`, so no parameter is
written and fused-tensor copies pass their gradients back); no source forward.
Memory: the block weights' gradients and their running sum, in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tl_transplant.arch.units import Unit
from tl_transplant.models.hooks import Handler, capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.effects import Effects
from tl_transplant.scoring.functional import FunctionalTarget
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScoringError,
    WeightRawScores,
    register,
)

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair


@register
class Attribution(Scorer):
    """grad_target(metric) . (act_source - act_target), per unit."""

    name = "attribution"
    default_kinds = ("head", "neuron")
    needs_answers = True
    signed = True
    weight_level = True

    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        """First-order gain of each block weight: mean ``dM/dw * (w_s - w_t)``."""
        assert data is not None
        pair = self.ctx.pair
        names = pair.layout.unit_tensors()
        fn = FunctionalTarget(pair, names)
        tgt = pair.target.params
        grads = {n: torch.zeros(tgt[n].shape, dtype=torch.float32) for n in names}
        metric_fn = self.ctx.metric_fn()
        for enc, _ in self.ctx.batches(data, answers=True, desc="attribution (weights)"):
            leaves = {n: tgt[n].detach().requires_grad_(True) for n in names}
            with torch.enable_grad():
                logits = fn.forward(enc.input_ids, leaves)
                total = metric_fn(logits, enc.to(logits.device)).sum()
                if not total.requires_grad:
                    raise ScoringError("attribution: the metric does not depend on the weights")
                g = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
            for n, gi in zip(names, g):
                if gi is not None:
                    grads[n] += gi.detach().to(device="cpu", dtype=torch.float32)
            del logits, total, g, leaves
        n_prompts = max(1, len(data))
        values = {}
        for n in names:
            values[n] = grads.pop(n).div_(n_prompts).mul_(weight_delta(pair, n))
        return WeightRawScores(values, {"score": "first-order gain dM/dw * (w_s - w_t)"})

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        pair, layout = self.ctx.pair, self.ctx.layout
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        vals, writes = table.value_hooks(), table.write_hooks()
        names = list(dict.fromkeys(vals + writes))
        metric_fn = self.ctx.metric_fn()
        with self.ctx.hooks(names) as runner:
            for enc, _ in self.ctx.batches(data, answers=True, desc="attribution"):
                b = len(enc)
                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                graph: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    runner.run(pair.source, enc.input_ids,
                               {n: capturer(src, n) for n in vals}, table.max_layer())
                handlers = {n: capturer(tgt, n) for n in vals}
                for n in writes:
                    grab = capturer(graph, n, graph=True)
                    value = handlers.get(n)
                    handlers[n] = _both(grab, value)
                with torch.enable_grad():
                    logits = runner.run(pair.target, enc.input_ids, handlers)
                    assert logits is not None
                    total = metric_fn(logits, enc.to(logits.device)).sum()
                    if not total.requires_grad:
                        raise ScoringError("attribution: the metric does not depend on the logits")
                    g = torch.autograd.grad(total, [graph[n] for n in writes], allow_unused=True)
                grads = {
                    n: (gi if gi is not None else torch.zeros_like(graph[n])).detach()
                    for n, gi in zip(writes, g)
                }
                del logits, total, graph
                with torch.no_grad():
                    for n in vals:
                        tgt[n] = tgt[n].detach()
                    per = acc.new_batch(b)
                    Effects(pair, table, src, tgt).attribution(grads, per)
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(b)
        return RawScores(acc.mean("score"), acc.consistency())


def _both(grab: Handler, value: Handler | None) -> Handler:
    """Run the graph capture first (it may swap in a grad-requiring leaf), then the value one."""

    def h(t: torch.Tensor) -> torch.Tensor | None:
        r = grab(t)
        t2 = t if r is None else r
        if value is not None:
            value(t2)
        return r

    return h


def weight_delta(pair: ModelPair, name: str) -> torch.Tensor:
    """``w_s - w_t`` of one HF tensor in float32 on the CPU, the source cast to the target's
    dtype first (as a transplant copies it)."""
    tgt = pair.target.params[name].detach()
    src = pair.source.params[name].detach()
    s = src.to(dtype=tgt.dtype).to(device="cpu", dtype=torch.float32)
    return s - tgt.to(device="cpu", dtype=torch.float32)  # never in place: s may be src itself
