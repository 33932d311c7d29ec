"""How evaluation runs a model: resolve what :func:`~tl_transplant.evaluation.evaluator.evaluate`
was given (a side, a pair and a side name, or any callable LM) to a :class:`Runner` (a logits
forward, a generator, a tokenizer, the BOS default and the device), and enter interventions
(once, or per batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import torch
from jaxtyping import Int

from tl_transplant.errors import EvaluationError

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedTokenizerBase

    from tl_transplant.models.pair import ModelPair, ModelSide

#: What :func:`evaluate` runs: a side, a pair (with ``side=``) or any callable LM
#: (HF causal LM, TransformerBridge) mapping input ids to logits or an output with ``.logits``.
EvalModel: TypeAlias = "ModelSide | ModelPair | Callable[[torch.Tensor], Any]"
#: A context manager entered once, or a factory ``f(input_ids)`` entered per batch.
Intervention: TypeAlias = (
    "contextlib.AbstractContextManager[object] "
    "| Callable[[Int[torch.Tensor, 'batch seq']], contextlib.AbstractContextManager[object]]"
)


@dataclass
class Runner:
    """How to run one model: a logits forward, a generator and a tokenizer."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    generator: GenerationMixin | None
    tokenizer: PreTrainedTokenizerBase
    default_bos: bool
    device: torch.device

    def logits(
        self, ids: Int[torch.Tensor, "b seq"], intervention: Intervention | None = None
    ) -> torch.Tensor:
        """The forward on ``ids`` (moved to the device), inside the per-batch intervention."""
        ids = ids.to(self.device)
        with per_batch(intervention, ids):
            return self.forward(ids)


def device_of(module: Any) -> torch.device:
    """Where a model runs (duck-typed: ``.cfg.device``, else its first parameter's device)."""
    cfg = getattr(module, "cfg", None)
    dev = getattr(cfg, "device", None)
    if dev is not None:
        return torch.device(dev)
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def resolve_model(
    what: EvalModel, side: str | None, tokenizer: PreTrainedTokenizerBase | None, forward: str
) -> Runner:
    """The :class:`Runner` of a side, a pair's ``side``, or a bare callable model
    (``forward``: ``"bridge"`` or ``"hf"`` for sides)."""
    model: Any = what  # duck-typed: pairs and sides are recognised by their attributes
    if hasattr(model, "source") and hasattr(model, "target") and hasattr(model, "layout"):
        if side not in ("source", "target"):
            raise EvaluationError(
                "evaluate() got a ModelPair; pass side='source' or side='target' (or the side "
                "itself, e.g. pair.target)"
            )
        model = getattr(model, side)
    if hasattr(model, "bridge") and hasattr(model, "hf") and hasattr(model, "tokenizer"):
        if forward not in ("bridge", "hf"):
            raise EvaluationError(f"forward must be 'bridge' or 'hf', got {forward!r}")
        mod = model.bridge if forward == "bridge" else model.hf
        return Runner(
            name=str(model.name),
            forward=lambda ids: _logits_of(mod(ids)),
            generator=model.hf,
            tokenizer=tokenizer or model.tokenizer,
            default_bos=bool(model.prepend_bos),
            device=device_of(mod),
        )
    if not callable(model):
        raise TypeError(
            "evaluate() takes a ModelSide, a ModelPair with side=..., or a callable model "
            f"(HF causal LM, TransformerBridge, HookedTransformer); got {type(model).__name__}"
        )
    tok = tokenizer or getattr(model, "tokenizer", None)
    if tok is None:
        raise EvaluationError("evaluate() needs tokenizer=... for a bare model")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "default_prepend_bos"):
        default_bos = bool(cfg.default_prepend_bos)
    else:  # what the tokenizer does by itself
        bos = tok.bos_token_id
        ids = tok("a")["input_ids"]
        default_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    gen = model if hasattr(model, "generate") and hasattr(model, "generation_config") else None
    if gen is None and hasattr(model, "original_model"):  # TransformerBridge
        gen = model.original_model
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return Runner(
        name=str(name),
        forward=lambda ids: _logits_of(model(ids)),
        generator=gen,
        tokenizer=tok,
        default_bos=default_bos,
        device=device_of(model),
    )


@contextlib.contextmanager
def maybe_enter(intervention: Intervention | None) -> Iterator[None]:
    if intervention is not None and hasattr(intervention, "__enter__"):
        with cast(contextlib.AbstractContextManager[object], intervention):
            yield
    else:
        yield


def per_batch(
    intervention: Intervention | None, ids: Int[torch.Tensor, "batch seq"]
) -> contextlib.AbstractContextManager[object]:
    """A per-batch context: ``intervention(input_ids)`` if it is a factory, else a no-op."""
    if intervention is not None and not hasattr(intervention, "__enter__"):
        cm = intervention(ids)
        if not hasattr(cm, "__enter__"):
            raise TypeError("intervention(input_ids) must return a context manager")
        return cm
    return contextlib.nullcontext()


__all__ = ["EvalModel", "Intervention", "Runner", "device_of", "maybe_enter", "per_batch",
           "resolve_model"]
