"""Phi-3: a fused ``qkv_proj`` in blocks (q | k | v) and a fused ``gate_up_proj``
(gate | up)."""

from __future__ import annotations

from tl_transplant.arch.families._common import TINY_GQA
from tl_transplant.arch.schema import FamilyLayout, weight_piece

FAMILY = FamilyLayout(
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
        weight_piece("attn.qkv_proj", 0, "h*dh", "dh"),
        weight_piece("attn.o_proj", 1, "h*dh", "dh"),
    ),
    kv_head=(
        weight_piece("attn.qkv_proj", 0, "H*dh + g*dh", "dh"),
        weight_piece("attn.qkv_proj", 0, "H*dh + KV*dh + g*dh", "dh"),
    ),
    # gate_up_proj rows are [gate (I) | up (I)].
    neuron=(
        weight_piece("mlp.gate_up_proj", 0, "i", "1"),
        weight_piece("mlp.gate_up_proj", 0, "I + i", "1"),
        weight_piece("mlp.down_proj", 1, "i", "1"),
    ),
    notes="fused qkv_proj and gate_up_proj",
    bridge_hooks={
        "attn.qkv_proj": ("attn.q.hook_out", "attn.k.hook_out", "attn.v.hook_out"),
        "attn.o_proj": ("attn.o.hook_out",),
        "mlp.gate_up_proj": ("mlp.gate.hook_out", "mlp.in.hook_out"),
        "mlp.down_proj": ("mlp.out.hook_out",),
    },
    tiny={"phi3": TINY_GQA},
)
