"""GPT-NeoX (Pythia): a fused ``query_key_value`` whose rows are interleaved per head
(``[q_h | k_h | v_h]`` for each head ``h``); the TransformerLens bridge keeps split q/k/v
copies of it (the mirrors)."""

from __future__ import annotations

from tl_transplant.arch.families._common import TINY_MHA
from tl_transplant.arch.schema import FamilyLayout, Mirror, bias_piece, weight_piece

FAMILY = FamilyLayout(
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
        weight_piece("attn.query_key_value", 0, "h*3*dh", "dh"),
        bias_piece("attn.query_key_value", "h*3*dh", "dh"),
        weight_piece("attn.dense", 1, "h*dh", "dh"),
    ),
    kv_head=(
        weight_piece("attn.query_key_value", 0, "g*3*dh + dh", "dh"),
        bias_piece("attn.query_key_value", "g*3*dh + dh", "dh"),
        weight_piece("attn.query_key_value", 0, "g*3*dh + 2*dh", "dh"),
        bias_piece("attn.query_key_value", "g*3*dh + 2*dh", "dh"),
    ),
    neuron=(
        weight_piece("mlp.dense_h_to_4h", 0, "i", "1"),
        bias_piece("mlp.dense_h_to_4h", "i", "1"),
        weight_piece("mlp.dense_4h_to_h", 1, "i", "1"),
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
    tiny={"gpt_neox": TINY_MHA},
)
