"""Relaxed targets for learned masks: the target's weights as a function of gate logits.

Two grains, one contract (:class:`Relaxation`): ``relax(theta)`` returns the relaxed HF
tensors (name -> tensor in the target's dtype, differentiable in ``theta``) and the expected
number of parameters moved; the bridge runs them through
:class:`~tl_transplant.scoring.functional.FunctionalTarget`, so no parameter of either model
is written.

* :class:`GatedTarget` (units): unit ``u`` has gate ``m_u = sigmoid(theta_u)``; a weight
  element covered by the units ``U(w)`` becomes ``lerp(w_t, w_s, G)`` with
  ``G = 1 - prod_{u in U(w)} (1 - m_u)``. With ``kv="group"`` a query head's gate also
  covers its KV group's rows (as :func:`tl_transplant.edit.edits.transplant` does). At binary
  gates the relaxed model is exactly ``transplant(pair, {u : m_u = 1}, alpha=1, kv=kv)``.
* :class:`WeightGates` (single weights): candidate weight ``i`` (flat index into one HF
  tensor) has gate ``g_i = sigmoid(theta_i)`` and becomes ``lerp(w_t, w_s, g_i)``; every other
  weight keeps the target's value. At binary gates: ``transplant(pair, mask, alpha=1)``.

``torch.lerp`` is exact at gates 0 and 1, and the source is cast to the target's dtype first,
as a transplant copies it. ``vjp(theta, grads)`` is the gradient of ``sum <relaxed, grads>``
with respect to ``theta`` computed directly (row or column dot products with the delta, no
autograd graph over the relaxed tensors); ``moved(theta)`` the differentiable expected
number of parameters moved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from tl_transplant.arch.units import Head, Unit
from tl_transplant.edit.budget import block_params
from tl_transplant.scoring.functional import FunctionalTarget
from tl_transplant.scoring.registry import ScoringError
from tl_transplant.scoring.tensors import work

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair

KVMode = Literal["group", "none"]


class Relaxation(Protocol):
    """What :func:`~tl_transplant.scoring.gate_training.train_gates` optimises."""

    fn: FunctionalTarget
    block_params: int

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def relax(
        self, theta: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...

    def moved(self, theta: Float[torch.Tensor, " n"]) -> torch.Tensor: ...

    def leaves(self, theta: Float[torch.Tensor, " n"]) -> dict[str, torch.Tensor]: ...

    def assemble(self, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def vjp(
        self, theta: Float[torch.Tensor, " n"], grads: Mapping[str, torch.Tensor]
    ) -> Float[torch.Tensor, " n"]: ...


def _check_in_memory(pair: ModelPair, name: str, why: str) -> None:
    """Raise if ``name`` is offloaded on either side or not contiguous on the target."""
    for side in (pair.target, pair.source):
        if side.params[name].device.type == "meta":
            raise ScoringError(
                f"{side.name}: tensor {name} is offloaded (device_map); {why} needs the "
                "block tensors in memory"
            )
    if not pair.target.params[name].is_contiguous():
        raise ScoringError(f"{why}: target tensor {name} is not contiguous")


def _tensors(pair: ModelPair, name: str, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, source cast as a transplant casts it), both in working precision."""
    _check_in_memory(pair, name, why)
    t, s = pair.target.params[name], pair.source.params[name]
    return work(t.detach()), work(s.detach().to(dtype=t.dtype).to(t.device))


@dataclass
class _Gated:
    """One HF tensor some unit covers: who covers which indices along which dim.

    Gated along one dim (every unit kind alone, and heads with their KV groups), the tensor
    is *compact*: ``upos`` are the gated positions along that dim, and ``ts``/``ss`` the
    target's and (cast) source's values there, at the target's dtype (the tensors
    themselves, not copies, when every position is gated and no cast is needed). Gated
    along several dims (heads and whole linears together): ``upos`` is None and ``ts``/``ss``
    are whole working-precision copies.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: torch.Tensor  # the target's tensor (detached), where ungated values come from
    ts: torch.Tensor
    ss: torch.Tensor
    upos: Int[torch.Tensor, " u"] | None
    dims: list[tuple[int, Int[torch.Tensor, " k"], Int[torch.Tensor, " k"]]]  # dim, pos, unit

    @property
    def dim(self) -> int:
        return self.dims[0][0]

    def gate_at(self, keep_log: Float[torch.Tensor, " n"]) -> torch.Tensor:
        """Gate ``G = 1 - exp(k)`` of the stored values (``ts``'s shape, broadcastable)."""
        k = _keep(self, keep_log)
        if self.upos is not None and self.upos.numel() != self.shape[self.dim]:
            k = k.index_select(self.dim, self.upos)
        return -torch.expm1(k)

    def assemble(self, values: torch.Tensor) -> torch.Tensor:
        """The whole relaxed tensor from the stored positions' values (differentiable)."""
        if self.upos is None or self.upos.numel() == self.shape[self.dim]:
            return values
        return self.base.index_copy(self.dim, self.upos, values)


def _compact(pair: ModelPair, name: str, dims: list[tuple[int, torch.Tensor, torch.Tensor]],
             device: torch.device) -> _Gated:
    """The :class:`_Gated` record of one tensor (see there for what is stored)."""
    t = pair.target.params[name]
    if len(dims) > 1:
        w_t, w_s = _tensors(pair, name, "learned_mask")
        return _Gated(name, tuple(t.shape), t.dtype, t.detach(), w_t, w_s, None, dims)
    _check_in_memory(pair, name, "learned_mask")
    d, pos, _ = dims[0]
    upos = torch.unique(pos)
    src = pair.source.params[name].detach()
    if src.dtype != t.dtype or src.device != t.device:
        src = src.to(dtype=t.dtype, device=t.device)
    if upos.numel() == t.shape[d]:
        ts, ss = t.detach(), src
    else:
        ts, ss = t.detach().index_select(d, upos), src.index_select(d, upos)
    return _Gated(name, tuple(t.shape), t.dtype, t.detach(), ts, ss, upos, dims)


class GatedTarget:
    """The target whose unit slices are blended toward the source by per-unit gates.

    Gates enter as *keep logs* ``k_u = log(1 - m_u)`` (``-softplus(theta_u)``;
    ``-inf`` for a fully open gate), so that products of ``1 - m`` are sums and binary
    gates are exact. Nothing is written to either model. Memory: the gated positions'
    target and source values (nothing when a tensor is gated whole in its own dtype), and
    per step one relaxed copy of each gated tensor; gradients are taken at the gated
    positions only (:meth:`leaves`).
    """

    def __init__(self, pair: ModelPair, units: Sequence[Unit], *, kv: KVMode = "group") -> None:
        if kv not in ("group", "none"):
            raise ScoringError(f"kv must be 'group' or 'none', got {kv!r}")
        self.pair = pair
        self.units = list(units)
        layout = pair.layout
        self._device = pair.target.device
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
            dims = [(d, *_expand(*ranges, self._device)) for d, ranges in sorted(by_dim.items())]
            self.tensors.append(_compact(pair, name, dims, self._device))
        self.block_params = block_params(pair.layout)
        self.fn = FunctionalTarget(pair, [g.name for g in self.tensors])

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the gates (float32, or float64 for a float64 target)."""
        if not self.tensors:
            return torch.float32
        return torch.promote_types(self.tensors[0].dtype, torch.float32)

    def relax(
        self, theta: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Relaxed HF tensors at gate logits ``theta`` and the expected number moved."""
        return self.weights(-F.softplus(theta))

    def _values(self, g: _Gated, keep_log: Float[torch.Tensor, " n"]) -> torch.Tensor:
        """The relaxed values at ``g``'s stored positions, in the target's dtype."""
        gate = g.gate_at(keep_log)
        wd = self.dtype
        return torch.lerp(g.ts.to(wd), g.ss.to(wd), gate.to(wd)).to(g.dtype)

    def weights(
        self, keep_log: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Relaxed HF tensors (name -> tensor, target dtype) and the expected number moved."""
        out = {g.name: g.assemble(self._values(g, keep_log)) for g in self.tensors}
        return out, self._moved(keep_log)

    def leaves(self, theta: Float[torch.Tensor, " n"]) -> dict[str, torch.Tensor]:
        """The relaxed values at the gated positions (no graph to ``theta``), each a leaf
        that requires grad: gradients collect there only, not over whole tensors."""
        with torch.no_grad():
            keep_log = -F.softplus(theta.detach())
            return {g.name: self._values(g, keep_log).requires_grad_(True)
                    for g in self.tensors}

    def assemble(self, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole relaxed HF tensors from :meth:`leaves` (differentiable in them)."""
        return {g.name: g.assemble(leaves[g.name]) for g in self.tensors}

    def _moved(self, keep_log: Float[torch.Tensor, " n"]) -> torch.Tensor:
        moved = keep_log.new_zeros(())
        for g in self.tensors:
            gate = -torch.expm1(_keep(g, keep_log))
            moved = moved + gate.sum() * (math.prod(g.shape) // gate.numel())
        return moved

    def moved(self, theta: Float[torch.Tensor, " n"]) -> torch.Tensor:
        """Expected number of parameters moved at gate logits ``theta`` (differentiable)."""
        return self._moved(-F.softplus(theta))

    def vjp(
        self, theta: Float[torch.Tensor, " n"], grads: Mapping[str, torch.Tensor]
    ) -> Float[torch.Tensor, " n"]:
        """``d/dtheta sum_n <relaxed_n, grads_n>`` without an autograd graph.

        ``grads`` are of whole tensors or of :meth:`leaves` (the gated positions only).
        With ``G = 1 - exp(k)``: ``dL/dk = -(grad * delta) * exp(k)``, reduced onto each
        gated dim (one dot product per row or column when a tensor is gated along one dim).
        """
        with torch.no_grad():
            theta = theta.detach()
            keep_log = -F.softplus(theta)
            d_keep = torch.zeros_like(keep_log)
            wd = self.dtype
            for g in self.tensors:
                gw = grads.get(g.name)
                if gw is None:
                    continue
                if g.upos is None:  # several gated dims: whole tensors
                    prod = torch.sub(g.ss, g.ts).mul_(gw.to(g.ts.dtype))
                    dk = prod.mul_(torch.exp(_keep(g, keep_log)).to(prod.dtype)).neg_()
                    nd = len(g.shape)
                    for d, pos, who in g.dims:
                        other = [i for i in range(nd) if i != d]
                        d_keep.index_add_(0, who, dk.sum(other).to(keep_log.dtype)[pos])
                    continue
                d, pos, who = g.dims[0]
                if tuple(gw.shape) == g.shape and gw.shape != g.ts.shape:
                    gw = gw.index_select(d, g.upos)  # a whole tensor's gradient
                prod = torch.sub(g.ss.to(wd), g.ts.to(wd)).mul_(gw.to(wd))  # grad * delta
                other = [i for i in range(len(g.shape)) if i != d]
                s = prod.sum(other) if other else prod
                kd = keep_log.new_zeros(g.shape[d]).index_add(0, pos, keep_log[who])
                full = keep_log.new_zeros(g.shape[d])
                full[g.upos] = -torch.exp(kd[g.upos]) * s.to(kd.dtype)
                d_keep.index_add_(0, who, full[pos])
            return d_keep * -torch.sigmoid(theta)

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


def _keep(g: _Gated, keep_log: Float[torch.Tensor, " n"]) -> torch.Tensor:
    """Log keep-probability ``k = sum over covering units of log(1 - m_u)`` of every element
    of one tensor, broadcastable to its shape (one axis per gated dim)."""
    k: torch.Tensor | None = None
    for d, pos, who in g.dims:
        kd = keep_log.new_zeros(g.shape[d]).index_add(0, pos, keep_log[who])
        view = [1] * len(g.shape)
        view[d] = g.shape[d]
        kd = kd.view(view)
        k = kd if k is None else k + kd
    assert k is not None
    return k


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


class WeightGates:
    """The target with a gate on each *candidate weight*: ``lerp(w_t, w_s, sigmoid(theta))``.

    ``candidates`` maps HF tensor names to sorted flat indices; ``theta`` is one vector over
    all candidates, tensor by tensor in name order (:attr:`offsets`). Weights outside the
    candidates keep the target's value. Nothing is written to either model. Memory: the
    candidates' target and source values and indices (a few times the candidate count),
    plus one relaxed copy of each tensor that holds a candidate, built per step.
    """

    def __init__(self, pair: ModelPair, candidates: Mapping[str, Int[torch.Tensor, " n"]]) -> None:
        self.pair = pair
        self.names = sorted(n for n, i in candidates.items() if i.numel())
        self._device = pair.target.device
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.index: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}  # the whole target tensor, working precision
        self._ct: dict[str, torch.Tensor] = {}  # candidates' target values
        self._cs: dict[str, torch.Tensor] = {}  # candidates' source values (target dtype)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for n in self.names:
            w_t, w_s = _tensors(pair, n, "learned_mask (weights)")
            idx = candidates[n].to(device=self._device, dtype=torch.long)
            self.shapes[n] = tuple(pair.target.params[n].shape)
            self.dtypes[n] = pair.target.params[n].dtype
            self.index[n] = idx
            self._t[n] = w_t
            self._ct[n] = w_t.reshape(-1).index_select(0, idx)
            self._cs[n] = w_s.reshape(-1).index_select(0, idx)
            self.offsets[n] = (pos, pos + int(idx.numel()))
            pos += int(idx.numel())
        self.n = pos
        self.block_params = block_params(pair.layout)
        self.fn = FunctionalTarget(pair, self.names)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._t.values())).dtype if self._t else torch.float32

    def relax(
        self, theta: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Relaxed HF tensors at gate logits ``theta`` and the expected number moved."""
        return self.with_gates(torch.sigmoid(theta))

    def with_gates(
        self, gates: Float[torch.Tensor, " n"]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Relaxed HF tensors at gate values in [0, 1] and the expected number moved."""
        out: dict[str, torch.Tensor] = {}
        for n in self.names:
            a, b = self.offsets[n]
            vals = torch.lerp(self._ct[n], self._cs[n], gates[a:b].to(self._ct[n].dtype))
            flat = self._t[n].reshape(-1).index_put((self.index[n],), vals)
            out[n] = flat.view(self.shapes[n]).to(self.dtypes[n])
        return out, gates.sum()

    def moved(self, theta: Float[torch.Tensor, " n"]) -> torch.Tensor:
        """Expected number of weights moved at gate logits ``theta`` (differentiable)."""
        return torch.sigmoid(theta).sum()

    def leaves(self, theta: Float[torch.Tensor, " n"]) -> dict[str, torch.Tensor]:
        """The whole relaxed tensors (no graph to ``theta``), each a leaf that requires grad."""
        with torch.no_grad():
            relaxed, _ = self.relax(theta.detach())
        return {n: r.requires_grad_(True) for n, r in relaxed.items()}

    def assemble(self, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The relaxed tensors themselves (:meth:`leaves` are whole tensors)."""
        return dict(leaves)

    def vjp(
        self, theta: Float[torch.Tensor, " n"], grads: Mapping[str, torch.Tensor]
    ) -> Float[torch.Tensor, " n"]:
        """``d/dtheta sum_n <relaxed_n, grads_n>``: the weights' gradients at the candidates
        times their delta, times ``sigmoid'(theta)``."""
        with torch.no_grad():
            theta = theta.detach()
            out = torch.zeros_like(theta)
            for n in self.names:
                gw = grads.get(n)
                if gw is None:
                    continue
                a, b = self.offsets[n]
                gc = gw.reshape(-1).index_select(0, self.index[n]).to(self._ct[n].dtype)
                out[a:b] = (gc * (self._cs[n] - self._ct[n])).to(out.dtype)
            sig = torch.sigmoid(theta)
            return out * sig * (1 - sig)

    def forward_gates(
        self, ids: Int[torch.Tensor, "batch seq"], gates: Float[torch.Tensor, " n"]
    ) -> Float[torch.Tensor, "batch seq vocab"]:
        """Logits with gate values in [0, 1] (1 = move the weight fully)."""
        relaxed, _ = self.with_gates(gates.to(device=self.device, dtype=self.dtype))
        return self.fn.forward(ids, relaxed)

    def scatter(self, values: Float[torch.Tensor, " n"]) -> dict[str, torch.Tensor]:
        """Per-candidate values as full tensors of every block tensor (0 elsewhere, float32
        CPU); tensors without a candidate are all zeros."""
        out: dict[str, torch.Tensor] = {}
        v = values.detach().to(device="cpu", dtype=torch.float32)
        for n in self.pair.layout.unit_tensors():
            t = torch.zeros(math.prod(self.pair.layout.shapes[n]), dtype=torch.float32)
            if n in self.offsets:
                a, b = self.offsets[n]
                t[self.index[n].cpu()] = v[a:b]
            out[n] = t.view(tuple(self.pair.layout.shapes[n]))
        return out


__all__ = ["GatedTarget", "KVMode", "Relaxation", "WeightGates"]
