"""Reversible weight transplants with a blend strength alpha.

Inside ``with transplant(pair, units, alpha):`` the target's weights for those
units are ``(1 - alpha) * target + alpha * source``; on exit (also by an
exception) the original values are written back bit for bit.
``apply_transplant`` makes the same edit permanent and returns a
:class:`Manifest` naming what changed, with hashes.

Edits go to the HF tensors (the one source of truth) and then to any copy the
TransformerLens bridge holds, so the hooked forward, ``generate`` and
``export_hf`` all see the same weights.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int

from tl_transplant.layouts import TensorSlice
from tl_transplant.manifest import MANIFEST_FORMAT as MANIFEST_FORMAT  # re-exported
from tl_transplant.manifest import Manifest
from tl_transplant.pair import ModelPair
from tl_transplant.units import Head, KVHead, Unit, parse_units, unit_sort_key
from tl_transplant.weights import Selection, WeightMask, WeightMaskError

KVMode = Literal["group", "none"]


class TransplantError(ValueError):
    """A transplant request that cannot be carried out safely."""


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype-exact, device-independent)."""
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


@torch.no_grad()
def blend_values(
    name: str, t_vals: torch.Tensor, s_vals: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``(1 - alpha) * t + alpha * s`` cast to the target dtype: the one blend rule.

    Computed in float32 (float64 for float64 tensors); ``alpha == 1`` copies the
    source cast to the target dtype and ``alpha == 0`` keeps the target. Shared
    by the in-memory and out-of-core paths so that both give identical bits.
    Raises :class:`TransplantError` if the source values hold NaN or inf.
    """
    if not torch.isfinite(s_vals).all():
        raise TransplantError(
            f"source tensor {name} has NaN or inf values in the slices to transplant; "
            "refusing before any weight changes."
        )
    if alpha == 1.0:
        return s_vals.to(t_vals.dtype)
    if alpha == 0.0:
        return t_vals.clone()
    work = torch.float64 if t_vals.dtype == torch.float64 else torch.float32
    out = (1.0 - alpha) * t_vals.to(work) + alpha * s_vals.to(work)
    return out.to(t_vals.dtype)


def _flat_index(shape: tuple[int, ...], s: TensorSlice) -> Int[torch.Tensor, " n"]:
    """Row-major flat indices of ``s`` in a contiguous tensor of ``shape`` (O(slice) memory)."""
    idx = torch.zeros((), dtype=torch.long)
    stride = 1
    strides = []
    for n in reversed(shape):
        strides.append(stride)
        stride *= n
    for d, (n, st) in enumerate(zip(shape, reversed(strides))):
        r = torch.arange(s.start, s.stop) if d == s.dim else torch.arange(n)
        idx = idx.unsqueeze(-1) + r * st
    return idx.reshape(-1)


@dataclass(frozen=True)
class Plan:
    """Units resolved to flat indices into HF tensors: what a transplant will touch.

    ``index[name]`` holds the sorted, distinct flat (row-major) positions of
    ``name`` that some unit covers, so apply/revert cost grows with the weights
    moved, not with the size of the tensors they live in.
    """

    requested: tuple[Unit, ...]
    kv_added: tuple[KVHead, ...]
    slices: dict[Unit, tuple[TensorSlice, ...]]
    index: dict[str, Int[torch.Tensor, " n"]]
    shapes: dict[str, tuple[int, ...]]
    #: The weight mask, for a weight-level transplant (``requested`` is then empty).
    mask: WeightMask | None = None

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(sorted(set(self.requested) | set(self.kv_added), key=unit_sort_key))

    @property
    def n_params(self) -> int:
        """Distinct scalar weights touched (overlaps counted once)."""
        return int(sum(len(i) for i in self.index.values()))

    @cached_property
    def masks(self) -> dict[str, Bool[torch.Tensor, "..."]]:
        """Boolean masks of the touched elements (built on demand, for inspection)."""
        out = {}
        for name, idx in self.index.items():
            m = torch.zeros(self.shapes[name], dtype=torch.bool)
            m.view(-1)[idx] = True
            out[name] = m
        return out


def _mask_plan(pair: ModelPair, mask: WeightMask) -> Plan:
    """A weight mask's plan: its flat indices are the plan's (``kv`` does not apply)."""
    if not mask:
        raise TransplantError(
            "the weight mask selects no weight; a transplant moves at least one weight"
        )
    try:
        mask.check({n: tuple(t.shape) for n, t in pair.target.params.items()},
                   pair.layout.unit_tensors())
    except WeightMaskError as e:
        raise TransplantError(str(e)) from None
    index = dict(mask.index)
    _check_loaded(pair, index)
    return Plan((), (), {}, index, dict(mask.shapes), mask)


def _check_loaded(pair: ModelPair, index: dict[str, torch.Tensor]) -> None:
    for side in (pair.target, pair.source):
        off = [n for n in index if side.params[n].device.type == "meta"]
        if off:
            raise TransplantError(
                f"{side.name!r} holds {off[0]} (and {len(off) - 1} more of the tensors to "
                "transplant) offloaded by its device_map (cpu/disk offload), so it cannot be "
                "edited in memory. Map those layers to accelerators (no 'cpu'/'disk' entries "
                "next to GPUs), or apply the manifest with apply_manifest_out_of_core."
            )


def plan_transplant(
    pair: ModelPair, units: Selection | str | Unit, kv: KVMode = "group"
) -> Plan:
    """Resolve units (adding KV groups of query heads when ``kv="group"``) to flat indices;
    a :class:`~tl_transplant.weights.WeightMask` gives its own indices."""
    if kv not in ("group", "none"):
        raise TransplantError(f"kv must be 'group' or 'none', got {kv!r}")
    if isinstance(units, WeightMask):
        return _mask_plan(pair, units)
    requested = tuple(dict.fromkeys(pair.validate(u) for u in parse_units(units)))
    if not requested:
        raise TransplantError(
            "no units to transplant (the unit list is empty); name at least one unit, "
            "e.g. 'L0.H1' or 'L1.mlp.down_proj'"
        )
    kv_added: list[KVHead] = []
    if kv == "group":
        have = set(requested)
        for u in requested:
            if isinstance(u, Head):
                g = pair.layout.kv_group_of(u)
                if g not in have:
                    have.add(g)
                    kv_added.append(g)
    slices = {u: pair.layout.slices(u) for u in (*requested, *kv_added)}
    parts: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for sl in slices.values():
        for s in sl:
            shapes[s.param] = tuple(pair.target.params[s.param].shape)
            parts.setdefault(s.param, []).append(_flat_index(shapes[s.param], s))
    index = {n: (p[0] if len(p) == 1 else torch.unique(torch.cat(p))) for n, p in parts.items()}
    _check_loaded(pair, index)
    return Plan(requested, tuple(kv_added), slices, index, shapes)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of a parameter's data (HF parameters are contiguous)."""
    if not t.is_contiguous():
        raise TransplantError("cannot edit a non-contiguous parameter in place")
    return t.data.view(-1)


def _identity(side: Any) -> dict[str, Any]:
    return dict(side.identity)


class transplant:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: blend the target's unit weights toward the source's, then restore.

    >>> with transplant(pair, ["L1.H2", "L0.N7"], alpha=0.5):   # doctest: +SKIP
    ...     logits = pair.target.bridge(tokens)

    ``kv="group"`` (default) brings each query head's KV group along, since a
    query head without its K/V rows transplants poorly under GQA.
    """

    def __init__(
        self,
        pair: ModelPair,
        units: Selection | str | Unit,
        alpha: float = 1.0,
        *,
        kv: KVMode = "group",
        allow_extrapolation: bool = False,
    ) -> None:
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise TransplantError(f"alpha must be a finite number, got {alpha}")
        if not (0.0 <= alpha <= 1.0) and not allow_extrapolation:
            raise TransplantError(
                f"alpha={alpha} is outside [0, 1]; pass allow_extrapolation=True "
                "(--allow-extrapolation on the command line) to push the target past the "
                "source (or away from it)."
            )
        self.pair = pair
        self.alpha = alpha
        self.kv = kv
        self.plan = plan_transplant(pair, units, kv=kv)
        self._saved: dict[str, torch.Tensor] | None = None

    # -- mechanics ---------------------------------------------------------------------
    @torch.no_grad()
    def _blend_values(self, name: str) -> torch.Tensor:
        idx = self.plan.index[name]
        t = _flat(self.pair.target.params[name])
        s = _flat(self.pair.source.params[name])
        s_vals = s.index_select(0, idx.to(s.device)).to(device=t.device)
        return blend_values(name, t.index_select(0, idx.to(t.device)), s_vals, self.alpha)

    @torch.no_grad()
    def apply(self) -> transplant:
        """Write the blended values into the target (saving the originals)."""
        if self._saved is not None:
            raise TransplantError("this transplant is already applied")
        # Compute every new value first, so a refusal leaves the model untouched.
        new = {name: self._blend_values(name) for name in self.plan.index}
        saved: dict[str, torch.Tensor] = {}
        params = self.pair.target.params
        for name, vals in new.items():
            flat = _flat(params[name])
            idx = self.plan.index[name].to(flat.device)
            saved[name] = flat.index_select(0, idx)
            flat.index_copy_(0, idx, vals)
        self._saved = saved
        self.pair.target.refresh_mirrors(new.keys())
        self.pair.active.append(self)
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved original values back, bit-exactly."""
        if self._saved is None:
            return
        active = self.pair.active
        if self in active and active[-1] is not self:
            later = active[active.index(self) + 1 :]
            raise TransplantError(
                f"restore transplants in the reverse order of applying them: {len(later)} "
                "transplant(s) applied after this one are still active (restore them first); "
                "restoring this one now would write back values that they changed"
            )
        params = self.pair.target.params
        for name, vals in self._saved.items():
            flat = _flat(params[name])
            flat.index_copy_(0, self.plan.index[name].to(flat.device), vals)
        self.pair.target.refresh_mirrors(self._saved.keys())
        self._saved = None
        if self in self.pair.active:
            self.pair.active.remove(self)

    def __enter__(self) -> transplant:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # -- reporting ---------------------------------------------------------------------
    def manifest(self, *, with_hashes: bool = True) -> Manifest:
        """Describe this transplant (hashes are of the tensors as they are now)."""
        params = self.pair.target.params
        tensors = []
        for name, idx in sorted(self.plan.index.items()):
            t = params[name]
            row: dict[str, Any] = {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "n_changed": len(idx),
            }
            if with_hashes:
                row["sha256"] = tensor_sha256(t)
                if self._saved is not None:
                    orig = t.detach().clone().reshape(-1)
                    orig.index_copy_(0, idx.to(orig.device), self._saved[name])
                    row["sha256_before"] = tensor_sha256(orig.view(t.shape))
            tensors.append(row)
        by_kind: dict[str, int] = {}
        for u in self.plan.units:
            by_kind[u.kind] = by_kind.get(u.kind, 0) + 1
        return Manifest(
            units=[str(u) for u in self.plan.requested],
            kv_added=[str(u) for u in self.plan.kv_added],
            alpha=self.alpha,
            kv=self.kv,
            source=_identity(self.pair.source),
            target=_identity(self.pair.target),
            tensors=tensors,
            n_params_moved=self.plan.n_params,
            n_params_target=int(self.pair.target.identity.get("n_params", 0)),
            n_units_by_kind=by_kind,
        )


def apply_transplant(
    pair: ModelPair,
    units: Selection | str | Unit,
    alpha: float = 1.0,
    *,
    kv: KVMode = "group",
    allow_extrapolation: bool = False,
) -> Manifest:
    """Permanently blend the units into the target; returns the manifest (also kept on the pair).

    Refused inside an active ``with transplant(...)`` block (its exit would undo this
    edit). Applying to units an earlier permanent transplant already moved compounds
    the blend (two alpha=0.5 give 0.75 of the source); that is allowed, warned about,
    and recorded in ``manifest.extra["compounds_with"]``.
    """
    if pair.active:
        raise TransplantError(
            f"apply_transplant inside an active transplant() context ({len(pair.active)} "
            "active): leaving the context would undo this permanent edit. Call it outside "
            "the `with transplant(...)` block, or restore the active transplants first."
        )
    t = transplant(pair, units, alpha, kv=kv, allow_extrapolation=allow_extrapolation)
    overlaps = _overlaps(pair, t.plan)
    t.apply()
    m = t.manifest()
    t._saved = None  # permanent: nothing to restore
    pair.active.remove(t)
    if overlaps:
        m.extra["compounds_with"] = overlaps
        first = overlaps[0]
        warnings.warn(
            f"this transplant touches {sum(len(o['units']) for o in overlaps)} unit(s) that "
            f"earlier permanent transplant(s) already moved (e.g. {first['units'][0]} in "
            f"transplant #{first['transplant']} at alpha={first['alpha']:g}); the blends "
            "compound. Recorded in the manifest as extra['compounds_with'].",
            UserWarning,
            stacklevel=2,
        )
    pair.applied.append(m)
    return m


def _overlaps(pair: ModelPair, plan: Plan) -> list[dict[str, Any]]:
    """Earlier permanent transplants on the pair that moved some of ``plan``'s units."""
    mine = {str(u) for u in plan.units}
    out = []
    for i, prior in enumerate(pair.applied):
        theirs = {*getattr(prior, "units", []), *getattr(prior, "kv_added", [])}
        common = sorted(mine & theirs)
        if common:
            out.append({"transplant": i, "units": common, "alpha": float(prior.alpha)})
    return out
