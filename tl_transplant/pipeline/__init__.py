"""The whole job: the run config (``config``), the run (``runner``: ``run``) and its
stages (``stages``).

``tl_transplant.pipeline`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "RunResult": "runner",
    "load_task_splits": "runner",
    "run": "runner",
    "demo_config": "runner",
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
    "run_results": "stages",
    "score_runs": "stages",
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
    from tl_transplant.pipeline.runner import (
        RunResult as RunResult,
    )
    from tl_transplant.pipeline.runner import (
        demo_config as demo_config,
    )
    from tl_transplant.pipeline.runner import (
        load_task_splits as load_task_splits,
    )
    from tl_transplant.pipeline.runner import (
        run as run,
    )
    from tl_transplant.pipeline.stages import (
        RESULT_KEYS as RESULT_KEYS,
    )
    from tl_transplant.pipeline.stages import (
        run_results as run_results,
    )
    from tl_transplant.pipeline.stages import (
        score_runs as score_runs,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
