"""GPT-2: a fused ``c_attn`` [D, 3D] (q | k | v blocks) and ``Conv1D`` linears, which store
weights transposed (``[in, out]``), so a head's slice of ``c_attn`` is on dim 1."""

from __future__ import annotations

from tl_transplant.arch.schema import CheckpointAlias, FamilyLayout, bias_piece, weight_piece

FAMILY = FamilyLayout(
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
        weight_piece("attn.c_attn", 1, "h*dh", "dh"),
        bias_piece("attn.c_attn", "h*dh", "dh"),
        weight_piece("attn.c_proj", 0, "h*dh", "dh"),
    ),
    kv_head=(
        weight_piece("attn.c_attn", 1, "H*dh + g*dh", "dh"),
        bias_piece("attn.c_attn", "H*dh + g*dh", "dh"),
        weight_piece("attn.c_attn", 1, "2*H*dh + g*dh", "dh"),
        bias_piece("attn.c_attn", "2*H*dh + g*dh", "dh"),
    ),
    neuron=(
        weight_piece("mlp.c_fc", 1, "i", "1"),
        bias_piece("mlp.c_fc", "i", "1"),
        weight_piece("mlp.c_proj", 0, "i", "1"),
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
)
