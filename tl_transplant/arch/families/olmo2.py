"""OLMo 2: Llama's linears, post-norm, with q/k norms over the whole q and k projections
(so heads and KV groups share one normalisation: ``joint_norms``)."""

from __future__ import annotations

from tl_transplant.arch.families._common import TINY_GQA
from tl_transplant.arch.families.llama import LLAMA_LAYOUT
from tl_transplant.arch.schema import FamilyLayout

FAMILY = FamilyLayout(
    family="olmo2",
    model_types=("olmo2",),
    **LLAMA_LAYOUT,
    notes=(
        "llama's linears, post-norm. q_norm/k_norm are RMSNorms over the whole q and k "
        "projections (weights [H*dh] and [KV*dh]), not per head; they are not transplanted. "
        "Because the norm is joint, moving one head's q rows (one KV group's k rows) rescales "
        "every head's normalised queries (keys) in that layer: units are exact weight slices "
        "but not isolated in activations"
    ),
    joint_norms={"head": "attn.q_norm.hook_out", "kv_head": "attn.k_norm.hook_out"},
    tiny={"olmo2": TINY_GQA},
)
