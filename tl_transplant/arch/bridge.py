"""The check of a family table against a booted TransformerLens bridge.

:func:`check_bridge` runs at load (no forward pass): a wrong table entry fails there,
naming the field to fix, instead of giving wrong scores or edits later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tl_transplant.arch.model_layout import ModelLayout
from tl_transplant.arch.schema import DEFAULT_HOOK_POINTS, LayoutMismatchError
from tl_transplant.arch.units import Linear

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def check_bridge(layout: ModelLayout, bridge: TransformerBridge) -> None:
    """Check a family table against a booted TransformerLens bridge, without a forward pass.

    * every hook the table names (``bridge_hooks`` and every hook point) exists in
      ``bridge.hook_dict`` for every layer;
    * every linear read through a single ``<component>.hook_out`` is the HF module
      the adapter's ``component_mapping`` maps that component to, so scores and
      edits address the same weights.

    Raises :class:`LayoutMismatchError` naming the table entry and the fix.
    """
    fam = layout.family
    where = (
        f"the {fam.family} FamilyLayout (its module in tl_transplant/arch/families/, or its "
        "register_family call)"
    )
    hooks = set(getattr(bridge, "hook_dict", {}) or {})
    points = {**DEFAULT_HOOK_POINTS, **fam.hook_points}
    for layer in range(layout.n_layers):
        for point in points:
            name = layout.hook(point, layer)
            if name not in hooks:
                have = sorted(h for h in hooks if h.startswith(layout.block_path(layer, "")))
                raise LayoutMismatchError(
                    f"{where}: hook point {point!r} is {name!r}, which this TransformerBridge "
                    f"does not have; set hook_points[{point!r}] to one of its hooks "
                    f"({', '.join(have[:12])}, ...)"
                )
        for kind, rel in fam.joint_norms.items():
            if layout.block_path(layer, rel) not in hooks:
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
                theirs = translate(layout.block_path(layer, comp))
            except (ValueError, KeyError, AttributeError):
                continue  # the adapter builds this component outside its mapping
            if theirs != ours:
                raise LayoutMismatchError(
                    f"{where}: linears[{lin!r}] is {ours!r}, but the TransformerLens adapter "
                    f"maps the bridge component blocks.{layer}.{comp} (whose hook is "
                    f"bridge_hooks[{lin!r}]) to {theirs!r}; fix linears[{lin!r}] or "
                    "its bridge_hooks entry"
                )




__all__ = ["check_bridge"]
