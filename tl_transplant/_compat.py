"""Old import paths (before the subpackages of 0.2) keep working for one release.

``import tl_transplant.edits`` (and ``from tl_transplant.layouts import ...``) gives the
module that now lives at its new path (:data:`MOVED`), with a ``DeprecationWarning``
naming it. Installed by ``tl_transplant/__init__.py``; nothing else is changed. Remove in
0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: Old module (under ``tl_transplant.``) -> its new home.
MOVED: dict[str, str] = {
    "units": "arch.units",
    "layouts": "arch",
    "pair": "models.pair",
    "gguf": "models.gguf",
    "hooks": "models.hooks",
    "decoding": "models.decoding",
    "real_models": "models.real",
    "edits": "edit.edits",
    "patching": "edit.patching",
    "budget": "edit.budget",
    "manifest": "edit.manifest",
    "weights": "edit.weights",
    "tokens": "tasks.tokens",
    "stats": "evaluation.stats",
    "retention": "evaluation.generic",
    "search": "sweeps.search",
    "selection": "sweeps.selection",
    "rows": "sweeps.rows",
    "sweep_figure": "sweeps.figure",
    "verdict": "sweeps.verdict",
    "checkpoint": "io.checkpoint",
    "out_of_core": "io.out_of_core",
    "export": "io.export",
    "viz": "report.views",
    "summary": "report.text",
    "config": "pipeline.config",
    "stages": "pipeline.stages",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``tl_transplant.<old>`` and hands back the module at its new path."""

    prefix = "tl_transplant."

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(self.prefix) and fullname[len(self.prefix):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = self.prefix + MOVED[spec.name[len(self.prefix):]]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path works until tl_transplant 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is already executed at its new path."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())


__all__ = ["MOVED", "install"]
