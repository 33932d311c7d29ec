"""One error hierarchy: every error tl_transplant raises derives from :class:`TLTransplantError`.

An error of this hierarchy is a *user* error: bad input, a model or file that cannot be
used as asked, a request that cannot be carried out safely. Its message names the problem
and the fix, and the CLI prints it as one line. Anything else that escapes is a bug (the
CLI prints its traceback and asks for a report). Each error also keeps the built-in base
callers relied on before (``ValueError`` for bad values, ``RuntimeError`` for a model that
does not behave as its table says), so ``except ValueError`` code keeps working.

The errors of loading and pairing models, shared by the loaders (``models.pair``,
``models.gguf``), and the two generic ones of reading inputs and writing outputs
(:class:`InputError`, :class:`OutputError`) live here; the others live beside the code
that raises them. A third-party error that is a user error (an unreadable path, a corrupt
file, an invalid value) is converted to one of ours where it is raised, never matched by
name at the boundary.
"""

from __future__ import annotations


class TLTransplantError(Exception):
    """Base of every tl_transplant error: a user-facing message naming the problem and fix."""


class IncompatiblePairError(TLTransplantError, ValueError):
    """Source and target cannot be transplanted between (different family, shapes or vocab)."""


class ModelLoadError(TLTransplantError, ValueError):
    """A model or tokenizer could not be loaded as asked."""


class NonFiniteWeightsError(TLTransplantError, ValueError):
    """A model holds NaN or inf weights where a transplant would read them."""


class TaskError(TLTransplantError, ValueError):
    """A task that cannot be built or used as given (fields, files, metric, splits)."""


class EvaluationError(TLTransplantError, ValueError):
    """An evaluation that cannot run as asked (model, task, batch size, split)."""


class BudgetError(TLTransplantError, ValueError):
    """A parameter budget or fill rule that cannot be used (a fraction outside (0, 1], ...)."""


class ZooError(TLTransplantError, ValueError):
    """A zoo pair or task that does not exist, or a build that did not come out as meant."""


class InputError(TLTransplantError, ValueError):
    """An input (a file, a path, a value given on the command line) that cannot be used."""


class OutputError(TLTransplantError, OSError):
    """An output path that cannot be written (read-only, a file where a folder goes, ...)."""


def os_reason(e: OSError) -> str:
    """``Permission denied: /x/y`` from an OSError (its own text when it names no file)."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


__all__ = [
    "BudgetError",
    "EvaluationError",
    "IncompatiblePairError",
    "InputError",
    "ModelLoadError",
    "NonFiniteWeightsError",
    "OutputError",
    "TLTransplantError",
    "TaskError",
    "ZooError",
    "os_reason",
]
