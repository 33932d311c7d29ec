"""Llama and the model types that store their weights exactly like it (Mistral, Qwen2,
Qwen3, Gemma 1-3, SmolLM3, Granite): separate q/k/v/o projections with grouped-query
attention and a gated MLP.

:data:`LLAMA_LAYOUT` is that storage, for families that store their weights alike but
behave differently (``olmo2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tl_transplant.arch.families._common import TINY_GQA, gated_neuron, separate_qkv
from tl_transplant.arch.schema import FamilyLayout

_HEAD, _KV = separate_qkv()

#: Llama's layout (separate q/k/v/o, gated MLP): ``FamilyLayout(**LLAMA_LAYOUT, ...)``.
LLAMA_LAYOUT: Mapping[str, Any] = {
    "layer_prefix": "model.layers.{layer}.",
    "linears": {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
    },
    "head": _HEAD,
    "kv_head": _KV,
    "neuron": gated_neuron(),
    "bridge_hooks": {
        "attn.q_proj": ("attn.q.hook_out",),
        "attn.k_proj": ("attn.k.hook_out",),
        "attn.v_proj": ("attn.v.hook_out",),
        "attn.o_proj": ("attn.o.hook_out",),
        "mlp.gate_proj": ("mlp.gate.hook_out",),
        "mlp.up_proj": ("mlp.in.hook_out",),
        "mlp.down_proj": ("mlp.out.hook_out",),
    },
}

FAMILY = FamilyLayout(
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
    **LLAMA_LAYOUT,
    notes=(
        "separate q/k/v/o with GQA; gated MLP. qwen3 and gemma3_text also have q_norm/k_norm: "
        "RMSNorms over each head's q (k) separately, one weight [head_dim] shared by the "
        "layer's heads; like the layer norms they are no unit's weights and are never "
        "transplanted (only linears are), and heads stay isolated"
    ),
    tiny={
        "llama": TINY_GQA,
        "mistral": TINY_GQA,
        "qwen2": TINY_GQA,
        "gemma": {**TINY_GQA, "head_dim": 8},
        "gemma2": {**TINY_GQA, "head_dim": 8},
        "qwen3": {**TINY_GQA, "head_dim": 16},
        # one sliding-window (4 < the tests' 8 tokens) and one global layer
        "gemma3_text": {
            **TINY_GQA,
            "head_dim": 16,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        # layer 1 has no rotary embedding (NoPE), as every 4th SmolLM3 layer
        "smollm3": {**TINY_GQA, "no_rope_layers": [1, 0]},
        # Granite's embedding/residual/attention/logit multipliers, away from 1
        "granite": {
            **TINY_GQA,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.125,
            "logits_scaling": 8.0,
        },
    },
)
