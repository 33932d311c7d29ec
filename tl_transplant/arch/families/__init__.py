"""The built-in architecture tables: one file per family.

Each module here whose name does not start with ``_`` defines ``FAMILY``, one
:class:`~tl_transplant.arch.schema.FamilyLayout`. :data:`FAMILIES` collects them (in
file-name order) and :mod:`tl_transplant.arch.registry` registers them at import, so
shipping a new architecture is one new file here, nothing else (see
``docs/adding_an_architecture.md``). Families that store their weights alike share
builders: ``llama.LLAMA_LAYOUT`` (used by ``olmo2``) and the pieces and tiny dims in
``_common``.
"""

from __future__ import annotations

import importlib
import pkgutil

from tl_transplant.arch.schema import FamilyLayout, LayoutMismatchError


def collect_families(package: str) -> tuple[FamilyLayout, ...]:
    """``FAMILY`` of every module of ``package`` whose name does not start with ``_``, in
    module-name order (a module without one is an error, not skipped)."""
    pkg = importlib.import_module(package)
    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, FamilyLayout):
            raise LayoutMismatchError(
                f"{module.__name__} defines no FAMILY = FamilyLayout(...); every module in "
                f"{package} is one family table (shared helpers go in a module whose name "
                "starts with '_')"
            )
        out.append(fam)
    return tuple(out)


#: The built-in families. Add one as a new module here (or at runtime with
#: :func:`tl_transplant.arch.registry.register_family`).
FAMILIES: tuple[FamilyLayout, ...] = collect_families(__name__)

__all__ = ["FAMILIES", "collect_families"]
