"""The schema of an architecture table: what a :class:`FamilyLayout` says and the checks
that hold for every table.

A family table says which slices of which Hugging Face tensors make up a unit:

* a query ``Head`` is its q rows (and q bias) plus its columns of the output
  projection;
* a ``KVHead`` is the k and v rows (and biases) that a group of query heads
  shares (for multi-head attention the group size is 1);
* a ``Neuron`` is its rows of the MLP input projection(s) (gate and up when
  gated) plus its column of the output projection;
* a ``Linear`` is a whole projection, weight and bias.

Slice starts and sizes (:class:`Piece`) are small arithmetic expressions over the
model's dimensions (``H`` query heads, ``KV`` key/value heads, ``dh`` head dim, ``D``
model dim, ``I`` MLP width) and the unit's index (``h``, ``g`` or ``i``), so a fused or
interleaved layout reads as what it is.

``mirrors`` (:class:`Mirror`) lists tensors that TransformerLens's bridge *copies* out
of a fused HF tensor (GPT-NeoX splits ``query_key_value`` into separate q/k/v weights).
After every weight edit those copies are re-derived from the HF tensor, so the hooked
forward, ``generate`` and the export all see one truth.

A family also names its bridge hooks, the other spellings its checkpoints use
(:class:`CheckpointAlias`) and a tiny config per model type for the test suite.

Norm weights (layer norms, q/k norms) belong to no unit and are never transplanted.
Where a q/k norm spans all heads of a layer at once (OLMo 2), ``joint_norms`` says so:
units are still exact weight slices, but moving one rescales its neighbours'
normalised activations.

Where the rest lives: the built-in tables are :mod:`tl_transplant.arch.families` (one
file per family), the registry of tables by HF ``model_type`` is
:mod:`tl_transplant.arch.registry`, a table bound to one model's dims and tensor shapes
is :mod:`tl_transplant.arch.model_layout`, and the check of a table against a booted
TransformerLens bridge is :mod:`tl_transplant.arch.bridge`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tl_transplant.errors import TLTransplantError


class UnsupportedArchitectureError(TLTransplantError, ValueError):
    """The model's architecture has no layout table."""


class LayoutMismatchError(TLTransplantError, RuntimeError):
    """A checkpoint or bridge does not look the way its layout table says."""


@dataclass(frozen=True)
class Piece:
    """A rule: a slice of one tensor along ``dim``, start and size as expressions.

    ``tensor`` names a linear by its unit name plus ``.weight``/``.bias`` (e.g.
    ``attn.q_proj.weight``). ``optional`` pieces (biases) are dropped when the
    checkpoint lacks the tensor.
    """

    tensor: str
    dim: int
    start: str
    size: str
    optional: bool = False


@dataclass(frozen=True)
class Mirror:
    """A bridge-owned copy: ``path`` (relative to the layer) is the concatenation
    over ``h in range(H)`` of ``source[start:start+size]`` along ``dim``.

    ``aliases`` are other paths (relative to the layer) under which the bridge
    exposes the same copy (GPT-NeoX's ``attention.q.weight`` is also ``attn.q.weight``).
    """

    path: str
    source: str
    dim: int
    start: str
    size: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointAlias:
    """Another spelling of HF model names in saved checkpoints (as mergekit's ``aliases``).

    A stored name ``stored_prefix + rest`` is the model's ``model_prefix + rest``;
    e.g. GPT-2 checkpoints saved from the base ``GPT2Model`` store ``h.0.attn...``
    for ``transformer.h.0.attn...`` (``CheckpointAlias("transformer.", "")``).
    """

    model_prefix: str
    stored_prefix: str = ""

    def model_name(self, stored: str) -> str | None:
        """The model name a stored name stands for, or None when it does not match."""
        if not stored.startswith(self.stored_prefix):
            return None
        return self.model_prefix + stored[len(self.stored_prefix) :]


@dataclass(frozen=True)
class FamilyLayout:
    """One architecture family's weight layout."""

    family: str
    model_types: tuple[str, ...]
    layer_prefix: str
    linears: Mapping[str, str]
    head: tuple[Piece, ...]
    kv_head: tuple[Piece, ...]
    neuron: tuple[Piece, ...]
    mirrors: tuple[Mirror, ...] = ()
    notes: str = ""
    #: For each linear: the TransformerLens bridge hook points (relative to
    #: ``blocks.{layer}.``) whose outputs, taken together, are that linear's output
    #: (a fused qkv is the bridge's split q, k and v). Scorers read activations here.
    bridge_hooks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Overrides of :data:`DEFAULT_HOOK_POINTS` for this family's bridge.
    hook_points: Mapping[str, str] = field(default_factory=dict)
    #: Other spellings of the model's tensor names in saved checkpoints, tried in order
    #: after the canonical names (see :func:`bind_checkpoint_layout`).
    checkpoint_aliases: tuple[CheckpointAlias, ...] = ()
    #: For each model type: keyword arguments of a tiny (2-layer) HF config of it, built
    #: with ``AutoConfig.for_model(model_type, **kwargs)`` by ``tl_transplant.testing``.
    #: Vocabulary and special-token ids are added there. Every model type needs one, so
    #: the test suite runs over every table entry.
    tiny: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Unit kinds (``head``, ``kv_head``) whose units share one normalisation across the
    #: layer (OLMo 2's q_norm over all heads' q at once), each mapped to the bridge hook
    #: (relative to ``blocks.{layer}.``) of that norm's output. Moving one such unit's
    #: weights rescales every unit's normalised activations in the layer: units stay exact
    #: weight slices but are not isolated in activations. Empty: every unit is isolated.
    joint_norms: Mapping[str, str] = field(default_factory=dict)


#: Bridge hook points every unit kind reads or writes, relative to ``blocks.{layer}.``.
#: A family whose bridge names them differently overrides entries in ``hook_points``.
DEFAULT_HOOK_POINTS: Mapping[str, str] = {
    "head": "attn.hook_z",  # [batch, pos, H, dh]: each query head's value-weighted mix
    "kv_k": "attn.hook_k",  # [batch, pos, KV, dh]
    "kv_v": "attn.hook_v",  # [batch, pos, KV, dh]
    "pattern": "attn.hook_pattern",  # [batch, H, q_pos, k_pos]
    "attn_out": "attn.o.hook_out",  # the output projection's output (heads write here)
    "neuron": "mlp.hook_post",  # [batch, pos, I]: the MLP's hidden activation
    "mlp_out": "mlp.out.hook_out",  # the down projection's output (neurons write here)
    "resid_post": "hook_resid_post",  # the block's output residual stream
}


def weight_piece(linear: str, dim: int, start: str, size: str) -> Piece:
    """A slice of ``linear``'s weight (``weight_piece("attn.q_proj", 0, "h*dh", "dh")``)."""
    return Piece(f"{linear}.weight", dim, start, size)


def bias_piece(linear: str, start: str, size: str) -> Piece:
    """A slice of ``linear``'s bias, dropped when the checkpoint has no such bias."""
    return Piece(f"{linear}.bias", 0, start, size, optional=True)


_PIECE_KINDS = ("head", "kv_head", "neuron")


def check_table(fam: FamilyLayout) -> None:
    """Self-consistency of one table entry, so a typo fails when it is registered."""
    where = f"FamilyLayout(family={fam.family!r})"
    if not fam.model_types:
        raise LayoutMismatchError(f"{where} has no model_types; list the HF model_type values")
    if "{layer}" not in fam.layer_prefix:
        raise LayoutMismatchError(
            f"{where}: layer_prefix {fam.layer_prefix!r} has no '{{layer}}' placeholder"
        )
    for kind in _PIECE_KINDS:
        for p in getattr(fam, kind):
            lin = p.tensor.rpartition(".")[0]
            if lin not in fam.linears:
                raise LayoutMismatchError(
                    f"{where}: a {kind} piece slices {p.tensor!r}, but {lin!r} is not one of its "
                    f"linears ({', '.join(fam.linears)}); add it to linears or fix the piece"
                )
    for m in fam.mirrors:
        if m.source.rpartition(".")[0] not in fam.linears:
            raise LayoutMismatchError(
                f"{where}: mirror {m.path!r} copies {m.source!r}, which is not one of its linears"
            )
    for name in fam.bridge_hooks:
        if name not in fam.linears:
            raise LayoutMismatchError(
                f"{where}: bridge_hooks names {name!r}, which is not one of its linears"
            )
    bad = sorted(set(fam.joint_norms) - {"head", "kv_head"})
    if bad:
        raise LayoutMismatchError(
            f"{where}: joint_norms keys must be 'head' or 'kv_head', not {', '.join(bad)}"
        )
    unhooked = [n for n in fam.linears if not fam.bridge_hooks.get(n)]
    if unhooked:
        raise LayoutMismatchError(
            f"{where}: no bridge_hooks for linear(s) {', '.join(unhooked)}; map each to the "
            "bridge hook(s) whose outputs are its output, e.g. ('attn.o.hook_out',)"
        )
    missing = [mt for mt in fam.model_types if mt not in fam.tiny]
    if missing:
        raise LayoutMismatchError(
            f"{where}: no tiny config for model type(s) {', '.join(missing)}; add "
            "tiny={model_type: {config kwargs}} (2 layers, small widths) so the test suite "
            "covers it"
        )
    extra = sorted(set(fam.tiny) - set(fam.model_types))
    if extra:
        raise LayoutMismatchError(
            f"{where}: tiny config(s) for {', '.join(extra)}, which are not in its model_types"
        )


__all__ = [
    "DEFAULT_HOOK_POINTS",
    "CheckpointAlias",
    "FamilyLayout",
    "LayoutMismatchError",
    "Mirror",
    "Piece",
    "UnsupportedArchitectureError",
    "bias_piece",
    "check_table",
    "weight_piece",
]
