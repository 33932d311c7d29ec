"""Architectures as data: unit references (``units``) and the per-family layout table
(``layouts``: which slices of which HF tensors make up a head, KV group, neuron or linear).

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "DEFAULT_HOOK_POINTS": "layouts",
    "FAMILIES": "layouts",
    "CheckpointAlias": "layouts",
    "Dims": "layouts",
    "FamilyLayout": "layouts",
    "LayoutMismatchError": "layouts",
    "Mirror": "layouts",
    "ModelLayout": "layouts",
    "Piece": "layouts",
    "TensorSlice": "layouts",
    "UnsupportedArchitectureError": "layouts",
    "bind_checkpoint_layout": "layouts",
    "bind_layout": "layouts",
    "check_bridge": "layouts",
    "describe_families": "layouts",
    "dims_from_config": "layouts",
    "family_for": "layouts",
    "register_family": "layouts",
    "registered_families": "layouts",
    "supported_model_types": "layouts",
    "tiny_config_kwargs": "layouts",
    "unregister_family": "layouts",
    "UnitKind": "units",
    "UNIT_KINDS": "units",
    "UnitError": "units",
    "Head": "units",
    "KVHead": "units",
    "Neuron": "units",
    "Linear": "units",
    "Unit": "units",
    "parse_unit": "units",
    "parse_units": "units",
    "normalize_kinds": "units",
    "parse_kinds_or_units": "units",
    "unit_sort_key": "units",
}

if TYPE_CHECKING:
    from tl_transplant.arch.layouts import (
        DEFAULT_HOOK_POINTS as DEFAULT_HOOK_POINTS,
    )
    from tl_transplant.arch.layouts import (
        FAMILIES as FAMILIES,
    )
    from tl_transplant.arch.layouts import (
        CheckpointAlias as CheckpointAlias,
    )
    from tl_transplant.arch.layouts import (
        Dims as Dims,
    )
    from tl_transplant.arch.layouts import (
        FamilyLayout as FamilyLayout,
    )
    from tl_transplant.arch.layouts import (
        LayoutMismatchError as LayoutMismatchError,
    )
    from tl_transplant.arch.layouts import (
        Mirror as Mirror,
    )
    from tl_transplant.arch.layouts import (
        ModelLayout as ModelLayout,
    )
    from tl_transplant.arch.layouts import (
        Piece as Piece,
    )
    from tl_transplant.arch.layouts import (
        TensorSlice as TensorSlice,
    )
    from tl_transplant.arch.layouts import (
        UnsupportedArchitectureError as UnsupportedArchitectureError,
    )
    from tl_transplant.arch.layouts import (
        bind_checkpoint_layout as bind_checkpoint_layout,
    )
    from tl_transplant.arch.layouts import (
        bind_layout as bind_layout,
    )
    from tl_transplant.arch.layouts import (
        check_bridge as check_bridge,
    )
    from tl_transplant.arch.layouts import (
        describe_families as describe_families,
    )
    from tl_transplant.arch.layouts import (
        dims_from_config as dims_from_config,
    )
    from tl_transplant.arch.layouts import (
        family_for as family_for,
    )
    from tl_transplant.arch.layouts import (
        register_family as register_family,
    )
    from tl_transplant.arch.layouts import (
        registered_families as registered_families,
    )
    from tl_transplant.arch.layouts import (
        supported_model_types as supported_model_types,
    )
    from tl_transplant.arch.layouts import (
        tiny_config_kwargs as tiny_config_kwargs,
    )
    from tl_transplant.arch.layouts import (
        unregister_family as unregister_family,
    )
    from tl_transplant.arch.units import (
        UNIT_KINDS as UNIT_KINDS,
    )
    from tl_transplant.arch.units import (
        Head as Head,
    )
    from tl_transplant.arch.units import (
        KVHead as KVHead,
    )
    from tl_transplant.arch.units import (
        Linear as Linear,
    )
    from tl_transplant.arch.units import (
        Neuron as Neuron,
    )
    from tl_transplant.arch.units import (
        Unit as Unit,
    )
    from tl_transplant.arch.units import (
        UnitError as UnitError,
    )
    from tl_transplant.arch.units import (
        UnitKind as UnitKind,
    )
    from tl_transplant.arch.units import (
        normalize_kinds as normalize_kinds,
    )
    from tl_transplant.arch.units import (
        parse_kinds_or_units as parse_kinds_or_units,
    )
    from tl_transplant.arch.units import (
        parse_unit as parse_unit,
    )
    from tl_transplant.arch.units import (
        parse_units as parse_units,
    )
    from tl_transplant.arch.units import (
        unit_sort_key as unit_sort_key,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
