"""``learned_mask``: joint selection by a learned gate per unit (Localize-and-Stitch style).

Each unit ``u`` gets a gate ``m_u = sigmoid(theta_u)``. Every weight element ``w`` of
the target that some unit covers (the slices of ``layout.slices(u)``, the very ones
:func:`tl_transplant.edit.edits.transplant` blends) becomes

    ``w_t + G * (w_s - w_t)``,   ``G = 1 - prod over the units covering w of (1 - m_u)``

(computed as ``torch.lerp(w_t, w_s, G)``, exact at ``G`` = 0 and 1). With ``kv="group"``
(transplant's default) a query head's gate also covers its KV group's k/v rows, so a
KV group moves with ``1 - prod_h (1 - m_h)`` over its query heads (times ``1 - m_kv`` when
KV groups are scored too). At binary gates the relaxed model is therefore exactly
``transplant(pair, {u : m_u = 1}, alpha=1, kv=kv)`` (:class:`GatedTarget`).

``theta`` (initial logit ``init``) minimises, by ``steps`` Adam steps, each a full pass
over the scoring prompts (gradients accumulated batch by batch, so the gates do not depend
on ``batch_size`` beyond float rounding; nothing is random, the run's seed is not used):

* ``-mean metric`` (the task's differentiable metric, default the summed answer log-prob);
* ``+ lam_ret * KL(target || edited)``: next-token distributions of the unedited target
  vs the gated one, at the positions that predict prompt tokens (the answer positions are
  the task's), or at every non-pad position of ``retention_prompts`` when given;
* ``+ lam_sparse * moved / block_params``: ``moved`` is the sum of ``G`` over all weight
  elements, i.e. the expected number of parameters moved (``sum_u m_u n_params(u)``
  for non-overlapping units, plus the KV groups brought along), and ``block_params`` the
  parameters of every Linear unit of every layer (the budget convention).

Only ``theta`` is trained: the relaxed weights are rebuilt for each batch and given to the
bridge through :func:`torch.func.functional_call`, so no parameter of either model is
written (bridge copies of fused tensors, e.g. GPT-NeoX's q/k/v and GPT-2's split views,
are re-derived from the relaxed HF tensors). Cost per step and batch: one forward and one
backward of the target (weight-sized gradients included); the unedited target's log-probs
for the KL are computed once and kept (up to :data:`REF_CACHE_BYTES`, else one no-grad
forward per batch and step). Memory: about one copy of the block weights (the relaxed ones)
and their gradients on top of the models.

Output: the final gates (rank by gate), columns ``gate`` and ``theta``;
``meta["suggested"]`` = the units with gate > 0.5, ``meta["budget_rule"] = "score"``,
and the final loss terms. ``contrast=`` (base class) trains a second mask on the contrast
task and subtracts its gates; for a retention term on another task's prompts inside one
optimisation pass ``retention_prompts=`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from pydantic import Field
from tqdm.auto import tqdm

from tl_transplant.arch.units import Head, Unit
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.functional import FunctionalTarget
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    register,
)
from tl_transplant.scoring.tensors import work
from tl_transplant.tasks.tokens import Encoded

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair

KVMode = Literal["group", "none"]

#: The unedited target's log-probs at the KL positions are kept across steps up to this size
#: (bytes, all batches together); beyond it they are recomputed each step (one no-grad forward).
REF_CACHE_BYTES = 1 << 30


@dataclass
class _Gated:
    """One HF tensor some unit covers: who covers which indices along which dim."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    w_t: torch.Tensor  # working precision, target device
    w_s: torch.Tensor  # the source cast as transplant casts it, then to working precision
    dims: list[tuple[int, Int[torch.Tensor, " k"], Int[torch.Tensor, " k"]]]  # dim, pos, unit


class GatedTarget:
    """The target whose unit slices are blended toward the source by per-unit gates.

    Gates enter as *keep logs* ``k_u = log(1 - m_u)`` (``-softplus(theta_u)``;
    ``-inf`` for a fully open gate), so that products of ``1 - m`` are sums and binary
    gates are exact. Nothing is written to either model.
    """

    def __init__(self, pair: ModelPair, units: Sequence[Unit], *, kv: KVMode = "group") -> None:
        if kv not in ("group", "none"):
            raise ScoringError(f"kv must be 'group' or 'none', got {kv!r}")
        self.pair = pair
        self.units = list(units)
        layout = pair.layout
        tgt, src = pair.target, pair.source
        self.device = tgt.device
        # param -> dim -> ([start], [size], [unit position]): ranges, expanded once below
        cover: dict[str, dict[int, tuple[list[int], list[int], list[int]]]] = {}
        for j, u in enumerate(self.units):
            sl = list(layout.slices(u))
            if kv == "group" and isinstance(u, Head):
                sl += list(layout.slices(layout.kv_group_of(u)))
            for s in sl:
                starts, sizes, who = cover.setdefault(s.param, {}).setdefault(s.dim, ([], [], []))
                starts.append(s.start)
                sizes.append(s.size)
                who.append(j)
        self.tensors: list[_Gated] = []
        for name, by_dim in cover.items():
            t = tgt.params[name]
            s_t = src.params[name]
            for side, x in ((tgt, t), (src, s_t)):
                if x.device.type == "meta":
                    raise ScoringError(
                        f"{side.name}: tensor {name} is offloaded (device_map); learned_mask "
                        "needs the unit tensors in memory"
                    )
            if not t.is_contiguous():
                raise ScoringError(f"learned_mask: target tensor {name} is not contiguous")
            w_t = work(t.detach())
            w_s = work(s_t.detach().to(dtype=t.dtype).to(t.device))
            dims = [(d, *_expand(*ranges, self.device)) for d, ranges in sorted(by_dim.items())]
            self.tensors.append(_Gated(name, tuple(t.shape), t.dtype, w_t, w_s, dims))
        self.block_params = sum(layout.n_params(u) for u in layout.units("linear"))
        self.fn = FunctionalTarget(pair, [g.name for g in self.tensors])

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the gates (float32, or float64 for a float64 target)."""
        return self.tensors[0].w_t.dtype if self.tensors else torch.float32

    def weights(
        self, keep_log: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Relaxed HF tensors (name -> tensor, target dtype) and the expected number moved."""
        out: dict[str, torch.Tensor] = {}
        moved = keep_log.new_zeros(())
        for g in self.tensors:
            k: torch.Tensor | None = None
            for d, pos, who in g.dims:
                kd = keep_log.new_zeros(g.shape[d]).index_add(0, pos, keep_log[who])
                view = [1] * len(g.shape)
                view[d] = g.shape[d]
                kd = kd.view(view)
                k = kd if k is None else k + kd
            assert k is not None
            gate = -torch.expm1(k).to(g.w_t.dtype)
            out[g.name] = torch.lerp(g.w_t, g.w_s, gate).to(g.dtype)
            moved = moved + gate.sum().to(moved.dtype) * (math.prod(g.shape) // gate.numel())
        return out, moved

    def bridge_params(self, relaxed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The bridge's parameter names -> relaxed tensors (views and copies re-derived)."""
        return self.fn.bridge_params(relaxed)

    def logits(
        self, ids: Int[torch.Tensor, "batch seq"], params: dict[str, torch.Tensor]
    ) -> Float[torch.Tensor, "batch seq vocab"]:
        """A forward of the target's bridge with ``params`` (from :meth:`bridge_params`)."""
        return self.fn.logits(ids, params)

    def forward_gates(
        self, ids: Int[torch.Tensor, "batch seq"], gates: Float[torch.Tensor, " n"]
    ) -> Float[torch.Tensor, "batch seq vocab"]:
        """Logits with gate values ``m`` in [0, 1] (1 = move the unit fully)."""
        keep = torch.log1p(-gates.to(device=self.device, dtype=self.dtype))
        relaxed, _ = self.weights(keep)
        return self.logits(ids, self.bridge_params(relaxed))

    def moved_fraction(self, gates: Float[torch.Tensor, " n"]) -> float:
        """Fraction of block parameters moved at gate values ``m`` (binary: a transplant)."""
        with torch.no_grad():
            keep = torch.log1p(-gates.to(device=self.device, dtype=self.dtype))
            return float(self.weights(keep)[1]) / max(1, self.block_params)


def _expand(
    starts: list[int], sizes: list[int], who: list[int], device: torch.device
) -> tuple[Int[torch.Tensor, " k"], Int[torch.Tensor, " k"]]:
    """Ranges ``[start, start + size)`` owned by unit ``who``: (every index, its unit)."""
    st = torch.tensor(starts, dtype=torch.long)
    sz = torch.tensor(sizes, dtype=torch.long)
    first = torch.repeat_interleave(torch.cumsum(sz, 0) - sz, sz)  # offset of each range
    pos = torch.repeat_interleave(st, sz) + torch.arange(int(sz.sum())) - first
    unit = torch.repeat_interleave(torch.tensor(who, dtype=torch.long), sz)
    return pos.to(device), unit.to(device)


def _kl_positions(enc: Encoded, context_only: bool) -> torch.Tensor:
    """Bool ``[batch, seq]``: non-pad positions (``context_only``: those predicting prompt
    tokens, i.e. before the last prompt position)."""
    seq = enc.input_ids.shape[1]
    pos = torch.arange(seq)[None, :]
    end = enc.prompt_len - 1 if context_only else enc.prompt_len + enc.answer_len
    return pos < end[:, None]


def _kl_sum(ref_logp: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of KL(ref || softmax(edit)); ``ref_logp`` is at them."""
    e = torch.log_softmax(work(edit[mask.to(edit.device)]), dim=-1)
    return (ref_logp.exp() * (ref_logp - e)).sum()


@register
class LearnedMask(Scorer):
    """A sigmoid gate per unit on the source-target weight delta, learned jointly."""

    name = "learned_mask"
    kinds = ("head", "kv_head", "neuron", "linear")
    default_kinds = ("head", "neuron")
    needs_answers = True
    signed = False

    class Options(ScorerOptions):
        steps: Annotated[int, Field(ge=1)] = 100  # Adam steps, each a full pass over the prompts
        lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1  # Adam learning rate
        # sparsity weight (score()'s own `lam` is the contrast weight, hence the name)
        lam_sparse: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
        lam_ret: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0  # KL weight
        init: Annotated[float, Field(allow_inf_nan=False)] = -3.0  # initial gate logit
        kv: KVMode = "group"  # as transplant's kv: a head's gate also moves its KV group
        retention_prompts: list[str] | None = None  # KL on these instead of the task contexts

    def check(self) -> None:
        rp = self.opts.retention_prompts
        if rp is not None and not rp:
            raise ScoringError(
                "learned_mask: retention_prompts is empty; pass prompt strings or None "
                "(KL on the task prompts' contexts)"
            )

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        opts, ctx = self.opts, self.ctx
        gated = GatedTarget(ctx.pair, units, kv=opts.kv)
        bridge = ctx.pair.target.bridge
        metric_fn = ctx.metric_fn()
        task_batches = [e for e, _ in ctx.batches(data, answers=True, desc="learned_mask: tokens")]
        ret_batches: list[Encoded] = []
        if opts.retention_prompts is not None and opts.lam_ret > 0:
            rdata = ScoringData("retention", list(opts.retention_prompts), None, data.prepend_bos)
            ret_batches = [e for e, _ in ctx.batches(rdata, answers=False,
                                                     desc="learned_mask: tokens")]
        # Work items: (batch, KL positions or None, carries the task term). KL terms are
        # normalised by the positions of all items, the task term by the prompts, so a step
        # (one pass over every item, then one Adam update) does not depend on the batch size.
        use_kl = opts.lam_ret > 0
        items: list[tuple[Encoded, torch.Tensor | None, bool]] = [
            (e, _kl_positions(e, context_only=True) if use_kl and not ret_batches else None, True)
            for e in task_batches
        ]
        items += [(e, _kl_positions(e, context_only=False), False) for e in ret_batches]
        n_pos = sum(int(m.sum()) for _, m, _ in items if m is not None)
        ref_cache: dict[int, torch.Tensor] = {}
        cache_ok: list[bool] = []

        def ref_logp(i: int, enc: Encoded, mask: torch.Tensor) -> torch.Tensor:
            """The unedited target's log-probs at the KL positions (cached when small)."""
            if i in ref_cache:
                return ref_cache[i]
            with torch.no_grad():
                ref = bridge(enc.input_ids.to(gated.device), return_type="logits")
                r = torch.log_softmax(work(ref[mask.to(ref.device)]), dim=-1)
            if not cache_ok:
                cache_ok.append(n_pos * r.shape[-1] * r.element_size() <= REF_CACHE_BYTES)
            if cache_ok[0]:
                ref_cache[i] = r
            return r

        theta = torch.full((len(units),), float(opts.init), dtype=gated.dtype,
                           device=gated.device, requires_grad=True)
        adam = torch.optim.Adam([theta], lr=opts.lr)
        history: list[float] = []
        last: dict[str, float] = {}
        bar = tqdm(range(opts.steps), desc=f"learned_mask [{data.name}]", unit="step",
                   disable=not ctx.progress, leave=False)
        for _ in bar:
            adam.zero_grad(set_to_none=True)
            terms = {"task": 0.0, "retention": 0.0, "sparsity": 0.0}
            for i, (enc, mask, is_task) in enumerate(items):
                relaxed, moved = gated.weights(-F.softplus(theta))
                logits = gated.logits(enc.input_ids, gated.bridge_params(relaxed))
                loss = logits.new_zeros((), dtype=theta.dtype)
                if is_task:
                    task = -metric_fn(logits, enc.to(logits.device)).sum() / len(data)
                    loss = loss + task
                    terms["task"] += float(task.detach())
                if mask is not None and bool(mask.any()):
                    ret = _kl_sum(ref_logp(i, enc, mask), logits, mask) / n_pos
                    loss = loss + opts.lam_ret * ret
                    terms["retention"] += float(ret.detach())
                if i == 0:
                    sparse = moved / max(1, gated.block_params)
                    loss = loss + opts.lam_sparse * sparse
                    terms["sparsity"] = float(sparse.detach())
                if not loss.requires_grad:
                    if is_task:
                        raise ScoringError("learned_mask: the metric does not depend on the gates")
                    continue
                loss.backward()
                del logits, relaxed, loss
            adam.step()
            total = (terms["task"] + opts.lam_ret * terms["retention"]
                     + opts.lam_sparse * terms["sparsity"])
            last = {"total": total, **terms}
            history.append(total)
            bar.set_postfix(loss=f"{total:.3f}", frac=f"{terms['sparsity']:.3f}")
        bar.close()
        th = theta.detach().to(torch.float64).cpu()
        gates = torch.sigmoid(th)
        chosen = gates > 0.5
        suggested = [str(u) for u, c in zip(units, chosen.tolist()) if c]
        meta = {
            "suggested": suggested,
            "budget_rule": "score",
            "loss": last,
            "loss_history": history,
            "frac_params": gated.moved_fraction(gates),
            "suggested_frac_params": gated.moved_fraction(chosen.to(torch.float64)),
            "block_params": gated.block_params,
        }
        self._units = list(units)
        return RawScores(gates, None, columns={"gate": gates, "theta": th}, meta=meta)

    def combine(self, task: RawScores, contrast: RawScores, lam: float) -> RawScores:
        """Task gates minus ``lam`` times the contrast task's gates; suggested: combined > 0.5."""
        raw = super().combine(task, contrast, lam)
        meta = dict(raw.meta)
        units = getattr(self, "_units", [])
        meta["suggested"] = [str(u) for u, v in zip(units, raw.values.tolist()) if v > 0.5]
        return RawScores(raw.values, raw.consistency, raw.columns, meta)
