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

On a large model (``unit_candidates``; by default above
:data:`AUTO_ALL_UNITS_MAX_PARAMS` block parameters) only the units with the largest
``attribution`` get gates, until they hold :data:`AUTO_UNIT_CANDIDATES` of the block
parameters; the others score 0 (``theta`` NaN) and the run says so. A gated tensor keeps only
its gated rows or columns, and gradients collect there (:class:`~.gates.GatedTarget`), so
the memory is a few times the candidates plus one relaxed copy of the tensors they touch.

Output (units): the final gates (rank by gate), columns ``gate`` and ``theta``;
``suggested`` = the units with gate > 0.5, ``budget_rule = "score"``, and ``meta`` the
final loss terms. Output (weights): the gates as one tensor per HF tensor (0 outside the
candidates), ``suggested`` = a :class:`~tl_transplant.edit.weights.WeightMask` of the gates
> 0.5, ``budget_rule = "per_param"`` (budgets buy candidates in gate order and never
weights outside them). ``contrast=`` (base class) trains a second mask on the contrast task
and subtracts its gates; for a retention term inside one optimisation ``retention_prompts=``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from tl_transplant.arch.units import Unit
from tl_transplant.edit.budget import block_params
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

#: ``unit_candidates="auto"`` gates every unit up to this many block parameters; above, the
#: relaxed copies of every gated tensor and their gradients would be several times the
#: model, so only the units with the largest attribution get gates
#: (:data:`AUTO_UNIT_CANDIDATES` of the block parameters).
AUTO_ALL_UNITS_MAX_PARAMS = 300_000_000
AUTO_UNIT_CANDIDATES = 0.1


def unit_fraction(option: float | str | None, block_params: int) -> float | None:
    """The share of block parameters whose units get gates at the unit grain (None: every
    unit), from the ``unit_candidates`` option and the model's block parameter count."""
    if option == "auto":
        return None if block_params <= AUTO_ALL_UNITS_MAX_PARAMS else AUTO_UNIT_CANDIDATES
    return None if option is None or float(option) >= 1 else float(option)


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
        unit_candidates: (Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None
                          | Literal["auto"]) = Field(default="auto", description=(
            "a fraction in (0, 1], None or 'auto' (unit grain): gate only the units with the "
            "largest attribution, until their parameters reach this share of the block "
            "parameters (the others keep gate 0); None: every unit; 'auto': every unit up to "
            f"{AUTO_ALL_UNITS_MAX_PARAMS // 10**6}M block parameters, "
            f"{AUTO_UNIT_CANDIDATES:g} above"))

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

    def _candidates(self, units: list[Unit], data: ScoringData, frac: float) -> list[int]:
        """Positions (in ``units``) of the units with the largest attribution, until their
        parameters reach ``frac`` of the block parameters."""
        layout = self.ctx.pair.layout
        block = block_params(layout)
        gain = Attribution(self.ctx).run(units, data).values
        out: list[int] = []
        moved = 0
        for i in torch.argsort(gain, descending=True, stable=True).tolist():
            if moved >= frac * block:
                break
            out.append(i)
            moved += layout.n_params(units[i])
        self.ctx.note(
            f"learned_mask: gates on the {len(out)} of {len(units)} units with the largest "
            f"attribution ({moved / max(1, block):.1%} of {block / 1e6:.0f}M block parameters; "
            "unit_candidates=None gates every unit)")
        return sorted(out)

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        frac = unit_fraction(self.opts.unit_candidates,
                             block_params(self.ctx.pair.layout))
        pick = (self._candidates(units, data, frac) if frac is not None
                else list(range(len(units))))
        cand = [units[i] for i in pick]
        gated = GatedTarget(self.ctx.pair, cand, kv=self.opts.kv)
        theta0 = torch.full((len(cand),), float(self.opts.init), dtype=torch.float64)
        res = self._train(gated, theta0, data, "adam", "learned_mask")
        idx = torch.tensor(pick, dtype=torch.long)
        th = torch.full((len(units),), math.nan, dtype=torch.float64).index_copy(
            0, idx, res.theta)  # NaN: no gate (not a candidate)
        gates = torch.zeros(len(units), dtype=torch.float64).index_copy(
            0, idx, torch.sigmoid(res.theta))
        g_cand = gates[idx]
        chosen = g_cand > 0.5
        suggested = [u for u, c in zip(cand, chosen.tolist()) if c]
        meta = {
            "loss": res.last,
            "loss_history": res.history,
            "frac_params": gated.moved_fraction(g_cand),
            "suggested_frac_params": gated.moved_fraction(chosen.to(torch.float64)),
            "block_params": gated.block_params,
            "n_candidates": len(cand),
            "unit_candidates": frac,
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


__all__ = ["AUTO_ALL_UNITS_MAX_PARAMS", "AUTO_UNIT_CANDIDATES", "REF_CACHE_BYTES", "GatedTarget",
           "LearnedMask", "WeightGates", "unit_fraction"]
