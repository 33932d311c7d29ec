"""tl_transplant: find the units that carry a task in a source LM and transplant them.

Public API (the CLI and notebooks use exactly these)::

    from tl_transplant import ModelPair, score, sweep, transplant, apply_transplant, export_hf
    from tl_transplant import run   # the whole pipeline from a config
"""

from tl_transplant.budget import block_params, fill_budget
from tl_transplant.config import ConfigError, load_config
from tl_transplant.edits import (
    TransplantError,
    apply_transplant,
    plan_transplant,
    transplant,
)
from tl_transplant.evaluation import evaluate, evaluate_transplant, transplant_metrics
from tl_transplant.export import ExportError, export_hf
from tl_transplant.layouts import (
    LayoutMismatchError,
    UnsupportedArchitectureError,
    supported_model_types,
)
from tl_transplant.manifest import Manifest, read_manifest, write_manifest
from tl_transplant.pair import (
    IncompatiblePairError,
    ModelLoadError,
    ModelPair,
    ModelSide,
    NonFiniteWeightsError,
)
from tl_transplant.patching import PatchError, patch_activations
from tl_transplant.pipeline import RunResult, run
from tl_transplant.report import write_report  # also registers SweepResult.save(report=True)
from tl_transplant.retention import generic_retention
from tl_transplant.scoring import Scores, available_methods, score
from tl_transplant.sweeps import SweepResult, sweep
from tl_transplant.tasks import Task, builtin_task
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
    "block_params",
    "fill_budget",
    "generic_retention",
    "PatchError",
    "patch_activations",
    "ConfigError",
    "RunResult",
    "Scores",
    "SweepResult",
    "Task",
    "available_methods",
    "builtin_task",
    "evaluate",
    "evaluate_transplant",
    "load_config",
    "run",
    "score",
    "sweep",
    "transplant_metrics",
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
    "read_manifest",
    "supported_model_types",
    "transplant",
    "write_manifest",
    "write_report",
]
