"""One error hierarchy: every error tl_transplant raises derives from :class:`TLTransplantError`.

An error of this hierarchy is a *user* error: bad input, a model or file that cannot be
used as asked, a request that cannot be carried out safely. Its message names the problem
and the fix, and the CLI prints it as one line. Anything else that escapes is a bug (the
CLI prints its traceback and asks for a report). Each error also keeps the built-in base
callers relied on before (``ValueError`` for bad values, ``RuntimeError`` for a model that
does not behave as its table says), so ``except ValueError`` code keeps working.

The errors of loading and pairing models, shared by the loaders (``models.pair``,
``models.gguf``), live here too; the others live beside the code that raises them.
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


__all__ = [
    "TLTransplantError","IncompatiblePairError", "ModelLoadError", "NonFiniteWeightsError"]
