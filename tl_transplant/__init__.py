"""tl_transplant: find the units that carry a task in a source LM and transplant them.

Public API (the CLI and notebooks use exactly these)::

    from tl_transplant import ModelPair, transplant, apply_transplant, export_hf
"""

from tl_transplant.export import ExportError, export_hf
from tl_transplant.layouts import (
    LayoutMismatchError,
    UnsupportedArchitectureError,
    supported_model_types,
)
from tl_transplant.pair import (
    IncompatiblePairError,
    ModelLoadError,
    ModelPair,
    ModelSide,
    NonFiniteWeightsError,
)
from tl_transplant.transplant import (
    Manifest,
    TransplantError,
    apply_transplant,
    plan_transplant,
    transplant,
)
from tl_transplant.units import (
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitError,
    parse_unit,
    parse_units,
)

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "Head",
    "IncompatiblePairError",
    "KVHead",
    "LayoutMismatchError",
    "Linear",
    "Manifest",
    "ModelLoadError",
    "ModelPair",
    "ModelSide",
    "Neuron",
    "NonFiniteWeightsError",
    "TransplantError",
    "Unit",
    "UnitError",
    "UnsupportedArchitectureError",
    "__version__",
    "apply_transplant",
    "export_hf",
    "parse_unit",
    "parse_units",
    "plan_transplant",
    "supported_model_types",
    "transplant",
]
