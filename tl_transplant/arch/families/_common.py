"""Pieces and tiny dims that several family tables share.

Not a family (the leading underscore keeps it out of :data:`FAMILIES`): the q/k/v
pieces of separate projections, the pieces of a gated MLP neuron, and the dims of the
tiny 2-layer test configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tl_transplant.arch.schema import Piece, bias_piece, weight_piece


def separate_qkv() -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """Head and KV-group pieces of separate ``attn.q_proj``/``k_proj``/``v_proj``/``o_proj``
    linears (``nn.Linear``, weights ``[out, in]``; biases where the checkpoint has them)."""
    head = (
        weight_piece("attn.q_proj", 0, "h*dh", "dh"),
        bias_piece("attn.q_proj", "h*dh", "dh"),
        weight_piece("attn.o_proj", 1, "h*dh", "dh"),
    )
    kv = (
        weight_piece("attn.k_proj", 0, "g*dh", "dh"),
        bias_piece("attn.k_proj", "g*dh", "dh"),
        weight_piece("attn.v_proj", 0, "g*dh", "dh"),
        bias_piece("attn.v_proj", "g*dh", "dh"),
    )
    return head, kv


def gated_neuron() -> tuple[Piece, ...]:
    """A neuron of a gated MLP: its rows of ``gate_proj`` and ``up_proj``, its column of
    ``down_proj``."""
    return (
        weight_piece("mlp.gate_proj", 0, "i", "1"),
        bias_piece("mlp.gate_proj", "i", "1"),
        weight_piece("mlp.up_proj", 0, "i", "1"),
        bias_piece("mlp.up_proj", "i", "1"),
        weight_piece("mlp.down_proj", 1, "i", "1"),
    )


#: Tiny 2-layer dims: 4 query heads, 2 KV heads where the architecture has GQA.
TINY_MHA: Mapping[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
TINY_GQA: Mapping[str, Any] = {**TINY_MHA, "num_key_value_heads": 2}
