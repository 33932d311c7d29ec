"""``paper_l1``: the source method's "layer-wise activation evaluation" for whole linears.

For every whole linear, the L1 norm of its output at the last prompt position,
averaged over prompts, in source and in target; score = ``|source - target|``.
With ``decode_steps=N`` each model greedily decodes its own continuation and
the L1 norm is averaged over the N positions that predict the N tokens (the
last prompt token and the first N-1 generated ones), as the method did. The
decode runs a full forward per step (no KV cache) and does not stop at EOS.
``per_feature=True`` uses the mean absolute value instead of the sum.

Fused projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``) are
read as the bridge's split q/k/v (gate/up) outputs; the L1 norm does not
depend on the order of the features, so it is the fused output's norm.

Extra columns: ``source_l1``, ``target_l1``. Consistency is computed on the
per-prompt ``|l1_source - l1_target|``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import Field

from tl_transplant.arch.units import Unit
from tl_transplant.models.hooks import HookRunner
from tl_transplant.scoring.accumulate import Accumulator, UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import RawScores, Scorer, ScorerOptions, register
from tl_transplant.scoring.tensors import take_positions, tensor_sum, work
from tl_transplant.tasks.tokens import Encoded

if TYPE_CHECKING:
    from tl_transplant.models.side import ModelSide


@register
class PaperL1(Scorer):
    """|mean L1(source output) - mean L1(target output)| per whole linear."""

    name = "paper_l1"
    kinds = ("linear",)
    default_kinds = ("linear",)

    class Options(ScorerOptions):
        #: Greedy decode steps to average over (0: the last prompt position only).
        decode_steps: Annotated[int, Field(ge=0)] = 0
        #: Mean absolute value instead of the L1 sum.
        per_feature: bool = False

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        pair, layout = self.ctx.pair, self.ctx.layout
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        names = table.value_hooks()
        steps = max(1, self.opts.decode_steps)
        per_feature = self.opts.per_feature

        with self.ctx.hooks(names) as runner:
            for enc, _ in self.ctx.batches(data, answers=False, desc="paper_l1"):
                b = len(enc)
                with torch.no_grad():
                    l1_s = self._l1(runner, pair.source, enc, table, names, steps, per_feature)
                    l1_t = self._l1(runner, pair.target, enc, table, names, steps, per_feature)
                acc.add("source", l1_s)
                acc.add("target", l1_t)
                acc.add_consistency((l1_s - l1_t).abs())
                acc.done(b)
        src, tgt = acc.mean("source"), acc.mean("target")
        return RawScores(
            (src - tgt).abs(),
            acc.consistency(),
            {"source_l1": src, "target_l1": tgt},
            meta={"decode_steps": self.opts.decode_steps, "per_feature": per_feature},
        )

    def _l1(self, runner: HookRunner, side: ModelSide, enc: Encoded, table: UnitTable,
            names: list[str], steps: int, per_feature: bool) -> torch.Tensor:
        """Per-prompt L1 of every scored linear, averaged over ``steps`` decode positions."""
        layout = self.ctx.layout
        b = len(enc)
        plen = enc.prompt_len
        width = int(plen.max()) + steps - 1
        buf = torch.full((b, width), enc.pad_id, dtype=torch.long)
        buf[:, : enc.input_ids.shape[1]] = enc.input_ids
        total = torch.zeros(b, len(table), dtype=torch.float64)
        rows = torch.arange(b)
        for t in range(steps):
            pos = plen - 1 + t
            cur = int(pos.max()) + 1
            store: dict[str, torch.Tensor] = {}

            def grab(name: str, pos: torch.Tensor = pos,
                     store: dict[str, torch.Tensor] = store) -> Callable[[torch.Tensor], None]:
                def record(x: torch.Tensor) -> None:
                    a = work(take_positions(x, pos)[:, 0].flatten(1)).abs()
                    store[name] = a if per_feature else a.sum(-1).double()
                    return None

                return record

            last_step = t == steps - 1
            logits = runner.run(side, buf[:, :cur], {n: grab(n) for n in names},
                                table.max_layer() if last_step else None)
            per = torch.zeros(b, len(table), dtype=torch.float64)
            lin_names = layout.linear_names()
            for layer in table.layers("linear"):
                vals = torch.zeros(b, len(lin_names), dtype=torch.float64)
                for lin, hooks in table.linear_hooks(layer).items():
                    if per_feature:
                        feats = torch.cat([store[h] for h in hooks], dim=-1)
                        vals[:, lin_names.index(lin)] = feats.mean(-1).double().cpu()
                    else:
                        vals[:, lin_names.index(lin)] = tensor_sum(store[h] for h in hooks).cpu()
                table.put(per, "linear", layer, vals)
            total += per
            if not last_step:
                assert logits is not None
                nxt = logits[rows.to(logits.device), pos.to(logits.device)].argmax(-1).cpu()
                buf[rows, pos + 1] = nxt
        return total / steps
