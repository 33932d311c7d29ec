"""Unit references: the things a transplant moves.

A unit is a pure address (layer + index or name); what weights it covers is the
business of :mod:`tl_transplant.arch.model_layout`. The string forms are stable and
round-trip exactly::

    L3.H5             query head 5 of layer 3 (its q rows and o columns)
    L3.KV1            key/value group 1 of layer 3 (its k and v rows)
    L2.N1024          MLP neuron 1024 of layer 2 (in/gate/up rows, down column)
    L4.attn.q_proj    a whole linear projection of layer 4
    L4.mlp.down_proj
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

from tl_transplant.errors import TLTransplantError

UnitKind = Literal["head", "kv_head", "neuron", "linear"]
UNIT_KINDS: tuple[UnitKind, ...] = ("head", "kv_head", "neuron", "linear")


class UnitError(TLTransplantError, ValueError):
    """A unit string or reference that cannot be used with this model."""


@dataclass(frozen=True, order=True)
class _UnitBase:
    layer: int
    kind: ClassVar[UnitKind]

    def __str__(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


@dataclass(frozen=True, order=True)
class Head(_UnitBase):
    """Query head ``head`` of ``layer``: its q rows (and bias) plus its o_proj columns."""

    head: int
    kind: ClassVar[UnitKind] = "head"

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.head}"


@dataclass(frozen=True, order=True)
class KVHead(_UnitBase):
    """Key/value group ``group`` of ``layer``: the k and v rows it shares among query heads."""

    group: int
    kind: ClassVar[UnitKind] = "kv_head"

    def __str__(self) -> str:
        return f"L{self.layer}.KV{self.group}"


@dataclass(frozen=True, order=True)
class Neuron(_UnitBase):
    """MLP neuron ``index`` of ``layer``: input rows (gate and up if gated) and output column."""

    index: int
    kind: ClassVar[UnitKind] = "neuron"

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.index}"


@dataclass(frozen=True, order=True)
class Linear(_UnitBase):
    """A whole linear projection, e.g. ``attn.q_proj`` or ``mlp.down_proj`` (weight and bias)."""

    name: str
    kind: ClassVar[UnitKind] = "linear"

    def __str__(self) -> str:
        return f"L{self.layer}.{self.name}"


Unit = Head | KVHead | Neuron | Linear

_INDEXED = re.compile(r"^L(\d+)\.(H|KV|N)(\d+)$")
_LINEAR = re.compile(r"^L(\d+)\.((?:attn|mlp)\.[A-Za-z_][A-Za-z0-9_]*)$")
_KIND_ALIASES: dict[str, UnitKind] = {
    "head": "head",
    "heads": "head",
    "kv": "kv_head",
    "kv_head": "kv_head",
    "kv_heads": "kv_head",
    "neuron": "neuron",
    "neurons": "neuron",
    "linear": "linear",
    "linears": "linear",
}


def parse_unit(text: str | Unit) -> Unit:
    """Parse ``"L3.H5"``-style text into a unit; units pass through unchanged."""
    if isinstance(text, (Head, KVHead, Neuron, Linear)):
        return text
    if not isinstance(text, str):
        raise UnitError(f"expected a unit or a unit string, got {type(text).__name__}: {text!r}")
    s = text.strip()
    m = _INDEXED.match(s)
    if m:
        layer, tag, idx = int(m.group(1)), m.group(2), int(m.group(3))
        classes: dict[str, type[Head | KVHead | Neuron]] = {"H": Head, "KV": KVHead, "N": Neuron}
        cls = classes[tag]
        return cls(layer, idx)
    m = _LINEAR.match(s)
    if m:
        return Linear(int(m.group(1)), m.group(2))
    raise UnitError(
        f"cannot parse unit {text!r}. Use one of: 'L3.H5' (query head), 'L3.KV1' (KV group), "
        "'L2.N1024' (MLP neuron), 'L4.attn.q_proj' or 'L4.mlp.down_proj' (whole linear)."
    )


def parse_units(units: Iterable[str | Unit] | str | Unit) -> list[Unit]:
    """Parse one unit, a comma-separated string, or an iterable of units/strings."""
    if isinstance(units, str):
        parts = [p for p in units.replace(" ", "").split(",") if p]
        return [parse_unit(p) for p in parts]
    if isinstance(units, (Head, KVHead, Neuron, Linear)):
        return [units]
    return [parse_unit(u) for u in units]


def normalize_kinds(kinds: str | Iterable[str] | None) -> tuple[UnitKind, ...]:
    """Turn ``"head"``, ``("head", "neuron")`` or ``None`` (all) into canonical unit kinds."""
    if kinds is None:
        return UNIT_KINDS
    items = [kinds] if isinstance(kinds, str) else list(kinds)
    out: list[UnitKind] = []
    for k in items:
        key = str(k).strip().lower()
        if key not in _KIND_ALIASES:
            raise UnitError(
                f"unknown unit kind {k!r}; valid kinds are: head, kv_head, neuron, linear"
            )
        if _KIND_ALIASES[key] not in out:
            out.append(_KIND_ALIASES[key])
    return tuple(out)


def parse_kinds_or_units(text: str) -> tuple[UnitKind, ...] | list[Unit]:
    """A comma-separated list of unit kinds (``"head,neuron"``) or of units (``"L0.H1,L1.N2"``).

    Raises :class:`UnitError` naming the first item that is neither, or for an empty list;
    mixing kinds and units is refused (the two mean different things to ``score``).
    """
    items = [p for p in str(text).replace(" ", "").split(",") if p]
    if not items:
        raise UnitError(
            "the unit list is empty; give unit kinds (e.g. 'head,neuron') or units "
            "(e.g. 'L0.H1,L1.N2')"
        )
    kinds, units = [], []
    for item in items:
        if item.lower() in _KIND_ALIASES:
            kinds.append(item)
            continue
        try:
            units.append(parse_unit(item))
        except UnitError:
            raise UnitError(
                f"{item!r} is neither a unit kind (head, kv_head, neuron, linear) nor a unit "
                "(e.g. 'L3.H5', 'L3.KV1', 'L2.N1024', 'L4.mlp.down_proj')"
            ) from None
    if kinds and units:
        raise UnitError(
            f"mixes unit kinds ({kinds[0]!r}) and units ({str(units[0])!r}); give one or the other"
        )
    return normalize_kinds(kinds) if kinds else units


def unit_sort_key(u: Unit) -> tuple[int, int, str]:
    """Sort by layer, then kind, then index/name: a stable order for tables and manifests."""
    order = UNIT_KINDS.index(u.kind)
    if isinstance(u, Linear):
        return (u.layer, order, u.name)
    idx = u.head if isinstance(u, Head) else u.group if isinstance(u, KVHead) else u.index
    return (u.layer, order, f"{idx:09d}")
