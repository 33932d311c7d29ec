"""A source/target pair of causal LMs of one architecture, as TransformerLens bridges.

:class:`ModelPair` holds two :class:`~tl_transplant.models.side.ModelSide`\\ s (each loaded
by the policy in :mod:`tl_transplant.models.loading`) and the transplants applied to the
target; :func:`check_compatible` is what two models must share to be a pair (family,
unit tensors and their shapes, tokenizer vocabulary).

``ModelSide``, ``ModelSpec`` and ``gather_slices`` lived here before; they are re-exported
so ``from tl_transplant.models.pair import ModelPair, ModelSide`` keeps working.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from tl_transplant.arch.model_layout import ModelLayout
from tl_transplant.arch.units import Unit
from tl_transplant.errors import IncompatiblePairError
from tl_transplant.models.loading import ModelSpec
from tl_transplant.models.side import ModelSide, gather_slices

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# ---- compatibility ---------------------------------------------------------------


def check_compatible(source: ModelSide, target: ModelSide, *, check_tokenizer: bool = True) -> None:
    """Raise :class:`IncompatiblePairError` naming the first thing that differs."""
    fs, ft = source.layout.family.family, target.layout.family.family
    if fs != ft:
        raise IncompatiblePairError(
            f"source is a {source.layout.model_type} ({fs} family) but target is a "
            f"{target.layout.model_type} ({ft} family); transplants need the same architecture."
        )
    for n in target.layout.unit_tensors():
        if n not in source.params:
            raise IncompatiblePairError(f"source has no tensor {n!r}, which the target has")
        ss, st = tuple(source.params[n].shape), tuple(target.params[n].shape)
        if ss != st:
            raise IncompatiblePairError(
                f"tensor {n!r} has shape {ss} in source but {st} in target; the models must "
                "share layer count, head counts and widths."
            )
    extra = set(source.layout.unit_tensors()) - set(target.layout.unit_tensors())
    if extra:
        raise IncompatiblePairError(
            f"source has tensor {sorted(extra)[0]!r}, which the target lacks"
        )
    if check_tokenizer:
        vs, vt = source.tokenizer.get_vocab(), target.tokenizer.get_vocab()
        if vs != vt:
            inv_s = {i: t for t, i in vs.items()}
            inv_t = {i: t for t, i in vt.items()}
            diff = sorted(i for i in set(inv_s) | set(inv_t) if inv_s.get(i) != inv_t.get(i))
            shown = ", ".join(f"id {i}: {inv_s.get(i)!r} vs {inv_t.get(i)!r}" for i in diff[:5])
            raise IncompatiblePairError(
                f"tokenizers differ at {len(diff)} token id(s) (source vs target: {shown}). "
                "Prompts would mean different things to the two models; pass "
                "check_tokenizer=False (--no-check-tokenizer on the command line) only if you "
                "know the ids line up."
            )


class ModelPair:
    """A source (stronger) and target (weaker) model of the same architecture.

    >>> pair = ModelPair.load("path/to/source", "path/to/target")   # doctest: +SKIP
    >>> pair.units("head")[:2]                                        # doctest: +SKIP
    [Head('L0.H0'), Head('L0.H1')]
    """

    def __init__(
        self, source: ModelSide, target: ModelSide, *, check_tokenizer: bool = True
    ) -> None:
        check_compatible(source, target, check_tokenizer=check_tokenizer)
        self.source = source
        self.target = target
        self.applied: list[Any] = []  # manifests of permanent transplants, in order
        self.active: list[Any] = []  # transplant contexts currently applied (reversible)

    @classmethod
    def load(
        cls,
        source: ModelSpec,
        target: ModelSpec,
        *,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        source_tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
        target_tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
        check_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_safetensors: bool | None = True,
        check_finite: bool = True,
        allow_pickle: bool = False,
    ) -> ModelPair:
        """Load both models and check they can be transplanted between.

        ``source``/``target``: a hub id, a local HF directory, an in-memory
        ``PreTrainedModel`` (with ``*_tokenizer``) or a ``(model, tokenizer)`` tuple.
        ``device_map`` is handed to HF/accelerate for models too big for one device.
        A local directory with only PyTorch pickles (``pytorch_model*.bin``) is refused
        unless ``allow_pickle=True`` (unpickling can run code), as in ``apply``.
        """
        common = dict(
            device=None if device_map is not None else device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors,
            check_finite=check_finite,
            allow_pickle=allow_pickle,
        )
        src = ModelSide.load(source, tokenizer=source_tokenizer, role="source", **common)
        tgt = ModelSide.load(target, tokenizer=target_tokenizer, role="target", **common)
        return cls(src, tgt, check_tokenizer=check_tokenizer)

    # ---- conveniences -------------------------------------------------------------
    @property
    def layout(self) -> ModelLayout:
        return self.target.layout

    def units(self, kind: str | Iterable[str] | None = None) -> list[Unit]:
        """All units of the given kind(s): ``"head"``, ``"kv_head"``, ``"neuron"``, ``"linear"``."""
        return self.layout.units(kind)

    def validate(self, unit: Unit | str) -> Unit:
        return self.layout.validate(unit)

    def n_params(self, unit: Unit | str) -> int:
        return self.layout.n_params(unit)

    def sides(self) -> Iterator[ModelSide]:
        yield self.source
        yield self.target

    def __repr__(self) -> str:
        return (
            f"ModelPair(source={self.source.name!r}, target={self.target.name!r}, "
            f"family={self.layout.family.family})"
        )


__all__ = ["ModelPair", "ModelSide", "ModelSpec", "check_compatible", "gather_slices", "log"]
