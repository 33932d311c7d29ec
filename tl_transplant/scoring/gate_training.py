"""The optimisation loop of learned masks (units or single weights).

Objective, at gate logits ``theta`` (one per unit or candidate weight):

* ``-mean metric`` over the step's prompts (the task's differentiable metric, default the
  summed answer log-prob);
* ``+ lam_ret * KL(target || edited)``: next-token distributions of the unedited target vs
  the gated one, averaged over the positions that predict prompt tokens (or every non-pad
  position of ``retention_prompts`` when given);
* ``+ lam_sparse * moved / block_params``: the expected fraction of block parameters moved.

A step is one update of ``theta`` on a *minibatch* of prompts (``minibatch``; all of them
when ``None``): prompts are drawn without replacement, epoch after epoch, in an order fixed
by ``seed``, so a run is deterministic and does not depend on ``batch_size`` (a minibatch is
cut into ``batch_size`` chunks whose gradients add up, up to float rounding).

Cost per step: the relaxed values are built once (one pass over the gated tensors; for unit
gates only at the gated positions, :meth:`Relaxation.leaves`), then per chunk the whole
relaxed tensors are assembled from them (:meth:`Relaxation.assemble`), one forward and one
backward of the target (gradients collect at the leaves only),
then the gates' gradient from those (:meth:`Relaxation.vjp`: one dot product per gated row
or column with the delta). The
unedited target's log-probs at the KL positions are computed once per prompt and kept (up
to :data:`REF_CACHE_BYTES`; beyond it, one no-grad forward per chunk and step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from tl_transplant.scoring.registry import ScoringError
from tl_transplant.scoring.tensors import work
from tl_transplant.tasks.tokens import Encoded, encode

if TYPE_CHECKING:
    from tl_transplant.scoring.data import Context, ScoringData
    from tl_transplant.scoring.gates import Relaxation

#: The unedited target's log-probs at the KL positions are kept across steps up to this size
#: (bytes, all prompts together); beyond it they are recomputed each step (one no-grad forward).
REF_CACHE_BYTES = 1 << 30

Optimizer = Literal["adam", "normalized_sgd"]


@dataclass
class TrainResult:
    """Final logits (float64, CPU), the total loss per step and the last step's terms."""

    theta: Float[torch.Tensor, " n"]
    history: list[float] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)


def minibatches(n: int, size: int | None, steps: int, seed: int) -> Iterator[list[int]]:
    """Prompt indices of each step: every prompt (``size`` None or >= n), else ``size`` at a
    time from a stream of seeded permutations (without replacement within an epoch)."""
    if size is None or size >= n:
        for _ in range(steps):
            yield list(range(n))
        return
    gen = torch.Generator().manual_seed(int(seed))
    stream: list[int] = []
    for _ in range(steps):
        while len(stream) < size:
            stream += torch.randperm(n, generator=gen).tolist()
        yield stream[:size]
        stream = stream[size:]


def _rows(enc: Encoded, idx: list[int]) -> Encoded:
    """Rows ``idx`` of a padded batch, trimmed to their longest row."""
    sel = torch.tensor(idx, dtype=torch.long)
    plen, alen = enc.prompt_len[sel], enc.answer_len[sel]
    width = int((plen + alen).max())
    return Encoded(enc.input_ids[sel, :width], plen, alen, enc.pad_id)


def _kl_positions(enc: Encoded, context_only: bool) -> torch.Tensor:
    """Bool ``[batch, seq]``: non-pad positions (``context_only``: those predicting prompt
    tokens, i.e. before the last prompt position)."""
    seq = enc.input_ids.shape[1]
    pos = torch.arange(seq)[None, :]
    end = enc.prompt_len - 1 if context_only else enc.prompt_len + enc.answer_len
    return pos < end[:, None]


class _Stream:
    """One prompt set (task or retention): its tokens, KL positions and cached references."""

    def __init__(self, ctx: Context, data: ScoringData, *, answers: bool, kl: bool,
                 context_only: bool) -> None:
        tok = ctx.pair.target.tokenizer
        self.enc = encode(tok, data.prompts, data.answers if answers else None,
                          prepend_bos=data.prepend_bos)
        self.n = len(data)
        self.kl = kl
        self.context_only = context_only
        mask = _kl_positions(self.enc, context_only)
        self.n_pos = mask.sum(1)  # KL positions per prompt
        self.ref: dict[int, torch.Tensor] = {}

    def ref_logp(self, bridge: torch.nn.Module, enc: Encoded, idx: list[int], mask: torch.Tensor,
                 device: torch.device, cache: bool) -> torch.Tensor:
        """The unedited target's log-probs at the masked positions of these rows (in row order,
        as ``logits[mask]`` orders them)."""
        if all(i in self.ref for i in idx):
            return torch.cat([self.ref[i] for i in idx])
        with torch.no_grad():
            logits = bridge(enc.input_ids.to(device), return_type="logits")
            r = torch.log_softmax(work(logits[mask.to(logits.device)]), dim=-1)
        if cache:
            for i, part in zip(idx, torch.split(r, mask.sum(1).tolist())):
                self.ref[i] = part
        return r


def _kl_sum(ref_logp: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of KL(ref || softmax(edit)); ``ref_logp`` is at them."""
    e = torch.log_softmax(work(edit[mask.to(edit.device)]), dim=-1)
    return (ref_logp.exp() * (ref_logp - e)).sum()


def train_gates(
    gates: Relaxation,
    theta0: Float[torch.Tensor, " n"],
    ctx: Context,
    data: ScoringData,
    *,
    steps: int,
    lr: float,
    lam_sparse: float,
    lam_ret: float,
    minibatch: int | None,
    retention: ScoringData | None = None,
    optimizer: Optimizer = "adam",
    full_step: float = 0.01,
    desc: str = "learned_mask",
) -> TrainResult:
    """Optimise gate logits from ``theta0``; see the module docstring for the objective.

    ``optimizer="adam"``: Adam at ``lr``. ``"normalized_sgd"``: plain gradient steps
    normalised so that the ``full_step`` fraction of gates with the steepest gradients move by
    ``lr`` (clipped there) and every other in proportion to its gradient: scale-free like
    Adam, but the ranking of many weak gates stays apart (Adam moves every gate with a
    consistent sign at the same speed, whatever its gradient's size).
    """
    bridge = ctx.pair.target.bridge
    metric_fn = ctx.metric_fn()
    use_kl = lam_ret > 0
    task = _Stream(ctx, data, answers=True, kl=use_kl and retention is None, context_only=True)
    streams = [task]
    if retention is not None and use_kl:
        streams.append(_Stream(ctx, retention, answers=False, kl=True, context_only=False))
    cfg = getattr(bridge, "cfg", None)
    vocab = int(getattr(cfg, "d_vocab", 0) or len(ctx.pair.target.tokenizer))
    elem = max(4, torch.finfo(gates.dtype).bits // 8)
    cache = sum(int(s.n_pos.sum()) for s in streams if s.kl) * vocab * elem <= REF_CACHE_BYTES
    orders = [minibatches(s.n, minibatch, steps, ctx.seed + k) for k, s in enumerate(streams)]

    theta = theta0.detach().to(device=gates.device, dtype=gates.dtype).clone().requires_grad_(True)
    adam = torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else None
    result = TrainResult(theta=theta0)
    bar = tqdm(range(steps), desc=f"{desc} [{data.name}]", unit="step",
               disable=not ctx.progress, leave=False)
    bs = ctx.batch_size
    for _ in bar:
        picks = [next(o) for o in orders]
        leaves = gates.leaves(theta)
        n_kl = sum(int(s.n_pos[p].sum()) for s, p in zip(streams, picks) if s.kl)
        terms = {"task": 0.0, "retention": 0.0, "sparsity": 0.0}
        for s, pick in zip(streams, picks):
            is_task = s is task
            for c in range(0, len(pick), bs):
                idx = pick[c : c + bs]
                enc = _rows(s.enc, idx)
                params = gates.fn.bridge_params(gates.assemble(leaves))
                logits = gates.fn.logits(enc.input_ids, params)
                del params
                loss = logits.new_zeros((), dtype=theta.dtype)
                if is_task:
                    t = -metric_fn(logits, enc.to(logits.device)).sum() / len(pick)
                    loss = loss + t
                    terms["task"] += float(t.detach())
                if s.kl and n_kl:
                    mask = _kl_positions(enc, s.context_only)
                    if bool(mask.any()):
                        ref = s.ref_logp(bridge, enc, idx, mask, gates.device, cache)
                        kl = _kl_sum(ref, logits, mask) / n_kl
                        loss = loss + lam_ret * kl
                        terms["retention"] += float(kl.detach())
                if not loss.requires_grad:
                    if is_task:
                        raise ScoringError(f"{desc}: the metric does not depend on the gates")
                    continue
                loss.backward()
                del logits, loss
        grads = {n: leaf.grad for n, leaf in leaves.items() if leaf.grad is not None}
        g_theta = gates.vjp(theta, grads)
        del leaves, grads
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            sparse = gates.moved(th) / max(1, gates.block_params)
            if lam_sparse > 0:
                (g_sparse,) = torch.autograd.grad(lam_sparse * sparse, th)
                g_theta = g_theta + g_sparse
        terms["sparsity"] = float(sparse.detach())
        theta.grad = g_theta.to(theta.dtype)
        if adam is not None:
            adam.step()
        else:
            with torch.no_grad():
                g = theta.grad
                a = g.abs()
                k = max(1, math.ceil(full_step * a.numel()))
                top = torch.topk(a, k, sorted=False).values.min() if k < a.numel() else a.min()
                top = torch.maximum(top, a.max() * 1e-12)
                if float(top) > 0:
                    theta.sub_(lr * (g / top).clamp_(-1.0, 1.0))
        total = terms["task"] + lam_ret * terms["retention"] + lam_sparse * terms["sparsity"]
        result.last = {"total": total, **terms}
        result.history.append(total)
        bar.set_postfix(loss=f"{total:.3f}", frac=f"{terms['sparsity']:.3f}")
    bar.close()
    result.theta = theta.detach().to(torch.float64).cpu()
    if not all(math.isfinite(x) for x in result.history):
        raise ScoringError(f"{desc}: the loss became NaN or inf; lower lr")
    return result


__all__ = ["REF_CACHE_BYTES", "TrainResult", "minibatches", "train_gates"]
