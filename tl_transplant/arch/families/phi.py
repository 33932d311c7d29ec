"""Phi-1.5 and Phi-2: separate q/k/v with biases, a ``dense`` output projection and a plain
(ungated) ``fc1``/``fc2`` MLP."""

from __future__ import annotations

from tl_transplant.arch.families._common import TINY_MHA, separate_qkv
from tl_transplant.arch.schema import FamilyLayout, bias_piece, weight_piece

FAMILY = FamilyLayout(
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
        weight_piece("attn.q_proj", 0, "h*dh", "dh"),
        bias_piece("attn.q_proj", "h*dh", "dh"),
        weight_piece("attn.dense", 1, "h*dh", "dh"),
    ),
    kv_head=separate_qkv()[1],
    neuron=(
        weight_piece("mlp.fc1", 0, "i", "1"),
        bias_piece("mlp.fc1", "i", "1"),
        weight_piece("mlp.fc2", 1, "i", "1"),
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
    tiny={"phi": TINY_MHA},
)
