"""Per-architecture weight layouts, as data.

This module is the only place that knows how each Hugging Face architecture
stores its weights. Each family is one :class:`FamilyLayout` table saying
which slices of which HF tensors make up a unit:

* a query ``Head`` is its q rows (and q bias) plus its columns of the output
  projection;
* a ``KVHead`` is the k and v rows (and biases) that a group of query heads
  shares (for multi-head attention the group size is 1);
* a ``Neuron`` is its rows of the MLP input projection(s) (gate and up when
  gated) plus its column of the output projection;
* a ``Linear`` is a whole projection, weight and bias.

Slice starts and sizes are small arithmetic expressions over the model's
dimensions (``H`` query heads, ``KV`` key/value heads, ``dh`` head dim, ``D``
model dim, ``I`` MLP width) and the unit's index (``h``, ``g`` or ``i``), so a
fused or interleaved layout reads as what it is. GPT-2's Conv1D stores weights
transposed (``[in, out]``), which is why its head columns are on dim 1.

``mirrors`` lists tensors that TransformerLens's bridge *copies* out of a
fused HF tensor (GPT-NeoX splits ``query_key_value`` into separate q/k/v
weights). After every weight edit those copies are re-derived from the HF
tensor, so the hooked forward, ``generate`` and the export all see one truth.

A family also names its bridge hooks, the other spellings its checkpoints use
(``checkpoint_aliases``) and a tiny config per model type for the test suite
(``tiny``), so adding an architecture is one table entry: append it to
:data:`FAMILIES` or call :func:`register_family` (see
``docs/adding_an_architecture.md``). :func:`check_bridge` checks a table
against the booted TransformerLens bridge so a wrong entry fails at load.

Norm weights (layer norms, q/k norms) belong to no unit and are never
transplanted. Where a q/k norm spans all heads of a layer at once (OLMo 2),
``joint_norms`` says so: units are still exact weight slices, but moving one
rescales its neighbours' normalised activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from tl_transplant.arch.units import (
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitError,
    UnitKind,
    normalize_kinds,
    parse_unit,
)
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


def _w(name: str, dim: int, start: str, size: str) -> Piece:
    return Piece(f"{name}.weight", dim, start, size)


def _b(name: str, start: str, size: str) -> Piece:
    return Piece(f"{name}.bias", 0, start, size, optional=True)


def _qkv_separate() -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    head = (
        _w("attn.q_proj", 0, "h*dh", "dh"),
        _b("attn.q_proj", "h*dh", "dh"),
        _w("attn.o_proj", 1, "h*dh", "dh"),
    )
    kv = (
        _w("attn.k_proj", 0, "g*dh", "dh"),
        _b("attn.k_proj", "g*dh", "dh"),
        _w("attn.v_proj", 0, "g*dh", "dh"),
        _b("attn.v_proj", "g*dh", "dh"),
    )
    return head, kv


def _gated_neuron() -> tuple[Piece, ...]:
    return (
        _w("mlp.gate_proj", 0, "i", "1"),
        _b("mlp.gate_proj", "i", "1"),
        _w("mlp.up_proj", 0, "i", "1"),
        _b("mlp.up_proj", "i", "1"),
        _w("mlp.down_proj", 1, "i", "1"),
    )


_LLAMA_HEAD, _LLAMA_KV = _qkv_separate()
_LLAMA_LINEARS = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}

_LLAMA_HOOKS = {
    "attn.q_proj": ("attn.q.hook_out",),
    "attn.k_proj": ("attn.k.hook_out",),
    "attn.v_proj": ("attn.v.hook_out",),
    "attn.o_proj": ("attn.o.hook_out",),
    "mlp.gate_proj": ("mlp.gate.hook_out",),
    "mlp.up_proj": ("mlp.in.hook_out",),
    "mlp.down_proj": ("mlp.out.hook_out",),
}

#: Llama's layout (separate q/k/v/o, gated MLP), shared by the families that store it.
_LLAMA_LAYOUT: Mapping[str, Any] = {
    "layer_prefix": "model.layers.{layer}.",
    "linears": _LLAMA_LINEARS,
    "head": _LLAMA_HEAD,
    "kv_head": _LLAMA_KV,
    "neuron": _gated_neuron(),
    "bridge_hooks": _LLAMA_HOOKS,
}

#: Tiny 2-layer dims: 4 query heads, 2 KV heads where the architecture has GQA.
_TINY_MHA: Mapping[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
_TINY_GQA: Mapping[str, Any] = {**_TINY_MHA, "num_key_value_heads": 2}

#: The built-in families. Add one here (or at runtime with :func:`register_family`).
FAMILIES: tuple[FamilyLayout, ...] = (
    FamilyLayout(
        family="gpt2",
        model_types=("gpt2",),
        layer_prefix="transformer.h.{layer}.",
        linears={
            "attn.c_attn": "attn.c_attn",
            "attn.c_proj": "attn.c_proj",
            "mlp.c_fc": "mlp.c_fc",
            "mlp.c_proj": "mlp.c_proj",
        },
        # Conv1D weights are [in, out]: output features live on dim 1.
        head=(
            _w("attn.c_attn", 1, "h*dh", "dh"),
            _b("attn.c_attn", "h*dh", "dh"),
            _w("attn.c_proj", 0, "h*dh", "dh"),
        ),
        kv_head=(
            _w("attn.c_attn", 1, "H*dh + g*dh", "dh"),
            _b("attn.c_attn", "H*dh + g*dh", "dh"),
            _w("attn.c_attn", 1, "2*H*dh + g*dh", "dh"),
            _b("attn.c_attn", "2*H*dh + g*dh", "dh"),
        ),
        neuron=(
            _w("mlp.c_fc", 1, "i", "1"),
            _b("mlp.c_fc", "i", "1"),
            _w("mlp.c_proj", 0, "i", "1"),
        ),
        notes="fused c_attn [D, 3D] as q|k|v; Conv1D transposed",
        bridge_hooks={
            "attn.c_attn": ("attn.q.hook_out", "attn.k.hook_out", "attn.v.hook_out"),
            "attn.c_proj": ("attn.o.hook_out",),
            "mlp.c_fc": ("mlp.in.hook_out",),
            "mlp.c_proj": ("mlp.out.hook_out",),
        },
        # Hub GPT-2 checkpoints are saved from the base GPT2Model: h.0.attn..., wte, ln_f.
        checkpoint_aliases=(CheckpointAlias("transformer.", ""),),
        tiny={"gpt2": {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48}},
    ),
    FamilyLayout(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layer_prefix="gpt_neox.layers.{layer}.",
        linears={
            "attn.query_key_value": "attention.query_key_value",
            "attn.dense": "attention.dense",
            "mlp.dense_h_to_4h": "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h": "mlp.dense_4h_to_h",
        },
        # query_key_value rows are interleaved per head: [q_h | k_h | v_h] for each h.
        head=(
            _w("attn.query_key_value", 0, "h*3*dh", "dh"),
            _b("attn.query_key_value", "h*3*dh", "dh"),
            _w("attn.dense", 1, "h*dh", "dh"),
        ),
        kv_head=(
            _w("attn.query_key_value", 0, "g*3*dh + dh", "dh"),
            _b("attn.query_key_value", "g*3*dh + dh", "dh"),
            _w("attn.query_key_value", 0, "g*3*dh + 2*dh", "dh"),
            _b("attn.query_key_value", "g*3*dh + 2*dh", "dh"),
        ),
        neuron=(
            _w("mlp.dense_h_to_4h", 0, "i", "1"),
            _b("mlp.dense_h_to_4h", "i", "1"),
            _w("mlp.dense_4h_to_h", 1, "i", "1"),
        ),
        # The bridge's split q/k/v copies, exposed both as attention.* and attn.*.
        mirrors=tuple(
            Mirror(
                f"attention.{x}.{leaf}",
                f"attn.query_key_value.{leaf}",
                0,
                f"h*3*dh + {j}*dh",
                "dh",
                aliases=(f"attn.{x}.{leaf}",),
            )
            for leaf in ("weight", "bias")
            for j, x in enumerate("qkv")
        ),
        notes="per-head interleaved fused query_key_value; bridge copies q/k/v",
        bridge_hooks={
            "attn.query_key_value": ("attn.q.hook_out", "attn.k.hook_out", "attn.v.hook_out"),
            "attn.dense": ("attn.o.hook_out",),
            "mlp.dense_h_to_4h": ("mlp.in.hook_out",),
            "mlp.dense_4h_to_h": ("mlp.out.hook_out",),
        },
        tiny={"gpt_neox": _TINY_MHA},
    ),
    FamilyLayout(
        family="llama",
        model_types=(
            "llama",
            "mistral",
            "qwen2",
            "gemma",
            "gemma2",
            "qwen3",
            "gemma3_text",
            "smollm3",
            "granite",
        ),
        **_LLAMA_LAYOUT,
        notes=(
            "separate q/k/v/o with GQA; gated MLP. qwen3 and gemma3_text also have q_norm/k_norm: "
            "RMSNorms over each head's q (k) separately, one weight [head_dim] shared by the "
            "layer's heads; like the layer norms they are no unit's weights and are never "
            "transplanted (only linears are), and heads stay isolated"
        ),
        tiny={
            "llama": _TINY_GQA,
            "mistral": _TINY_GQA,
            "qwen2": _TINY_GQA,
            "gemma": {**_TINY_GQA, "head_dim": 8},
            "gemma2": {**_TINY_GQA, "head_dim": 8},
            "qwen3": {**_TINY_GQA, "head_dim": 16},
            # one sliding-window (4 < the tests' 8 tokens) and one global layer
            "gemma3_text": {
                **_TINY_GQA,
                "head_dim": 16,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            # layer 1 has no rotary embedding (NoPE), as every 4th SmolLM3 layer
            "smollm3": {**_TINY_GQA, "no_rope_layers": [1, 0]},
            # Granite's embedding/residual/attention/logit multipliers, away from 1
            "granite": {
                **_TINY_GQA,
                "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22,
                "attention_multiplier": 0.125,
                "logits_scaling": 8.0,
            },
        },
    ),
    FamilyLayout(
        family="olmo2",
        model_types=("olmo2",),
        **_LLAMA_LAYOUT,
        notes=(
            "llama's linears, post-norm. q_norm/k_norm are RMSNorms over the whole q and k "
            "projections (weights [H*dh] and [KV*dh]), not per head; they are not transplanted. "
            "Because the norm is joint, moving one head's q rows (one KV group's k rows) rescales "
            "every head's normalised queries (keys) in that layer: units are exact weight slices "
            "but not isolated in activations"
        ),
        joint_norms={"head": "attn.q_norm.hook_out", "kv_head": "attn.k_norm.hook_out"},
        tiny={"olmo2": _TINY_GQA},
    ),
    FamilyLayout(
        family="phi3",
        model_types=("phi3",),
        layer_prefix="model.layers.{layer}.",
        linears={
            "attn.qkv_proj": "self_attn.qkv_proj",
            "attn.o_proj": "self_attn.o_proj",
            "mlp.gate_up_proj": "mlp.gate_up_proj",
            "mlp.down_proj": "mlp.down_proj",
        },
        # qkv_proj rows are blocked: [q (H*dh) | k (KV*dh) | v (KV*dh)].
        head=(
            _w("attn.qkv_proj", 0, "h*dh", "dh"),
            _w("attn.o_proj", 1, "h*dh", "dh"),
        ),
        kv_head=(
            _w("attn.qkv_proj", 0, "H*dh + g*dh", "dh"),
            _w("attn.qkv_proj", 0, "H*dh + KV*dh + g*dh", "dh"),
        ),
        # gate_up_proj rows are [gate (I) | up (I)].
        neuron=(
            _w("mlp.gate_up_proj", 0, "i", "1"),
            _w("mlp.gate_up_proj", 0, "I + i", "1"),
            _w("mlp.down_proj", 1, "i", "1"),
        ),
        notes="fused qkv_proj and gate_up_proj",
        bridge_hooks={
            "attn.qkv_proj": ("attn.q.hook_out", "attn.k.hook_out", "attn.v.hook_out"),
            "attn.o_proj": ("attn.o.hook_out",),
            "mlp.gate_up_proj": ("mlp.gate.hook_out", "mlp.in.hook_out"),
            "mlp.down_proj": ("mlp.out.hook_out",),
        },
        tiny={"phi3": _TINY_GQA},
    ),
    FamilyLayout(
        family="phi",
        model_types=("phi",),
        layer_prefix="model.layers.{layer}.",
        linears={
            "attn.q_proj": "self_attn.q_proj",
            "attn.k_proj": "self_attn.k_proj",
            "attn.v_proj": "self_attn.v_proj",
            "attn.dense": "self_attn.dense",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        head=(
            _w("attn.q_proj", 0, "h*dh", "dh"),
            _b("attn.q_proj", "h*dh", "dh"),
            _w("attn.dense", 1, "h*dh", "dh"),
        ),
        kv_head=_LLAMA_KV,
        neuron=(
            _w("mlp.fc1", 0, "i", "1"),
            _b("mlp.fc1", "i", "1"),
            _w("mlp.fc2", 1, "i", "1"),
        ),
        notes="Phi-1.5/2: separate q/k/v with biases, dense output, plain MLP",
        bridge_hooks={
            "attn.q_proj": ("attn.q.hook_out",),
            "attn.k_proj": ("attn.k.hook_out",),
            "attn.v_proj": ("attn.v.hook_out",),
            "attn.dense": ("attn.o.hook_out",),
            "mlp.fc1": ("mlp.in.hook_out",),
            "mlp.fc2": ("mlp.out.hook_out",),
        },
        tiny={"phi": _TINY_MHA},
    ),
)

_REGISTRY: dict[str, FamilyLayout] = {}
_BY_MODEL_TYPE: dict[str, FamilyLayout] = {}

_PIECE_KINDS = ("head", "kv_head", "neuron")


def _check_table(fam: FamilyLayout) -> None:
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


def register_family(layout: FamilyLayout, *, replace: bool = False) -> FamilyLayout:
    """Add a family table at runtime (what a :data:`FAMILIES` entry does at import).

    Its model types must not already belong to another family unless ``replace``
    (which first drops the family of the same name). Returns ``layout``.
    """
    _check_table(layout)
    if replace and layout.family in _REGISTRY:
        unregister_family(layout.family)
    if layout.family in _REGISTRY:
        raise LayoutMismatchError(
            f"a family named {layout.family!r} is already registered; pass replace=True to "
            "swap it, or pick another name"
        )
    taken = {mt: _BY_MODEL_TYPE[mt].family for mt in layout.model_types if mt in _BY_MODEL_TYPE}
    if taken:
        shown = ", ".join(f"{mt} (family {f})" for mt, f in sorted(taken.items()))
        raise LayoutMismatchError(
            f"model type(s) already have a layout: {shown}; unregister_family() that family "
            "first, or register with replace=True under its name"
        )
    _REGISTRY[layout.family] = layout
    for mt in layout.model_types:
        _BY_MODEL_TYPE[mt] = layout
    return layout


def unregister_family(family: str) -> FamilyLayout:
    """Remove a registered family (by its ``family`` name) and return it."""
    try:
        fam = _REGISTRY.pop(family)
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no family named {family!r}; registered: {', '.join(_REGISTRY)}"
        ) from None
    for mt in fam.model_types:
        _BY_MODEL_TYPE.pop(mt, None)
    return fam


def registered_families() -> list[FamilyLayout]:
    """Every family table now registered (built-ins first)."""
    return list(_REGISTRY.values())


for _fam in FAMILIES:
    register_family(_fam)


def supported_model_types() -> list[str]:
    """HF ``model_type`` values with a layout table."""
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> FamilyLayout:
    """The layout table for an HF ``model_type``, or a clear error listing the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported. Supported model types: "
            f"{', '.join(supported_model_types())}. To add one, write a FamilyLayout "
            "table in tl_transplant/arch/layouts.py (see docs/adding_an_architecture.md)."
        ) from None


def tiny_config_kwargs(model_type: str) -> Mapping[str, Any]:
    """The table's tiny-config keyword arguments for a model type (see ``FamilyLayout.tiny``)."""
    return family_for(model_type).tiny[model_type]


@dataclass(frozen=True)
class Dims:
    """The model dimensions that slice expressions use."""

    n_layers: int
    H: int
    KV: int
    dh: int
    D: int
    I: int  # noqa: E741 - the MLP width, named as in the slice expressions

    def env(self) -> dict[str, int]:
        return {"H": self.H, "KV": self.KV, "dh": self.dh, "D": self.D, "I": self.I}


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def dims_from_config(config: Any) -> Dims:
    """Read layer count, head counts and widths from an HF config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    D = int(_cfg(text, "hidden_size", "n_embd", "d_model"))
    H = int(_cfg(text, "num_attention_heads", "n_head"))
    KV = int(_cfg(text, "num_key_value_heads", default=H) or H)
    dh = int(_cfg(text, "head_dim", default=D // H))
    inner = _cfg(text, "intermediate_size", "n_inner")
    I = int(inner) if inner is not None else 4 * D  # noqa: E741
    n_layers = int(_cfg(text, "num_hidden_layers", "n_layer"))
    if H % KV != 0:
        raise LayoutMismatchError(f"num_attention_heads={H} is not a multiple of KV heads={KV}")
    return Dims(n_layers=n_layers, H=H, KV=KV, dh=dh, D=D, I=I)


def _eval(expr: str, env: Mapping[str, int]) -> int:
    return int(eval(expr, {"__builtins__": {}}, dict(env)))  # noqa: S307 - constant table text


@dataclass(frozen=True, order=True)
class TensorSlice:
    """``param[start:stop]`` along ``dim``: a concrete piece of one HF tensor."""

    param: str
    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "dim": self.dim, "start": self.start, "stop": self.stop}


@dataclass
class ModelLayout:
    """A family layout bound to one model's dims and parameter names/shapes."""

    family: FamilyLayout
    dims: Dims
    shapes: dict[str, tuple[int, ...]]
    model_type: str = ""
    _cache: dict[Unit, tuple[TensorSlice, ...]] = field(default_factory=dict, repr=False)

    # ---- naming -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    @property
    def group_size(self) -> int:
        return self.dims.H // self.dims.KV

    def prefix(self, layer: int) -> str:
        return self.family.layer_prefix.format(layer=layer)

    def linear_names(self) -> list[str]:
        """Unit names of the whole linears in one layer, e.g. ``attn.q_proj``."""
        return list(self.family.linears)

    def module_path(self, unit: Linear) -> str:
        """The HF module path of a whole linear, e.g. ``model.layers.3.self_attn.q_proj``."""
        self.validate(unit)
        return self.prefix(unit.layer) + self.family.linears[unit.name]

    def param_name(self, layer: int, tensor: str) -> str:
        """HF parameter name for a piece tensor like ``attn.q_proj.weight``."""
        lin, _, leaf = tensor.rpartition(".")
        return self.prefix(layer) + self.family.linears[lin] + "." + leaf

    # ---- units ----------------------------------------------------------------
    def count(self, kind: UnitKind) -> int:
        """Units of one kind per layer."""
        d = self.dims
        return {"head": d.H, "kv_head": d.KV, "neuron": d.I, "linear": len(self.family.linears)}[
            kind
        ]

    def units(self, kind: str | Iterable[str] | None = None) -> list[Unit]:
        """Every unit of the given kind(s), layer by layer."""
        out: list[Unit] = []
        for k in normalize_kinds(kind):
            for layer in range(self.n_layers):
                if k == "head":
                    out += [Head(layer, h) for h in range(self.dims.H)]
                elif k == "kv_head":
                    out += [KVHead(layer, g) for g in range(self.dims.KV)]
                elif k == "neuron":
                    out += [Neuron(layer, i) for i in range(self.dims.I)]
                else:
                    out += [Linear(layer, n) for n in self.family.linears]
        return out

    def validate(self, unit: Unit | str) -> Unit:
        """Return the parsed unit, or raise a :class:`UnitError` naming the valid range."""
        u = parse_unit(unit)
        d = self.dims
        if not 0 <= u.layer < d.n_layers:
            raise UnitError(
                f"{u}: layer {u.layer} does not exist; valid layers are 0..{d.n_layers - 1}"
            )
        if isinstance(u, Head) and not 0 <= u.head < d.H:
            raise UnitError(f"{u}: head {u.head} does not exist; valid heads are 0..{d.H - 1}")
        if isinstance(u, KVHead) and not 0 <= u.group < d.KV:
            raise UnitError(
                f"{u}: KV group {u.group} does not exist; valid groups are 0..{d.KV - 1}"
            )
        if isinstance(u, Neuron) and not 0 <= u.index < d.I:
            raise UnitError(f"{u}: neuron {u.index} does not exist; valid neurons are 0..{d.I - 1}")
        if isinstance(u, Linear) and u.name not in self.family.linears:
            raise UnitError(
                f"{u}: no linear named {u.name!r} in a {self.family.family} layer; valid names: "
                + ", ".join(self.family.linears)
            )
        return u

    def hook(self, point: str, layer: int) -> str:
        """Full bridge hook name of a named point (see :data:`DEFAULT_HOOK_POINTS`) in a layer,
        e.g. ``hook("head", 3) == "blocks.3.attn.hook_z"``."""
        rel = self.family.hook_points.get(point) or DEFAULT_HOOK_POINTS.get(point)
        if rel is None:
            raise LayoutMismatchError(
                f"unknown hook point {point!r}; known: {', '.join(DEFAULT_HOOK_POINTS)}"
            )
        return f"blocks.{layer}.{rel}"

    def output_block(
        self, weight: torch.Tensor, s: TensorSlice
    ) -> Float[torch.Tensor, "size D"]:
        """A unit's block of its output projection as ``[size, D]`` (one write vector a row).

        ``s`` slices the projection's *input* dim; the other dim is the model dim, so
        moving the sliced dim first serves ``nn.Linear`` (``[D, in]``) and GPT-2's
        ``Conv1D`` (``[in, D]``) alike.
        """
        return weight.narrow(s.dim, s.start, s.size).movedim(s.dim, 0)

    def output_blocks(
        self, weight: torch.Tensor, kind: UnitKind, layer: int
    ) -> Float[torch.Tensor, "n size D"]:
        """Every head's (``kind="head"``) or neuron's output block in ``layer``, as
        ``[n, size, D]``: row ``r`` of block ``u`` is what unit ``u``'s ``r``-th input
        feature writes into the residual stream.

        ``weight`` is the output projection's HF tensor,
        ``self.param_name(layer, self.output_linear(kind) + ".weight")``. Its dtype is
        kept (callers promote). The blocks are one ``index_select`` when the table's
        slices are evenly spaced (every shipped layout), and the orientation is the
        same ``movedim`` as :meth:`output_block`, so ``Conv1D`` needs no special case.
        """
        if kind not in ("head", "neuron"):
            raise UnitError(f"output_blocks: kind must be 'head' or 'neuron', not {kind!r}")
        cls = Head if kind == "head" else Neuron
        n = self.count(kind)
        first = self.output_slice(cls(layer, 0))
        expect = self.shapes.get(first.param)
        if expect is not None and tuple(weight.shape) != tuple(expect):
            raise LayoutMismatchError(
                f"output_blocks: weight has shape {tuple(weight.shape)}, but {first.param} "
                f"has shape {tuple(expect)}; pass the tensor named "
                "param_name(layer, output_linear(kind) + '.weight')"
            )
        size = first.size
        if n > 1:
            step = self.output_slice(cls(layer, 1)).start - first.start
            last = self.output_slice(cls(layer, n - 1))
            affine = last.start == first.start + (n - 1) * step and last.size == size
        else:
            step, affine = size, True
        if affine:
            starts = first.start + step * torch.arange(n)
        else:  # pragma: no cover - every shipped layout is affine
            starts = torch.tensor([self.output_slice(cls(layer, i)).start for i in range(n)])
        idx = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1).to(weight.device)
        rows = weight.index_select(first.dim, idx).movedim(first.dim, 0)
        return rows.reshape(n, size, -1)

    def linear_hooks(self, unit: Linear) -> tuple[str, ...]:
        """Bridge hook names (``blocks.3.attn.q.hook_out``, ...) that together are its output."""
        u = self.validate(unit)
        assert isinstance(u, Linear)
        rel = self.family.bridge_hooks.get(u.name)
        if not rel:
            raise LayoutMismatchError(
                f"the {self.family.family} layout has no bridge hook for {u.name!r}; add it to "
                "the family's bridge_hooks table in layouts.py"
            )
        return tuple(f"blocks.{u.layer}.{h}" for h in rel)

    def output_linear(self, kind: UnitKind) -> str:
        """The linear that heads (``attn.o``) or neurons (``mlp.out``) write through."""
        point = {"head": "attn_out", "neuron": "mlp_out"}.get(kind)
        want = None
        if point is not None:
            want = (self.family.hook_points.get(point) or DEFAULT_HOOK_POINTS[point],)
        for name, hooks in self.family.bridge_hooks.items():
            if want is not None and tuple(hooks) == want:
                return name
        raise LayoutMismatchError(
            f"no output projection for {kind!r} units in the {self.family.family} layout"
        )

    def output_slice(self, unit: Head | Neuron) -> TensorSlice:
        """The unit's slice of its output projection's weight (sliced along its input dim).

        ``dim == 1``: an ``nn.Linear`` weight ``[out, in]``; ``dim == 0``: a GPT-2
        ``Conv1D`` weight ``[in, out]``.
        """
        u = self.validate(unit)
        weight = self.param_name(u.layer, self.output_linear(u.kind) + ".weight")
        for s in self.slices(u):
            if s.param == weight:
                return s
        raise LayoutMismatchError(f"{u}: no slice of {weight!r} in its layout")

    def kv_group_of(self, head: Head) -> KVHead:
        """The KV group whose k/v rows query head ``head`` reads."""
        return KVHead(head.layer, head.head // self.group_size)

    def slices(self, unit: Unit | str) -> tuple[TensorSlice, ...]:
        """The exact HF tensor slices that make up ``unit``."""
        u = self.validate(unit)
        if u in self._cache:
            return self._cache[u]
        if isinstance(u, Linear):
            out = []
            for leaf in ("weight", "bias"):
                name = self.param_name(u.layer, f"{u.name}.{leaf}")
                if name in self.shapes:
                    out.append(TensorSlice(name, 0, 0, self.shapes[name][0]))
            if not out:
                raise LayoutMismatchError(f"{u}: checkpoint has no tensor {name!r}")
            res = tuple(out)
        else:
            pieces = {
                "head": self.family.head,
                "kv_head": self.family.kv_head,
                "neuron": self.family.neuron,
            }[u.kind]
            env = self.dims.env()
            env.update(h=getattr(u, "head", 0), g=getattr(u, "group", 0), i=getattr(u, "index", 0))
            res = tuple(s for p in pieces if (s := self._resolve(u.layer, p, env)) is not None)
        self._cache[u] = res
        return res

    def _resolve(self, layer: int, p: Piece, env: Mapping[str, int]) -> TensorSlice | None:
        name = self.param_name(layer, p.tensor)
        if name not in self.shapes:
            if p.optional:
                return None
            raise LayoutMismatchError(
                f"the {self.family.family} layout expects tensor {name!r}, which this checkpoint "
                "lacks; is the config's model_type right?"
            )
        start = _eval(p.start, env)
        stop = start + _eval(p.size, env)
        shape = self.shapes[name]
        if p.dim >= len(shape) or stop > shape[p.dim]:
            raise LayoutMismatchError(
                f"slice {start}:{stop} on dim {p.dim} is outside {name} with shape {shape}"
            )
        return TensorSlice(name, p.dim, start, stop)

    def n_params(self, unit: Unit | str) -> int:
        """Number of scalar weights a unit covers (a head is ~40x a neuron)."""
        total = 0
        for s in self.slices(unit):
            shape = list(self.shapes[s.param])
            shape[s.dim] = s.size
            n = 1
            for x in shape:
                n *= x
            total += n
        return total

    def unit_tensors(self) -> list[str]:
        """Every HF tensor that some unit can touch (what a compatible pair must share)."""
        names: list[str] = []
        for layer in range(self.n_layers):
            for lin in self.family.linears:
                for leaf in ("weight", "bias"):
                    n = self.param_name(layer, f"{lin}.{leaf}")
                    if n in self.shapes:
                        names.append(n)
        return names

    def mirror_slices(self, layer: int) -> list[tuple[str, list[TensorSlice]]]:
        """For each bridge copy in ``layer``: its path and the HF slices it concatenates.

        A copy the bridge exposes under several names appears once per name
        (its ``path``, then each of its ``aliases``), with the same slices.
        """
        out = []
        for m in self.family.mirrors:
            src = self.param_name(layer, m.source)
            if src not in self.shapes:
                continue
            parts = []
            for h in range(self.dims.H):
                env = {**self.dims.env(), "h": h}
                start = _eval(m.start, env)
                parts.append(TensorSlice(src, m.dim, start, start + _eval(m.size, env)))
            for path in (m.path, *m.aliases):
                out.append((self.prefix(layer) + path, parts))
        return out


def bind_layout(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout:
    """Bind the family table for ``config.model_type`` to a model's dims and tensor shapes."""
    model_type = getattr(config, "model_type", None) or ""
    fam = family_for(model_type)
    layout = ModelLayout(fam, dims_from_config(config), dict(shapes), model_type=model_type)
    # Resolve one unit of each kind per layer so a wrong table fails at load, not mid-edit.
    for layer in range(layout.n_layers):
        for u in (
            Head(layer, 0),
            KVHead(layer, 0),
            Neuron(layer, 0),
            Head(layer, layout.dims.H - 1),
            KVHead(layer, layout.dims.KV - 1),
            Neuron(layer, layout.dims.I - 1),
        ):
            layout.slices(u)
    return layout


def bind_checkpoint_layout(
    config: Any, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[ModelLayout, dict[str, str]]:
    """Bind the layout to a saved checkpoint's stored tensor names and shapes.

    Tries the canonical HF model names, then each of the family's
    ``checkpoint_aliases`` in order. Returns the layout (over HF *model* names)
    and a map model name -> stored name (the identity for canonical checkpoints).
    """
    model_type = getattr(config, "model_type", None) or ""
    fam = family_for(model_type)
    try:
        return bind_layout(config, shapes), {n: n for n in shapes}
    except LayoutMismatchError as e:
        first = e
    tried: list[str] = []
    for alias in fam.checkpoint_aliases:
        if alias.model_prefix and any(n.startswith(alias.model_prefix) for n in shapes):
            continue  # already spelled canonically: this alias is not what differs
        rename: dict[str, str] = {}
        for stored in shapes:
            model = alias.model_name(stored)
            if model is not None:
                rename[model] = stored
        tried.append(f"{alias.stored_prefix!r} for {alias.model_prefix!r}")
        if not rename:
            continue
        try:
            layout = bind_layout(config, {m: shapes[st] for m, st in rename.items()})
        except LayoutMismatchError:
            continue
        return layout, rename
    how = (
        f"also tried the stored-name aliases {', '.join(tried)}"
        if tried
        else f"the {fam.family} family declares no checkpoint_aliases"
    )
    raise LayoutMismatchError(
        f"{first} ({how}; if this checkpoint spells its tensor names differently, add a "
        f"CheckpointAlias to the {fam.family} FamilyLayout's checkpoint_aliases)"
    ) from first


def check_bridge(layout: ModelLayout, bridge: Any) -> None:
    """Check a family table against a booted TransformerLens bridge, without a forward pass.

    * every hook the table names (``bridge_hooks`` and every hook point) exists in
      ``bridge.hook_dict`` for every layer;
    * every linear read through a single ``<component>.hook_out`` is the HF module
      the adapter's ``component_mapping`` maps that component to, so scores and
      edits address the same weights.

    Raises :class:`LayoutMismatchError` naming the table entry and the fix.
    """
    fam = layout.family
    where = f"the {fam.family} FamilyLayout (tl_transplant/arch/layouts.py)"
    hooks = set(getattr(bridge, "hook_dict", {}) or {})
    points = {**DEFAULT_HOOK_POINTS, **fam.hook_points}
    for layer in range(layout.n_layers):
        for point in points:
            name = layout.hook(point, layer)
            if name not in hooks:
                have = sorted(h for h in hooks if h.startswith(f"blocks.{layer}."))
                raise LayoutMismatchError(
                    f"{where}: hook point {point!r} is {name!r}, which this TransformerBridge "
                    f"does not have; set hook_points[{point!r}] to one of its hooks "
                    f"({', '.join(have[:12])}, ...)"
                )
        for kind, rel in fam.joint_norms.items():
            if f"blocks.{layer}.{rel}" not in hooks:
                raise LayoutMismatchError(
                    f"{where}: joint_norms[{kind!r}] is {rel!r}, but this TransformerBridge "
                    f"has no hook blocks.{layer}.{rel}; name the hook_out of the shared norm"
                )
        for lin in fam.linears:
            for name in layout.linear_hooks(Linear(layer, lin)):
                if name not in hooks:
                    raise LayoutMismatchError(
                        f"{where}: bridge_hooks[{lin!r}] names {name!r}, which this "
                        "TransformerBridge does not have; use the hook_out of the bridge "
                        f"component wrapping {layout.module_path(Linear(layer, lin))!r}"
                    )
    translate = getattr(getattr(bridge, "adapter", None), "translate_transformer_lens_path", None)
    if translate is None:
        return
    for lin, rels in fam.bridge_hooks.items():
        if len(rels) != 1 or not rels[0].endswith(".hook_out"):
            continue  # fused: the bridge splits it into several components
        comp = rels[0].removesuffix(".hook_out")
        for layer in range(layout.n_layers):
            ours = layout.module_path(Linear(layer, lin))
            try:
                theirs = translate(f"blocks.{layer}.{comp}")
            except (ValueError, KeyError, AttributeError):
                continue  # the adapter builds this component outside its mapping
            if theirs != ours:
                raise LayoutMismatchError(
                    f"{where}: linears[{lin!r}] is {ours!r}, but the TransformerLens adapter "
                    f"maps the bridge component blocks.{layer}.{comp} (whose hook is "
                    f"bridge_hooks[{lin!r}]) to {theirs!r}; fix linears[{lin!r}] or "
                    "its bridge_hooks entry"
                )


def describe_families() -> list[dict[str, Any]]:
    """Supported families as rows (for docs and ``tl-transplant --help``)."""
    return [
        {
            "family": f.family,
            "model_types": list(f.model_types),
            "linears": list(f.linears),
            "joint_norms": dict(f.joint_norms),
            "notes": f.notes,
        }
        for f in registered_families()
    ]


__all__ = [
    "DEFAULT_HOOK_POINTS",
    "FAMILIES",
    "CheckpointAlias",
    "Dims",
    "FamilyLayout",
    "LayoutMismatchError",
    "Mirror",
    "ModelLayout",
    "Piece",
    "TensorSlice",
    "UnsupportedArchitectureError",
    "bind_checkpoint_layout",
    "bind_layout",
    "check_bridge",
    "describe_families",
    "dims_from_config",
    "family_for",
    "register_family",
    "registered_families",
    "supported_model_types",
    "tiny_config_kwargs",
    "unregister_family",
]
