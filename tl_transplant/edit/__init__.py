"""Weight edits: the reversible transplant and its plan (``edits``), weight-level masks
(``weights``), parameter budgets (``budget``), the manifest (``manifest``) and
activation patching (``patching``).

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "BUDGET_RULES": "budget",
    "BudgetPick": "budget",
    "ParamCounter": "budget",
    "block_params": "budget",
    "budget_cap": "budget",
    "budget_label": "budget",
    "check_fraction": "budget",
    "check_rule": "budget",
    "count_params": "budget",
    "fill_budget": "budget",
    "selection_size": "budget",
    "MANIFEST_FORMAT": "edits",
    "KVMode": "edits",
    "TransplantError": "edits",
    "tensor_sha256": "edits",
    "blend_values": "edits",
    "PlanIndex": "edits",
    "Plan": "edits",
    "plan_transplant": "edits",
    "transplant": "edits",
    "apply_transplant": "edits",
    "MANIFEST_NAME": "manifest",
    "MASK_FILE_RE": "manifest",
    "Manifest": "manifest",
    "ManifestDoc": "manifest",
    "ManifestError": "manifest",
    "ManifestLike": "manifest",
    "manifest_document": "manifest",
    "mask_entry": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "PatchError": "patching",
    "PatchMode": "patching",
    "patch_activations": "patching",
    "MASK_FORMAT": "weights",
    "WEIGHT": "weights",
    "Selection": "weights",
    "WeightMask": "weights",
    "WeightMaskError": "weights",
    "block_tensors": "weights",
    "file_sha256": "weights",
    "is_mask": "weights",
    "top_weights": "weights",
    "unit_mask": "weights",
}

if TYPE_CHECKING:
    from tl_transplant.edit.budget import (
        BUDGET_RULES as BUDGET_RULES,
    )
    from tl_transplant.edit.budget import (
        BudgetPick as BudgetPick,
    )
    from tl_transplant.edit.budget import (
        ParamCounter as ParamCounter,
    )
    from tl_transplant.edit.budget import (
        block_params as block_params,
    )
    from tl_transplant.edit.budget import (
        budget_cap as budget_cap,
    )
    from tl_transplant.edit.budget import (
        budget_label as budget_label,
    )
    from tl_transplant.edit.budget import (
        check_fraction as check_fraction,
    )
    from tl_transplant.edit.budget import (
        check_rule as check_rule,
    )
    from tl_transplant.edit.budget import (
        count_params as count_params,
    )
    from tl_transplant.edit.budget import (
        fill_budget as fill_budget,
    )
    from tl_transplant.edit.budget import (
        selection_size as selection_size,
    )
    from tl_transplant.edit.edits import (
        MANIFEST_FORMAT as MANIFEST_FORMAT,
    )
    from tl_transplant.edit.edits import (
        KVMode as KVMode,
    )
    from tl_transplant.edit.edits import (
        Plan as Plan,
    )
    from tl_transplant.edit.edits import (
        PlanIndex as PlanIndex,
    )
    from tl_transplant.edit.edits import (
        TransplantError as TransplantError,
    )
    from tl_transplant.edit.edits import (
        apply_transplant as apply_transplant,
    )
    from tl_transplant.edit.edits import (
        blend_values as blend_values,
    )
    from tl_transplant.edit.edits import (
        plan_transplant as plan_transplant,
    )
    from tl_transplant.edit.edits import (
        tensor_sha256 as tensor_sha256,
    )
    from tl_transplant.edit.edits import (
        transplant as transplant,
    )
    from tl_transplant.edit.manifest import (
        MANIFEST_NAME as MANIFEST_NAME,
    )
    from tl_transplant.edit.manifest import (
        MASK_FILE_RE as MASK_FILE_RE,
    )
    from tl_transplant.edit.manifest import (
        Manifest as Manifest,
    )
    from tl_transplant.edit.manifest import (
        ManifestDoc as ManifestDoc,
    )
    from tl_transplant.edit.manifest import (
        ManifestError as ManifestError,
    )
    from tl_transplant.edit.manifest import (
        ManifestLike as ManifestLike,
    )
    from tl_transplant.edit.manifest import (
        manifest_document as manifest_document,
    )
    from tl_transplant.edit.manifest import (
        mask_entry as mask_entry,
    )
    from tl_transplant.edit.manifest import (
        read_manifest as read_manifest,
    )
    from tl_transplant.edit.manifest import (
        write_manifest as write_manifest,
    )
    from tl_transplant.edit.patching import (
        PatchError as PatchError,
    )
    from tl_transplant.edit.patching import (
        PatchMode as PatchMode,
    )
    from tl_transplant.edit.patching import (
        patch_activations as patch_activations,
    )
    from tl_transplant.edit.weights import (
        MASK_FORMAT as MASK_FORMAT,
    )
    from tl_transplant.edit.weights import (
        WEIGHT as WEIGHT,
    )
    from tl_transplant.edit.weights import (
        Selection as Selection,
    )
    from tl_transplant.edit.weights import (
        WeightMask as WeightMask,
    )
    from tl_transplant.edit.weights import (
        WeightMaskError as WeightMaskError,
    )
    from tl_transplant.edit.weights import (
        block_tensors as block_tensors,
    )
    from tl_transplant.edit.weights import (
        file_sha256 as file_sha256,
    )
    from tl_transplant.edit.weights import (
        is_mask as is_mask,
    )
    from tl_transplant.edit.weights import (
        top_weights as top_weights,
    )
    from tl_transplant.edit.weights import (
        unit_mask as unit_mask,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
