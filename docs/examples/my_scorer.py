"""Example scorer ``norm_gap``: how much the size of each head's or neuron's activation moved.

``score_u = mean over prompts of | ||a_source(u)|| - ||a_target(u)|| |`` at the
last prompt token, where ``a`` is the unit's value hook (a head's ``hook_z``
vector, a neuron's ``mlp.hook_post`` scalar). Unsigned; a unit that computes
the same thing in both models scores exactly 0.
"""

from __future__ import annotations

from typing import Literal

import torch

from tl_transplant.models.hooks import capturer, kind_hooks
from tl_transplant.scoring import (
    Accumulator,
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringData,
    UnitTable,
    register,
    take_positions,
    work,
)
from tl_transplant.arch.units import Unit


@register
class NormGap(Scorer):
    """| ||activation in source|| - ||activation in target|| | per unit, at the last token."""

    name = "norm_gap"
    kinds = ("head", "neuron")  # unit kinds it can score
    default_kinds = ("head", "neuron")  # what units=None means

    class Options(ScorerOptions):  # typed, validated before any model runs
        ord: Literal[1, 2] = 2  # the vector norm of a head's activation

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None  # needs_data is True by default, so score() checked it
        pair, layout = self.ctx.pair, self.ctx.layout
        table = UnitTable(units, layout)  # where each (kind, layer) block goes
        acc = Accumulator(table)  # online means over prompts
        names = table.value_hooks()  # hook names from the layout, never hard-coded
        with self.ctx.hooks(names) as runner, torch.no_grad():
            for enc, _ in self.ctx.batches(data, answers=False, desc=self.name):
                def last(t: torch.Tensor, pos: torch.Tensor = enc.last_prompt_pos) -> torch.Tensor:
                    return take_positions(t, pos)[:, 0]

                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                stop = table.max_layer()  # no need to run the layers after the last unit
                runner.run(pair.source, enc.input_ids,
                           {n: capturer(src, n, transform=last) for n in names}, stop)
                runner.run(pair.target, enc.input_ids,
                           {n: capturer(tgt, n, transform=last) for n in names}, stop)
                per = acc.new_batch(len(enc))  # [batch, units]
                for kind in table.kinds():
                    for layer in table.layers(kind):
                        hook = kind_hooks(layout, kind, layer)[0]
                        s = work(src[hook].to(pair.target.device))
                        t = work(tgt[hook])
                        if kind == "head":  # [batch, H, dh] -> [batch, H]
                            gap = s.norm(p=self.opts.ord, dim=-1) - t.norm(p=self.opts.ord, dim=-1)
                        else:  # [batch, I]
                            gap = s.abs() - t.abs()
                        table.put(per, kind, layer, gap.abs())
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(len(enc))
        return RawScores(acc.mean("score"), acc.consistency(), meta={"ord": self.opts.ord})
