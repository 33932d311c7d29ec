"""tl_transplant: find the units that carry a task in a source LM and transplant them.

Public API (the CLI and notebooks use exactly these)::

    from tl_transplant import ModelPair, score, sweep, transplant, apply_transplant, export_hf
    from tl_transplant import run   # the whole pipeline from a config
    from tl_transplant import save_sweep, write_report   # a sweep's files and its report.html

Every error tl_transplant raises derives from :class:`TLTransplantError` (a user error:
bad input, a file or model that cannot be used as asked).
"""

from tl_transplant.arch.registry import supported_model_types
from tl_transplant.arch.schema import LayoutMismatchError, UnsupportedArchitectureError
from tl_transplant.arch.units import (
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitError,
    parse_unit,
    parse_units,
)
from tl_transplant.edit.budget import block_params, fill_budget
from tl_transplant.edit.edits import (
    TransplantError,
    apply_transplant,
    plan_transplant,
    transplant,
)
from tl_transplant.edit.manifest import Manifest, read_manifest, write_manifest
from tl_transplant.edit.patching import PatchError, patch_activations
from tl_transplant.errors import (
    IncompatiblePairError,
    InputError,
    ModelLoadError,
    NonFiniteWeightsError,
    OutputError,
    TLTransplantError,
)
from tl_transplant.evaluation.evaluator import evaluate, evaluate_transplant, transplant_metrics
from tl_transplant.evaluation.generic import generic_retention
from tl_transplant.io.export import ExportError, export_hf
from tl_transplant.models.pair import ModelPair
from tl_transplant.models.side import ModelSide
from tl_transplant.pipeline.config import ConfigError, load_config
from tl_transplant.pipeline.runner import RunResult, run
from tl_transplant.report.html import save_sweep, write_report
from tl_transplant.scoring import Scores, available_methods, score
from tl_transplant.sweeps.protocol import SweepResult, sweep
from tl_transplant.sweeps.records import Results
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.task import Task

__version__ = "0.1.0"

__all__ = [
    "TLTransplantError",
    "InputError",
    "OutputError",
    "Results",
    "save_sweep",
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

from tl_transplant import _compat  # noqa: E402 - the pre-0.2 flat module paths

_compat.install()
