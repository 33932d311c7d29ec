"""Errors of loading and pairing models, shared by the loaders (``pair``, ``gguf``)."""

from __future__ import annotations


class IncompatiblePairError(ValueError):
    """Source and target cannot be transplanted between (different family, shapes or vocab)."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded as asked."""


class NonFiniteWeightsError(ValueError):
    """A model holds NaN or inf weights where a transplant would read them."""


__all__ = ["IncompatiblePairError", "ModelLoadError", "NonFiniteWeightsError"]
