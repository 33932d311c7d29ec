"""The whole job: the run config (``config``), the run (``runner``: ``run``), its stages
(``stages``) and what it returns (``result``: ``RunResult``).

``tl_transplant.pipeline`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "run": "runner",
    "demo_config": "runner",
    "RunResult": "result",
    "MethodScores": "result",
    "ConfigError": "config",
    "StrictInt": "config",
    "StrictFloat": "config",
    "StrictBool": "config",
    "RETENTION_MODES": "config",
    "DEVICE_FORMS": "config",
    "check_device": "config",
    "TaskConfig": "config",
    "MethodRun": "config",
    "SelectionConfig": "config",
    "DEFAULT_K": "config",
    "SweepConfig": "config",
    "RunConfig": "config",
    "load_config": "config",
    "RESULT_KEYS": "stages",
    "RunInputs": "stages",
    "Scored": "stages",
    "load_inputs": "stages",
    "load_task_splits": "stages",
    "score_runs": "stages",
    "score_methods": "stages",
    "sweep_on_dev": "stages",
    "write_sweep_files": "stages",
    "write_run_report": "stages",
    "apply_choice": "stages",
    "export_choice": "stages",
    "write_results": "stages",
    "run_results": "stages",
}

if TYPE_CHECKING:
    from tl_transplant.pipeline.config import (
        DEFAULT_K as DEFAULT_K,
    )
    from tl_transplant.pipeline.config import (
        DEVICE_FORMS as DEVICE_FORMS,
    )
    from tl_transplant.pipeline.config import (
        RETENTION_MODES as RETENTION_MODES,
    )
    from tl_transplant.pipeline.config import (
        ConfigError as ConfigError,
    )
    from tl_transplant.pipeline.config import (
        MethodRun as MethodRun,
    )
    from tl_transplant.pipeline.config import (
        RunConfig as RunConfig,
    )
    from tl_transplant.pipeline.config import (
        SelectionConfig as SelectionConfig,
    )
    from tl_transplant.pipeline.config import (
        StrictBool as StrictBool,
    )
    from tl_transplant.pipeline.config import (
        StrictFloat as StrictFloat,
    )
    from tl_transplant.pipeline.config import (
        StrictInt as StrictInt,
    )
    from tl_transplant.pipeline.config import (
        SweepConfig as SweepConfig,
    )
    from tl_transplant.pipeline.config import (
        TaskConfig as TaskConfig,
    )
    from tl_transplant.pipeline.config import (
        check_device as check_device,
    )
    from tl_transplant.pipeline.config import (
        load_config as load_config,
    )
    from tl_transplant.pipeline.result import (
        MethodScores as MethodScores,
    )
    from tl_transplant.pipeline.result import (
        RunResult as RunResult,
    )
    from tl_transplant.pipeline.runner import (
        demo_config as demo_config,
    )
    from tl_transplant.pipeline.runner import (
        run as run,
    )
    from tl_transplant.pipeline.stages import (
        RESULT_KEYS as RESULT_KEYS,
    )
    from tl_transplant.pipeline.stages import (
        RunInputs as RunInputs,
    )
    from tl_transplant.pipeline.stages import (
        Scored as Scored,
    )
    from tl_transplant.pipeline.stages import (
        apply_choice as apply_choice,
    )
    from tl_transplant.pipeline.stages import (
        export_choice as export_choice,
    )
    from tl_transplant.pipeline.stages import (
        load_inputs as load_inputs,
    )
    from tl_transplant.pipeline.stages import (
        load_task_splits as load_task_splits,
    )
    from tl_transplant.pipeline.stages import (
        run_results as run_results,
    )
    from tl_transplant.pipeline.stages import (
        score_methods as score_methods,
    )
    from tl_transplant.pipeline.stages import (
        score_runs as score_runs,
    )
    from tl_transplant.pipeline.stages import (
        sweep_on_dev as sweep_on_dev,
    )
    from tl_transplant.pipeline.stages import (
        write_results as write_results,
    )
    from tl_transplant.pipeline.stages import (
        write_run_report as write_run_report,
    )
    from tl_transplant.pipeline.stages import (
        write_sweep_files as write_sweep_files,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
