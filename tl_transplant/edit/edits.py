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
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int

from tl_transplant.arch.model_layout import TensorSlice
from tl_transplant.arch.units import Head, KVHead, Unit, UnitError, parse_units, unit_sort_key
from tl_transplant.edit.manifest import MANIFEST_FORMAT as MANIFEST_FORMAT  # re-exported
from tl_transplant.edit.manifest import Manifest
from tl_transplant.edit.weights import Selection, WeightMask, WeightMaskError
from tl_transplant.errors import TLTransplantError
from tl_transplant.models.pair import ModelPair

KVMode = Literal["group", "none"]


class TransplantError(TLTransplantError, ValueError):
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


class PlanIndex(Mapping[str, Int[torch.Tensor, " n"]]):
    """Flat indices per touched tensor, where a tensor covered whole holds no index.

    ``index[name]`` gives the sorted distinct flat (row-major) positions, as a tensor;
    for a tensor in :attr:`full` it is made on demand (``arange(numel)``, not kept), so
    a plan over whole linears costs no memory per weight. :meth:`size` counts without
    materialising.
    """

    def __init__(
        self, partial: Mapping[str, Int[torch.Tensor, " n"]], full: Mapping[str, int]
    ) -> None:
        self.partial: dict[str, torch.Tensor] = dict(partial)
        #: Tensors covered whole: name -> number of elements.
        self.full: dict[str, int] = dict(full)
        self._names = sorted({*self.partial, *self.full})

    def __getitem__(self, name: str) -> Int[torch.Tensor, " n"]:
        if name in self.partial:
            return self.partial[name]
        if name in self.full:
            return torch.arange(self.full[name])
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def size(self, name: str) -> int:
        """Number of positions of ``name`` touched."""
        return self.full[name] if name in self.full else int(self.partial[name].numel())

    def is_full(self, name: str) -> bool:
        return name in self.full


@dataclass(frozen=True)
class Plan:
    """Units resolved to flat indices into HF tensors: what a transplant will touch.

    ``index[name]`` holds the sorted, distinct flat (row-major) positions of
    ``name`` that some unit covers, so apply/revert cost grows with the weights
    moved, not with the size of the tensors they live in. A tensor covered whole
    (a whole linear, every neuron of a layer, a full mask) keeps no index
    (:class:`PlanIndex`): it is edited, saved and restored as one tensor.
    """

    requested: tuple[Unit, ...]
    kv_added: tuple[KVHead, ...]
    slices: dict[Unit, tuple[TensorSlice, ...]]
    index: PlanIndex
    shapes: dict[str, tuple[int, ...]]
    #: The weight mask, for a weight-level transplant (``requested`` is then empty).
    mask: WeightMask | None = None

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(sorted(set(self.requested) | set(self.kv_added), key=unit_sort_key))

    @property
    def n_params(self) -> int:
        """Distinct scalar weights touched (overlaps counted once)."""
        return int(sum(self.index.size(n) for n in self.index))

    @cached_property
    def masks(self) -> dict[str, Bool[torch.Tensor, "..."]]:
        """Boolean masks of the touched elements (built on demand, for inspection)."""
        out = {}
        for name in self.index:
            if self.index.is_full(name):
                out[name] = torch.ones(self.shapes[name], dtype=torch.bool)
                continue
            m = torch.zeros(self.shapes[name], dtype=torch.bool)
            m.view(-1)[self.index[name]] = True
            out[name] = m
        return out


def _covers(shape: Sequence[int], parts: Sequence[TensorSlice]) -> bool:
    """Whether slices along one dim of a tensor together cover it whole."""
    for d, n in enumerate(shape):
        spans = sorted((s.start, s.stop) for s in parts if s.dim == d)
        reach = 0
        for a, b in spans:
            if a > reach:
                break
            reach = max(reach, b)
        if spans and reach >= n:
            return True
    return False


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
    numel = {n: math.prod(sh) for n, sh in mask.shapes.items()}
    full = {n: numel[n] for n, i in mask.index.items() if int(i.numel()) == numel[n]}
    index = PlanIndex({n: i for n, i in mask.index.items() if n not in full}, full)
    _check_loaded(pair, index)
    return Plan((), (), {}, index, dict(mask.shapes), mask)


def _check_loaded(pair: ModelPair, index: Mapping[str, Any]) -> None:
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
    a :class:`~tl_transplant.edit.weights.WeightMask` gives its own indices."""
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
    by_param: dict[str, list[TensorSlice]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for sl in slices.values():
        for s in sl:
            shapes[s.param] = tuple(pair.target.params[s.param].shape)
            by_param.setdefault(s.param, []).append(s)
    partial: dict[str, torch.Tensor] = {}
    full: dict[str, int] = {}
    for n, ps in by_param.items():
        if _covers(shapes[n], ps):
            full[n] = math.prod(shapes[n])
        else:
            p = [_flat_index(shapes[n], s) for s in ps]
            partial[n] = p[0] if len(p) == 1 else torch.unique(torch.cat(p))
    index = PlanIndex(partial, full)
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
        if isinstance(alpha, bool) or type(alpha).__name__ == "bool_":  # True is not 1.0
            raise TransplantError(f"alpha must be a number, got {alpha!r}")
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
    def _edit(self, name: str) -> torch.Tensor:
        """Blend one tensor in place; returns the original values it overwrote."""
        flat = _flat(self.pair.target.params[name])
        src = _flat(self.pair.source.params[name])
        if self.plan.index.is_full(name):  # whole tensor: no index, no gathers
            saved = flat.clone()
            flat.copy_(blend_values(name, saved, src.to(device=flat.device), self.alpha))
            return saved
        idx = self.plan.index[name]
        s_vals = src.index_select(0, idx.to(src.device)).to(device=flat.device)
        idx = idx.to(flat.device)
        saved = flat.index_select(0, idx)
        flat.index_copy_(0, idx, blend_values(name, saved, s_vals, self.alpha))
        return saved

    @torch.no_grad()
    def _put_back(self, name: str, vals: torch.Tensor) -> None:
        flat = _flat(self.pair.target.params[name])
        if self.plan.index.is_full(name):
            flat.copy_(vals)
        else:
            flat.index_copy_(0, self.plan.index[name].to(flat.device), vals)

    @torch.no_grad()
    def apply(self) -> transplant:
        """Write the blended values into the target (saving the originals).

        Tensor by tensor, so the memory held is the saved originals (the weights moved)
        plus one tensor's blend; if any tensor is refused (NaN/inf in the source) or the
        edit fails, the tensors already edited are put back, so the model is untouched.
        """
        if self._saved is not None:
            raise TransplantError("this transplant is already applied")
        saved: dict[str, torch.Tensor] = {}
        try:
            for name in self.plan.index:
                saved[name] = self._edit(name)
        except BaseException:
            for name, vals in saved.items():
                self._put_back(name, vals)
            raise
        self._saved = saved
        self.pair.target.refresh_mirrors(saved.keys())
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
        for name, vals in self._saved.items():
            self._put_back(name, vals)
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
        index = self.plan.index
        for name in sorted(index):
            t = params[name]
            row: dict[str, Any] = {
                "name": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "n_changed": index.size(name),
            }
            if with_hashes:
                row["sha256"] = tensor_sha256(t)
                if self._saved is not None:
                    if index.is_full(name):
                        orig = self._saved[name]
                    else:
                        orig = t.detach().clone().reshape(-1)
                        orig.index_copy_(0, index[name].to(orig.device), self._saved[name])
                    row["sha256_before"] = tensor_sha256(orig.view(t.shape))
            tensors.append(row)
        common: dict[str, Any] = dict(
            alpha=self.alpha,
            source=_identity(self.pair.source),
            target=_identity(self.pair.target),
            tensors=tensors,
            n_params_moved=self.plan.n_params,
            n_params_target=int(self.pair.target.identity.get("n_params", 0)),
        )
        if self.plan.mask is not None:  # weight level: no units, kv does not apply
            return Manifest.for_mask(
                self.plan.mask, kv="none", n_units_by_kind={"weight": self.plan.n_params},
                **common,
            )
        by_kind: dict[str, int] = {}
        for u in self.plan.units:
            by_kind[u.kind] = by_kind.get(u.kind, 0) + 1
        return Manifest(
            units=[str(u) for u in self.plan.requested],
            kv_added=[str(u) for u in self.plan.kv_added],
            kv=self.kv,
            n_units_by_kind=by_kind,
            **common,
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
        if "units" in first:
            what = (f"{sum(len(o['units']) for o in overlaps if 'units' in o)} unit(s) that "
                    f"earlier permanent transplant(s) already moved (e.g. {first['units'][0]} in "
                    f"transplant #{first['transplant']} at alpha={first['alpha']:g})")
        else:
            what = (f"{sum(o.get('weights', 0) for o in overlaps)} weight(s) that earlier "
                    f"permanent transplant(s) already moved ({first['weights']} of them in "
                    f"transplant #{first['transplant']} at alpha={first['alpha']:g})")
        warnings.warn(
            f"this transplant touches {what}; the blends compound. Recorded in the manifest "
            "as extra['compounds_with'].",
            UserWarning,
            stacklevel=2,
        )
    pair.applied.append(m)
    return m


def _overlaps(pair: ModelPair, plan: Plan) -> list[dict[str, Any]]:
    """Earlier permanent transplants on the pair that moved some of ``plan``'s weights.

    Two unit-level transplants overlap by unit names (``{"transplant", "units",
    "alpha"}``); where either side is a weight mask, by weights
    (``{"transplant", "weights": <weights both move>, "alpha"}``).
    """
    mine = {str(u) for u in plan.units}
    out: list[dict[str, Any]] = []
    for i, prior in enumerate(pair.applied):
        prior_mask = getattr(prior, "mask", None)
        alpha = float(prior.alpha)
        if plan.mask is None and prior_mask is None:
            theirs = {*getattr(prior, "units", []), *getattr(prior, "kv_added", [])}
            common = sorted(mine & theirs)
            if common:
                out.append({"transplant": i, "units": common, "alpha": alpha})
            continue
        n = _common_weights(pair, plan, prior, prior_mask)
        if n:
            out.append({"transplant": i, "weights": n, "alpha": alpha})
    return out


def _selection_parts(
    pair: ModelPair, mask: WeightMask | None, units: Sequence[Unit] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, list[TensorSlice]]]:
    """A selection as (flat indices per tensor) for a mask or (slices per tensor) for units."""
    if mask is not None:
        return dict(mask.index), {}
    parts: dict[str, list[TensorSlice]] = {}
    for u in units:
        for sl in pair.layout.slices(u):
            parts.setdefault(sl.param, []).append(sl)
    return {}, parts


def _in_slices(
    idx: Int[torch.Tensor, " n"], shape: Sequence[int], parts: Sequence[TensorSlice]
) -> Bool[torch.Tensor, " n"]:
    """Which flat positions ``idx`` of a tensor of ``shape`` lie in one of ``parts``."""
    hit = torch.zeros(idx.shape, dtype=torch.bool)
    for sl in parts:
        stride = math.prod(shape[sl.dim + 1 :])
        coord = torch.div(idx, stride, rounding_mode="floor") % shape[sl.dim]
        hit |= (coord >= sl.start) & (coord < sl.stop)
    return hit


def _in_sorted(a: Int[torch.Tensor, " n"], b: Int[torch.Tensor, " m"]) -> Bool[torch.Tensor, " n"]:
    """Which entries of ``a`` are in the sorted tensor ``b``."""
    if not b.numel():
        return torch.zeros(a.shape, dtype=torch.bool)
    pos = torch.searchsorted(b, a).clamp_(max=b.numel() - 1)
    return b[pos] == a


def _common_weights(
    pair: ModelPair, plan: Plan, prior: Any, prior_mask: WeightMask | None
) -> int:
    """Weights both ``plan`` and an earlier transplant's manifest move (one is a mask)."""
    try:
        prior_units = [pair.layout.validate(u) for u in
                       (*getattr(prior, "units", []), *getattr(prior, "kv_added", []))]
    except (UnitError, ValueError):
        return 0
    a_idx, a_sl = _selection_parts(pair, plan.mask, plan.units)
    b_idx, b_sl = _selection_parts(pair, prior_mask, prior_units)
    n = 0
    for name in {*a_idx, *a_sl} & {*b_idx, *b_sl}:
        shape = pair.layout.shapes[name]
        if name in a_idx and name in b_idx:
            n += int(_in_sorted(a_idx[name], b_idx[name]).sum())
        elif name in a_idx:
            n += int(_in_slices(a_idx[name], shape, b_sl[name]).sum())
        else:
            n += int(_in_slices(b_idx[name], shape, a_sl[name]).sum())
    return n
