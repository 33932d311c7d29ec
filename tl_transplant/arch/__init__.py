"""Architectures as data: everything the package knows about how a Hugging Face model
stores a unit's weights.

- ``units``: unit references (``Head``, ``KVHead``, ``Neuron``, ``Linear``) and their parsing;
- ``schema``: what a family table says (``FamilyLayout``, ``Piece``, ``Mirror``,
  ``CheckpointAlias``) and the checks every table passes;
- ``families/``: the built-in tables, one file per family (adding an architecture is one
  new file there, see ``docs/adding_an_architecture.md``);
- ``registry``: the tables by HF ``model_type`` (``register_family``, ``family_for``);
- ``model_layout``: a table bound to one model's dims and tensors (``ModelLayout``,
  ``bind_layout``): the exact slices of every unit;
- ``bridge``: the check of a table against a booted TransformerLens bridge.

Before 0.2 all but ``units`` was one module, ``layouts``; its old import path gives this
package, which still serves every one of its names. Names are imported lazily (PEP 562),
so importing the package does not load every submodule (and cannot create an import
cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "DEFAULT_HOOK_POINTS": "schema",
    "CheckpointAlias": "schema",
    "FamilyLayout": "schema",
    "LayoutMismatchError": "schema",
    "Mirror": "schema",
    "Piece": "schema",
    "UnsupportedArchitectureError": "schema",
    "bias_piece": "schema",
    "check_table": "schema",
    "weight_piece": "schema",
    "FAMILIES": "families",
    "collect_families": "families",
    "describe_families": "registry",
    "family_for": "registry",
    "register_family": "registry",
    "registered_families": "registry",
    "supported_model_types": "registry",
    "tiny_config_kwargs": "registry",
    "unregister_family": "registry",
    "Dims": "model_layout",
    "ModelLayout": "model_layout",
    "TensorSlice": "model_layout",
    "bind_checkpoint_layout": "model_layout",
    "bind_layout": "model_layout",
    "dims_from_config": "model_layout",
    "check_bridge": "bridge",
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
    from tl_transplant.arch.bridge import (
        check_bridge as check_bridge,
    )
    from tl_transplant.arch.families import (
        FAMILIES as FAMILIES,
    )
    from tl_transplant.arch.families import (
        collect_families as collect_families,
    )
    from tl_transplant.arch.model_layout import (
        Dims as Dims,
    )
    from tl_transplant.arch.model_layout import (
        ModelLayout as ModelLayout,
    )
    from tl_transplant.arch.model_layout import (
        TensorSlice as TensorSlice,
    )
    from tl_transplant.arch.model_layout import (
        bind_checkpoint_layout as bind_checkpoint_layout,
    )
    from tl_transplant.arch.model_layout import (
        bind_layout as bind_layout,
    )
    from tl_transplant.arch.model_layout import (
        dims_from_config as dims_from_config,
    )
    from tl_transplant.arch.registry import (
        describe_families as describe_families,
    )
    from tl_transplant.arch.registry import (
        family_for as family_for,
    )
    from tl_transplant.arch.registry import (
        register_family as register_family,
    )
    from tl_transplant.arch.registry import (
        registered_families as registered_families,
    )
    from tl_transplant.arch.registry import (
        supported_model_types as supported_model_types,
    )
    from tl_transplant.arch.registry import (
        tiny_config_kwargs as tiny_config_kwargs,
    )
    from tl_transplant.arch.registry import (
        unregister_family as unregister_family,
    )
    from tl_transplant.arch.schema import (
        DEFAULT_HOOK_POINTS as DEFAULT_HOOK_POINTS,
    )
    from tl_transplant.arch.schema import (
        CheckpointAlias as CheckpointAlias,
    )
    from tl_transplant.arch.schema import (
        FamilyLayout as FamilyLayout,
    )
    from tl_transplant.arch.schema import (
        LayoutMismatchError as LayoutMismatchError,
    )
    from tl_transplant.arch.schema import (
        Mirror as Mirror,
    )
    from tl_transplant.arch.schema import (
        Piece as Piece,
    )
    from tl_transplant.arch.schema import (
        UnsupportedArchitectureError as UnsupportedArchitectureError,
    )
    from tl_transplant.arch.schema import (
        bias_piece as bias_piece,
    )
    from tl_transplant.arch.schema import (
        check_table as check_table,
    )
    from tl_transplant.arch.schema import (
        weight_piece as weight_piece,
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
