"""The registry of family tables, by HF ``model_type``.

The built-in tables (:data:`~tl_transplant.arch.families.FAMILIES`) are registered at
import; :func:`register_family` adds one at runtime (checked with
:func:`~tl_transplant.arch.schema.check_table`), :func:`family_for` finds the table of a
model type, and :func:`tiny_config_kwargs` gives the test suite its tiny config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tl_transplant.arch.families import FAMILIES
from tl_transplant.arch.schema import (
    FamilyLayout,
    LayoutMismatchError,
    UnsupportedArchitectureError,
    check_table,
)

_REGISTRY: dict[str, FamilyLayout] = {}
_BY_MODEL_TYPE: dict[str, FamilyLayout] = {}


def register_family(layout: FamilyLayout, *, replace: bool = False) -> FamilyLayout:
    """Add a family table at runtime (what a module in ``arch/families`` does at import).

    Its model types must not already belong to another family unless ``replace``
    (which first drops the family of the same name). Returns ``layout``.
    """
    check_table(layout)
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
            "table in a new module under tl_transplant/arch/families/ (see "
            "docs/adding_an_architecture.md)."
        ) from None


def tiny_config_kwargs(model_type: str) -> Mapping[str, Any]:
    """The table's tiny-config keyword arguments for a model type (see ``FamilyLayout.tiny``)."""
    return family_for(model_type).tiny[model_type]


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


# The built-in tables, at import.
for _fam in FAMILIES:
    register_family(_fam)

__all__ = [
    "describe_families",
    "family_for",
    "register_family",
    "registered_families",
    "supported_model_types",
    "tiny_config_kwargs",
    "unregister_family",
]
