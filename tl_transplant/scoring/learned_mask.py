"""``learned_mask``: joint selection by learned gates (Localize-and-Stitch style).

**Units** (``units=("head", "neuron")`` etc.). Each unit ``u`` gets a gate
``m_u = sigmoid(theta_u)``. Every weight element ``w`` of the target that some unit covers
(the slices :func:`tl_transplant.edit.edits.transplant` blends) becomes

    ``w_t + G * (w_s - w_t)``,   ``G = 1 - prod over the units covering w of (1 - m_u)``

With ``kv="group"`` (transplant's default) a query head's gate also covers its KV group's
k/v rows. At binary gates the relaxed model is exactly
``transplant(pair, {u : m_u = 1}, alpha=1, kv=kv)`` (:class:`~.gates.GatedTarget`).

**Single weights** (``units="weight"``, :meth:`LearnedMask.run_weights`; skill grafting,
Panigrahi et al. 2023; Localize-and-Stitch). A gate per weight of the task vector,
``w = w_t + sigmoid(theta) * (w_s - w_t)``, on a *candidate set* only: the ``candidates``
fraction of block weights with the largest first-order gain ``dM/dw * (w_s - w_t)`` (one
weight-level ``attribution`` pass on the same prompts), so memory stays a few times the
models' own on large models. Weights outside the candidates keep gate 0. At binary gates:
``transplant(pair, mask, alpha=1)`` (:class:`~.gates.WeightGates`).

``theta`` minimises, by ``steps`` updates each on a ``minibatch`` of the scoring prompts
(seeded by score()'s ``seed``; ``minibatch=None``: every prompt each step), the task loss +
``lam_ret`` x KL to the unedited target + ``lam_sparse`` x the expected fraction of block
parameters moved (:mod:`~.gate_training`). Only ``theta`` is trained: the relaxed weights go
to the bridge through :func:`torch.func.functional_call`, so no parameter of either model
is written (fused copies such as GPT-NeoX's q/k/v are re-derived).

Cost, measured on SmolLM2-135M (``benchmarks/bench_learned_mask.py``): a step costs about
one forward + backward of the target on its minibatch, so the run costs about
``steps * minibatch`` prompt passes whatever the number of prompts; the defaults are sized to
stay under 10 attribution passes at >= 96 prompts. The old behaviour (every step a full pass
over every prompt) is ``minibatch=None``.

Output (units): the final gates (rank by gate), columns ``gate`` and ``theta``;
``suggested`` = the units with gate > 0.5, ``budget_rule = "score"``, and ``meta`` the
final loss terms. Output (weights): the gates as one tensor per HF tensor (0 outside the
candidates), ``suggested`` = a :class:`~tl_transplant.edit.weights.WeightMask` of the gates
> 0.5, ``budget_rule = "per_param"`` (budgets buy candidates in gate order and never
weights outside them). ``contrast=`` (base class) trains a second mask on the contrast task
and subtracts its gates; for a retention term inside one optimisation ``retention_prompts=``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from tl_transplant.arch.units import Unit
from tl_transplant.edit.weights import WeightMask, top_weights
from tl_transplant.scoring.attribution import Attribution
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.gate_training import REF_CACHE_BYTES, Optimizer, train_gates
from tl_transplant.scoring.gates import GatedTarget, KVMode, WeightGates
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    WeightRawScores,
    register,
)

_Finite = Field(allow_inf_nan=False)


@register
class LearnedMask(Scorer):
    """A sigmoid gate per unit (or per candidate weight) on the source-target delta."""

    name = "learned_mask"
    kinds = ("head", "kv_head", "neuron", "linear")
    default_kinds = ("head", "neuron")
    needs_answers = True
    signed = False
    weight_level = True

    class Options(ScorerOptions):
        steps: Annotated[int, Field(ge=1, description=(
            "an int >= 1: optimisation steps, each on `minibatch` prompts"))] = 32
        lr: Annotated[float, Field(gt=0, allow_inf_nan=False, description=(
            "a finite number > 0: learning rate (Adam for units, normalised gradient "
            "steps for weights)"))] = 0.5
        # sparsity weight (score()'s own `lam` is the contrast weight, hence the name)
        lam_sparse: Annotated[float, Field(ge=0, allow_inf_nan=False, description=(
            "a finite number >= 0: weight of the expected fraction of block parameters "
            "moved"))] = 30.0
        lam_ret: Annotated[float, Field(ge=0, allow_inf_nan=False, description=(
            "a finite number >= 0: weight of the KL to the unedited target"))] = 1.0
        init: Annotated[float, Field(allow_inf_nan=False, description=(
            "a finite number: initial gate logit (-3: gates start at 0.047)"))] = -3.0
        kv: KVMode = "group"  # as transplant's kv: a head's gate also moves its KV group
        retention_prompts: list[str] | None = None  # KL on these instead of the task contexts
        minibatch: Annotated[int, Field(ge=1)] | None = Field(default=16, description=(
            "an int >= 1 or None: prompts per step, drawn without replacement epoch by "
            "epoch in an order fixed by score()'s seed; None: every prompt each step"))
        candidates: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description=(
            "a fraction in (0, 1] (units='weight' only): the share of block weights that "
            "get a gate, those with the largest first-order gain"))] = 0.02

    def check(self) -> None:
        rp = self.opts.retention_prompts
        if rp is not None and not rp:
            raise ScoringError(
                "learned_mask: retention_prompts is empty; pass prompt strings or None "
                "(KL on the task prompts' contexts)"
            )

    def _retention(self, data: ScoringData) -> ScoringData | None:
        rp = self.opts.retention_prompts
        if rp is None or self.opts.lam_ret <= 0:
            return None
        return ScoringData("retention", list(rp), None, data.prepend_bos)

    def _train(self, gates: Any, theta0: torch.Tensor, data: ScoringData,
               optimizer: Optimizer, desc: str) -> Any:
        o = self.opts
        return train_gates(gates, theta0, self.ctx, data, steps=o.steps, lr=o.lr,
                           lam_sparse=o.lam_sparse, lam_ret=o.lam_ret, minibatch=o.minibatch,
                           retention=self._retention(data), optimizer=optimizer, desc=desc)

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        gated = GatedTarget(self.ctx.pair, units, kv=self.opts.kv)
        theta0 = torch.full((len(units),), float(self.opts.init), dtype=torch.float64)
        res = self._train(gated, theta0, data, "adam", "learned_mask")
        th = res.theta
        gates = torch.sigmoid(th)
        chosen = gates > 0.5
        suggested = [u for u, c in zip(units, chosen.tolist()) if c]
        meta = {
            "loss": res.last,
            "loss_history": res.history,
            "frac_params": gated.moved_fraction(gates),
            "suggested_frac_params": gated.moved_fraction(chosen.to(torch.float64)),
            "block_params": gated.block_params,
        }
        self._units = list(units)
        return RawScores(gates, None, columns={"gate": gates, "theta": th}, meta=meta,
                         budget_rule="score", suggested=suggested)

    def combine(self, task: RawScores, contrast: RawScores, lam: float) -> RawScores:
        """Task gates minus ``lam`` times the contrast task's gates; suggested: combined > 0.5."""
        raw = super().combine(task, contrast, lam)
        units = getattr(self, "_units", [])
        meta = {k: v for k, v in raw.meta.items() if k != "suggested"}
        return RawScores(raw.values, raw.consistency, raw.columns, meta,
                         budget_rule=raw.budget_rule, alpha_scale=raw.alpha_scale,
                         suggested=[u for u, v in zip(units, raw.values.tolist()) if v > 0.5])

    # ---- single weights ------------------------------------------------------------------
    def run_weights(self, data: ScoringData | None) -> WeightRawScores:
        """Gates of the candidate weights (0 elsewhere), learned as for units."""
        assert data is not None
        pair = self.ctx.pair
        gain = Attribution(self.ctx).run_weights(data).values
        total = sum(int(v.numel()) for v in gain.values())
        n_cand = max(1, round(self.opts.candidates * total))
        cand = top_weights(gain, n_cand, positive_only=True)
        del gain
        if not cand:
            raise ScoringError(
                "learned_mask (weights): no weight has a positive first-order gain on this "
                "task, so there is no candidate to gate"
            )
        gates = WeightGates(pair, cand)
        theta0 = torch.full((gates.n,), float(self.opts.init), dtype=torch.float64)
        res = self._train(gates, theta0, data, "normalized_sgd", "learned_mask (weights)")
        g = torch.sigmoid(res.theta)
        values = gates.scatter(g)
        shapes = {n: tuple(pair.layout.shapes[n]) for n in pair.layout.unit_tensors()}
        meta: dict[str, Any] = {
            "loss": res.last,
            "loss_history": res.history,
            "n_candidates": gates.n,
            "frac_candidates": gates.n / max(1, gates.block_params),
            "frac_params": float(g.sum()) / max(1, gates.block_params),
            "block_params": gates.block_params,
        }
        return WeightRawScores(values, meta, budget_rule="per_param",
                               suggested=_mask_above(values, shapes, 0.5))

    def combine_weights(
        self, task: WeightRawScores, contrast: WeightRawScores, lam: float
    ) -> WeightRawScores:
        """Task gates minus ``lam`` times the contrast task's; suggested: combined > 0.5."""
        raw = super().combine_weights(task, contrast, lam)
        shapes = {n: tuple(v.shape) for n, v in raw.values.items()}
        meta = {k: v for k, v in raw.meta.items() if k != "suggested"}
        return WeightRawScores(raw.values, meta, budget_rule=raw.budget_rule,
                               alpha_scale=raw.alpha_scale,
                               suggested=_mask_above(raw.values, shapes, 0.5))


def _mask_above(values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                thr: float) -> WeightMask:
    return WeightMask({n: (v.reshape(-1) > thr).nonzero().reshape(-1) for n, v in values.items()},
                      shapes)


__all__ = ["REF_CACHE_BYTES", "GatedTarget", "LearnedMask", "WeightGates"]
