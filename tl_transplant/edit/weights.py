"""Weight-level units: individual weights of the block linears, as masks and scores.

A unit (head, neuron, linear) is a fixed slice of a tensor; the finest grain a
transplant can move is one weight. At that grain there are ~10^8 candidates, so
they are not :class:`~tl_transplant.arch.units.Unit` objects but tensors:

* :class:`WeightMask`: which weights move, as sorted distinct flat (row-major)
  indices per HF tensor. A transplant of a mask is ``w <- w_t + alpha * m * (w_s - w_t)``
  (:func:`tl_transplant.edit.edits.transplant` takes a mask wherever it takes units),
  reversible and bit-exact on revert like a unit transplant. On disk a mask is one
  safetensors file of packed bits (:meth:`WeightMask.save`), named in the manifest
  with its SHA-256.
* :func:`top_weights`: the ``k`` best weights of per-tensor scores; the scores themselves
  (one per weight, made by a weight-level scorer) are
  :class:`~tl_transplant.scoring.weight_scores.WeightScores`, whose ``within_budget``
  turns them into the mask of the best weights that fit a fraction of the block
  parameters, so the sweep treats them like a unit ranking.

Budgets count weights one by one, against the same denominator as unit budgets
(:func:`tl_transplant.edit.budget.block_params`: every weight and bias of every block
linear, i.e. every element of ``layout.unit_tensors()``). For interpretability a
mask (or a score) is summed per head or neuron: :meth:`WeightMask.by_unit`,
:meth:`~tl_transplant.scoring.weight_scores.WeightScores.unit_view`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from jaxtyping import Bool, Int

from tl_transplant.arch.units import Head, Unit, normalize_kinds
from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout

#: The grain name of weight-level units (``units: [weight]`` in YAML, ``--units weight``).
WEIGHT = "weight"
MASK_FORMAT = "tl_transplant.weight_mask/1"
#: Above this many eligible scores, the k-th largest is bracketed on a sample first
#: (two passes over the scores) instead of concatenating them all.
_EXACT_TOPK_MAX = 1 << 25


class WeightMaskError(TLTransplantError, ValueError):
    """A weight mask that does not fit the model, or a mask file that cannot be read."""


def _index_tensor(x: Any, name: str, numel: int) -> Int[torch.Tensor, " n"]:
    t = torch.as_tensor(x)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if t.dtype == torch.bool:
        raise WeightMaskError(f"{name}: give flat indices, or use WeightMask.from_bool for masks")
    if t.is_floating_point() or t.is_complex():
        raise WeightMaskError(f"{name}: flat indices must be integers, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.long).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= numel):
        raise WeightMaskError(
            f"{name}: flat index out of range [0, {numel}) (got {int(t.min())}..{int(t.max())})"
        )
    return torch.unique(t)  # sorted, distinct


class WeightMask:
    """Which individual weights a transplant moves: sorted flat indices per HF tensor.

    ``shapes`` gives each named tensor's shape (the target's); tensors with no
    selected weight are dropped. Two masks are equal when they select the same
    weights of the same tensors (:attr:`sha256` is a digest of exactly that).
    """

    def __init__(
        self,
        index: Mapping[str, Int[torch.Tensor, " n"] | Sequence[int]],
        shapes: Mapping[str, Sequence[int]],
    ) -> None:
        idx: dict[str, torch.Tensor] = {}
        shp: dict[str, tuple[int, ...]] = {}
        for name in sorted(index):
            if name not in shapes:
                raise WeightMaskError(f"mask names tensor {name!r}, which has no shape given")
            shape = tuple(int(s) for s in shapes[name])
            t = _index_tensor(index[name], name, math.prod(shape))
            if t.numel():
                idx[name], shp[name] = t, shape
        self.index: dict[str, Int[torch.Tensor, " n"]] = idx
        self.shapes: dict[str, tuple[int, ...]] = shp

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_bool(cls, masks: Mapping[str, Bool[torch.Tensor, "..."]]) -> WeightMask:
        """A mask from boolean tensors (one per HF tensor, the tensor's shape)."""
        index, shapes = {}, {}
        for name, m in masks.items():
            m = torch.as_tensor(m)
            if m.dtype != torch.bool:
                raise WeightMaskError(f"{name}: from_bool needs bool tensors, got {m.dtype}")
            index[name] = m.reshape(-1).nonzero().reshape(-1).cpu()
            shapes[name] = tuple(m.shape)
        return cls(index, shapes)

    @classmethod
    def empty(cls) -> WeightMask:
        return cls({}, {})

    # ---- basics -------------------------------------------------------------------
    @cached_property
    def n_params(self) -> int:
        """Number of weights selected."""
        return int(sum(int(i.numel()) for i in self.index.values()))

    def __len__(self) -> int:
        return self.n_params

    def __bool__(self) -> bool:
        return self.n_params > 0

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def counts(self) -> dict[str, int]:
        """Selected weights per tensor."""
        return {n: int(i.numel()) for n, i in self.index.items()}

    def to_bool(self, name: str) -> Bool[torch.Tensor, "..."]:
        """The boolean mask of one tensor (all False for a tensor the mask does not name)."""
        if name not in self.shapes:
            raise KeyError(f"the mask selects no weight of {name!r}")
        m = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
        m[self.index[name]] = True
        return m.view(self.shapes[name])

    @cached_property
    def sha256(self) -> str:
        """Digest of the selection (tensor names, shapes and indices), independent of files."""
        h = hashlib.sha256(MASK_FORMAT.encode())
        for name in sorted(self.index):
            h.update(json.dumps([name, list(self.shapes[name])]).encode())
            h.update(self.index[name].numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightMask) and self.sha256 == other.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return f"WeightMask(n={self.n_params}, tensors={len(self.index)}, sha={self.sha256[:12]})"

    def union(self, other: WeightMask) -> WeightMask:
        """The weights either mask selects."""
        names = set(self.index) | set(other.index)
        shapes = {**other.shapes, **self.shapes}
        for n in set(self.index) & set(other.index):
            if self.shapes[n] != other.shapes[n]:
                raise WeightMaskError(f"{n}: shapes differ ({self.shapes[n]} vs {other.shapes[n]})")
        return WeightMask(
            {n: torch.cat([m.index[n] for m in (self, other) if n in m.index]) for n in names},
            shapes,
        )

    def check(self, shapes: Mapping[str, Sequence[int]], allowed: Iterable[str]) -> None:
        """Raise :class:`WeightMaskError` unless every tensor is among ``allowed`` with the
        same shape as in ``shapes`` (the model's)."""
        ok = set(allowed)
        for n, s in self.shapes.items():
            if n not in ok:
                raise WeightMaskError(
                    f"the mask selects weights of {n!r}, which is not a block linear of this "
                    "model (only the weights and biases of block linears are transplanted)"
                )
            if n not in shapes or tuple(shapes[n]) != tuple(s):
                got = None if n not in shapes else tuple(shapes[n])
                raise WeightMaskError(f"mask tensor {n!r} has shape {s}, the model's is {got}")

    # ---- views --------------------------------------------------------------------
    def by_unit(
        self, layout: ModelLayout, kinds: str | Iterable[str] = ("head", "neuron")
    ) -> dict[Unit, int]:
        """Selected weights inside each unit's slices (units with none are left out).

        A unit view of a weight mask, for heatmaps and tables: ``L3.H5 -> 1200`` means 1200
        of that head's weights move. A weight in two units' slices (a KV row shared by
        nothing else is in one KV group only; heads and neurons are disjoint) counts in each.
        """
        counts: dict[Unit, int] = {}
        cache: dict[tuple[str, int], torch.Tensor] = {}

        def profile(param: str, dim: int) -> torch.Tensor:
            if (param, dim) not in cache:
                m = self.to_bool(param).to(torch.int64)
                other = [d for d in range(m.dim()) if d != dim]
                cache[(param, dim)] = m.sum(other) if other else m
            return cache[(param, dim)]

        for kind in normalize_kinds(kinds):
            for u in layout.units(kind):
                n = 0
                for s in layout.slices(u):
                    if s.param in self.index:
                        n += int(profile(s.param, s.dim)[s.start : s.stop].sum())
                if n:
                    counts[u] = n
        return counts

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: count, digest and weights per tensor."""
        return {"n_params": self.n_params, "sha256": self.sha256, "tensors": self.counts()}

    # ---- files --------------------------------------------------------------------
    def file_bytes(self) -> bytes:
        """The bytes :meth:`save` writes: safetensors of packed bits (1 bit per weight of each
        named tensor, little bit order), laid out canonically (sorted names and metadata keys),
        so the same mask always gives the same file and the same file SHA-256."""
        names = sorted(self.index)
        blobs = [np.packbits(self.to_bool(n).reshape(-1).numpy(), bitorder="little").tobytes()
                 for n in names]
        meta = {"counts": json.dumps(self.counts()), "format": MASK_FORMAT,
                "sha256": self.sha256,
                "shapes": json.dumps({n: list(self.shapes[n]) for n in names})}
        header: dict[str, Any] = {"__metadata__": meta}
        off = 0
        for n, b in zip(names, blobs):
            header[n] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [off, off + len(b)]}
            off += len(b)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)

    @cached_property
    def file_sha256(self) -> str:
        """SHA-256 of :meth:`file_bytes` (what a manifest records for the mask file)."""
        return hashlib.sha256(self.file_bytes()).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the mask as safetensors of packed bits (:meth:`file_bytes`); returns the file's
        SHA-256 (always :attr:`file_sha256`: the file is canonical)."""
        data = self.file_bytes()
        Path(path).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        self.__dict__.setdefault("file_sha256", digest)
        return digest

    @classmethod
    def load(cls, path: str | Path, *, sha256: str | None = None) -> WeightMask:
        """Read a mask written by :meth:`save`; ``sha256`` (of the file) is checked if given."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise WeightMaskError(f"weight mask file {p} does not exist")
        if sha256 is not None and file_sha256(p) != sha256:
            raise WeightMaskError(
                f"weight mask file {p} does not match the SHA-256 its manifest records; it was "
                "changed or replaced since the transplant was written"
            )
        try:
            with safe_open(str(p), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != MASK_FORMAT:
                    raise WeightMaskError(
                        f"{p} is not a tl_transplant weight mask (format={meta.get('format')!r})"
                    )
                shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
                index = {}
                for n in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    numel = math.prod(shapes[n])
                    bits = np.unpackbits(f.get_tensor(n), count=numel, bitorder="little")
                    index[n] = torch.from_numpy(np.flatnonzero(bits).astype(np.int64))
        except WeightMaskError:
            raise
        except Exception as e:  # a truncated or foreign file: say so, not a traceback
            raise WeightMaskError(f"cannot read weight mask {p}: {type(e).__name__}: {e}") from e
        mask = cls(index, shapes)
        if meta.get("sha256") and meta["sha256"] != mask.sha256:
            raise WeightMaskError(f"weight mask {p}: its content does not match its own digest")
        return mask


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: What a transplant moves: units (or unit strings), or a weight mask.
Selection: TypeAlias = "Sequence[Unit | str] | WeightMask"


def is_mask(x: object) -> bool:
    """Whether ``x`` is a weight-level selection."""
    return isinstance(x, WeightMask)


def block_tensors(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor a weight-level unit may come from (block linears' weights and biases)."""
    return {n: tuple(layout.shapes[n]) for n in layout.unit_tensors()}


# ---- scores -------------------------------------------------------------------------


def _kth_largest(vals: list[torch.Tensor], k: int, seed: int = 0) -> float:
    """The ``k``-th largest value (1-based) among the flat float tensors ``vals`` (no NaN)."""
    total = sum(int(v.numel()) for v in vals)
    if total <= _EXACT_TOPK_MAX:
        return float(torch.kthvalue(torch.cat(vals), total - k + 1).values)
    # Bracket the k-th largest on a sample, then count above the bracket and sort inside it.
    gen = torch.Generator().manual_seed(seed)
    n_s = 1 << 21
    sizes = torch.tensor([v.numel() for v in vals], dtype=torch.float64)
    pick = torch.multinomial(sizes, n_s, replacement=True, generator=gen)
    sample = torch.cat([
        vals[i][torch.randint(vals[i].numel(), (int(c),), generator=gen)]
        for i, c in enumerate(torch.bincount(pick, minlength=len(vals)).tolist()) if c
    ])
    q = 1.0 - k / total
    for eps in (8.0 / math.sqrt(n_s), 64.0 / math.sqrt(n_s)):
        lo = float(torch.quantile(sample.double(), max(0.0, q - eps)))
        hi = float(torch.quantile(sample.double(), min(1.0, q + eps)))
        above = sum(int((v > hi).sum()) for v in vals)
        if above >= k:
            continue
        inside = torch.cat([v[(v >= lo) & (v <= hi)] for v in vals])
        need = k - above
        if inside.numel() >= need:
            return float(torch.topk(inside, need).values[-1])
    return float(torch.kthvalue(torch.cat(vals), total - k + 1).values)


def top_weights(
    values: Mapping[str, torch.Tensor], k: int, *, positive_only: bool = False
) -> dict[str, Int[torch.Tensor, " n"]]:
    """Flat indices of the ``k`` largest finite values over all tensors (ties: tensor name
    order, then flat order). ``positive_only`` takes only values > 0 (fewer than ``k`` if
    fewer are positive)."""
    names = sorted(values)
    flats = []
    for n in names:
        v = values[n].detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        bad = ~torch.isfinite(v)
        if positive_only:
            bad |= v <= 0
        flats.append(v.masked_fill(bad, -math.inf) if bool(bad.any()) else v)
    n_ok = sum(int(torch.isfinite(f).sum()) for f in flats)
    k = min(int(k), n_ok)
    if k <= 0:
        return {}
    ok = [f[torch.isfinite(f)] for f in flats]
    thr = _kth_largest([o for o in ok if o.numel()], k)
    out: dict[str, torch.Tensor] = {}
    left = k - sum(int((f > thr).sum()) for f in flats)  # ties at the threshold to take
    for n, f in zip(names, flats):
        sel = (f > thr).nonzero().reshape(-1)
        if left > 0:
            tie = (f == thr).nonzero().reshape(-1)[:left]
            left -= int(tie.numel())
            sel = torch.cat([sel, tie]).sort().values
        if sel.numel():
            out[n] = sel
    return out


def unit_mask(layout: ModelLayout, units: Iterable[Unit | str], kv: str = "group") -> WeightMask:
    """The weights a unit set covers (with KV groups under ``kv="group"``), as a mask."""
    from tl_transplant.arch.units import parse_unit

    masks: dict[str, torch.Tensor] = {}
    for u in (layout.validate(parse_unit(x)) for x in units):
        extra = [layout.kv_group_of(u)] if kv == "group" and isinstance(u, Head) else []
        for v in (u, *extra):
            for s in layout.slices(v):
                m = masks.get(s.param)
                if m is None:
                    m = masks[s.param] = torch.zeros(layout.shapes[s.param], dtype=torch.bool)
                m.narrow(s.dim, s.start, s.size).fill_(True)
    return WeightMask.from_bool(masks)


__all__ = [
    "MASK_FORMAT",
    "WEIGHT",
    "Selection",
    "WeightMask",
    "WeightMaskError",
    "block_tensors",
    "file_sha256",
    "is_mask",
    "top_weights",
    "unit_mask",
]
