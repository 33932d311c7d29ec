"""The one error type of the lm-evaluation-harness adapter, and the import guard."""

from __future__ import annotations

from types import ModuleType

from tl_transplant.errors import TaskError

#: What to install for this subpackage (the optional extra of tl_transplant).
INSTALL_HINT = 'pip install "tl_transplant[lm_eval]"'


class HarnessError(TaskError):
    """An lm-eval task or evaluation request that cannot be honoured as asked.

    A :class:`~tl_transplant.errors.TaskError` (so a ``ValueError``): callers that already
    catch bad tasks or configuration catch it too.
    """


def require_lm_eval() -> ModuleType:
    """Import ``lm_eval`` (with its HF backend), or raise :class:`HarnessError` saying what to
    install. Everything that touches lm-eval calls this first, so ``import
    tl_transplant.harness`` itself works without the extra."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise HarnessError(
            f"lm-evaluation-harness is not installed or incomplete ({e}); {INSTALL_HINT}"
        ) from e
    return lm_eval


__all__ = ["INSTALL_HINT", "HarnessError", "require_lm_eval"]
