"""``activation_diff``: how differently source and target compute each unit on the task.

Per prompt, the distance between the unit's activation in the source and in
the target, averaged over the scored positions; the score is the mean over
prompts. Activations:

* head: its contribution to the residual stream, ``hook_z[h] @ W_O[h]``
  (each model with its own ``W_O``, read from the HF output projection through
  the layout's slices), L2 distance;
* KV group: its key and value vectors (``hook_k``/``hook_v``), L2 distance of
  the concatenation;
* neuron: ``mlp.hook_post``, absolute difference;
* whole linear: its output (the bridge hooks the layout names), L2 distance.

Positions (``positions=``): ``"last"`` (the last prompt token, the default),
``"answer"`` (the positions that predict answer tokens; needs answers) or
``"all"`` (every real token of prompt and answer).

Consistency: see :class:`tl_transplant.scoring.accumulate.Accumulator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

import torch
from jaxtyping import Float

from tl_transplant.arch.units import Unit
from tl_transplant.models.hooks import capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    register,
)
from tl_transplant.scoring.tensors import out_weight, take_positions, tensor_sum, work
from tl_transplant.tasks.tokens import Encoded

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout

Positions = Literal["last", "answer", "all"]
POSITIONS: tuple[str, ...] = get_args(Positions)


def position_mask(enc: Encoded, positions: str) -> Float[torch.Tensor, "batch seq"]:
    """1.0 at the scored positions of each row."""
    if positions == "answer":
        return enc.answer_mask()
    seq = enc.input_ids.shape[1]
    pos = torch.arange(seq)[None, :]
    return (pos < (enc.prompt_len + enc.answer_len)[:, None]).float()


def head_distance(
    z_s: Float[torch.Tensor, "batch pos H dh"],
    z_t: Float[torch.Tensor, "batch pos H dh"],
    w_s: Float[torch.Tensor, "H dh D"],
    w_t: Float[torch.Tensor, "H dh D"],
) -> Float[torch.Tensor, "batch pos H"]:
    """``||z_s W_s - z_t W_t||`` per head and position.

    Few positions: formed directly (exact: identical inputs give exactly 0).
    Many: through the per-head Gram matrix of ``[W_s; -W_t]`` in float64, which
    costs ``(2 dh)^2`` instead of ``2 dh D`` per head and position.
    """
    b, p, h, dh = z_s.shape
    d = w_s.shape[-1]
    if p * 2 * dh <= d:
        c_s = torch.einsum("bphd,hdD->bphD", work(z_s), w_s)
        c_t = torch.einsum("bphd,hdD->bphD", work(z_t), w_t)
        return (c_s - c_t).norm(dim=-1)
    m = torch.cat([w_s, -w_t], dim=1).double()  # [H, 2dh, D]
    gram = m @ m.transpose(1, 2)  # [H, 2dh, 2dh]
    x = torch.cat([z_s, z_t], dim=-1).double()  # [b, p, H, 2dh]
    sq = (torch.einsum("bphi,hij->bphj", x, gram) * x).sum(-1)
    return sq.clamp_min(0.0).sqrt().to(torch.promote_types(z_s.dtype, torch.float32))


@register
class ActivationDiff(Scorer):
    """Mean source-target distance of each unit's activation over prompts."""

    name = "activation_diff"
    default_kinds = ("head", "neuron")

    class Options(ScorerOptions):
        #: Which positions are compared (see the module docstring).
        positions: Positions = "last"

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        pair, layout = self.ctx.pair, self.ctx.layout
        positions: str = self.opts.positions
        if positions == "answer" and data.answers is None:
            raise ScoringError(
                "activation_diff with positions='answer' needs answers; pass a Task"
            )
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        names = table.value_hooks()
        stop = table.max_layer()
        state: dict[str, torch.Tensor] = {}

        def gather(t: torch.Tensor) -> torch.Tensor:
            if positions == "last":
                return take_positions(t, state["last"])
            return t  # all positions; masked at reduction time

        with self.ctx.hooks(names) as runner:
            # "all" covers the answer tokens too when there are answers.
            answers = positions == "answer" or (positions == "all" and data.answers is not None)
            for enc, _ in self.ctx.batches(data, answers=answers, desc="activation_diff"):
                b = len(enc)
                state["last"] = enc.last_prompt_pos
                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    runner.run(pair.source, enc.input_ids,
                               {n: capturer(src, n, transform=gather) for n in names}, stop)
                    runner.run(pair.target, enc.input_ids,
                               {n: capturer(tgt, n, transform=gather) for n in names}, stop)
                    per = acc.new_batch(b)
                    dev = pair.target.device
                    if positions == "last":
                        mask = torch.ones(b, 1, device=dev)
                    else:
                        mask = position_mask(enc, positions).to(dev)
                    denom = mask.sum(1).clamp_min(1.0)

                    def reduce(dist: torch.Tensor, mask: torch.Tensor = mask,
                               denom: torch.Tensor = denom) -> torch.Tensor:
                        """Per-prompt mean over scored positions: [b, pos, n] -> [b, n]."""
                        return (dist * mask[:, :, None]).sum(1) / denom[:, None]

                    self._fill(table, layout, src, tgt, per, reduce)
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(b)
        return RawScores(acc.mean("score"), acc.consistency(), meta={"positions": positions})

    def _fill(self, table: UnitTable, layout: ModelLayout, src: dict[str, torch.Tensor],
              tgt: dict[str, torch.Tensor], per: torch.Tensor,
              reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pair = self.ctx.pair
        dev = pair.target.device
        hook = layout.hook

        def s(name: str) -> torch.Tensor:
            return work(src[name].to(dev))

        def t(name: str) -> torch.Tensor:
            return work(tgt[name])

        for layer in table.layers("head"):
            w_s = out_weight(pair.source, layout, "head", layer).to(dev)
            w_t = out_weight(pair.target, layout, "head", layer).to(dev)
            z = hook("head", layer)
            dist = head_distance(s(z), t(z), w_s, w_t)
            table.put(per, "head", layer, reduce(dist))
        for layer in table.layers("kv_head"):
            k, v = hook("kv_k", layer), hook("kv_v", layer)
            dk = s(k) - t(k)
            dv = s(v) - t(v)
            dist = (dk.pow(2).sum(-1) + dv.pow(2).sum(-1)).sqrt()
            table.put(per, "kv_head", layer, reduce(dist))
        for layer in table.layers("neuron"):
            post = hook("neuron", layer)
            dist = (s(post) - t(post)).abs()
            table.put(per, "neuron", layer, reduce(dist))
        for layer in table.layers("linear"):
            names = layout.linear_names()
            vals = torch.zeros(per.shape[0], len(names), device=dev, dtype=torch.float64)
            for lin, hooks in table.linear_hooks(layer).items():
                sq = tensor_sum((s(h) - t(h)).flatten(2).pow(2).sum(-1) for h in hooks)
                vals[:, names.index(lin)] = reduce(sq.sqrt()[:, :, None])[:, 0]
            table.put(per, "linear", layer, vals)
