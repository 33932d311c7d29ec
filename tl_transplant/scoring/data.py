"""What a scorer run sees: its data (:class:`ScoringData`) and its :class:`Context`.

Streaming: prompts are tokenized batch by batch (the shared rule of
:mod:`tl_transplant.tasks.tokens`) by :meth:`Context.batches`, and hooks are installed
once per bridge for the whole stream by :meth:`Context.hooks`, so peak memory
depends on the batch size and model, not on the number of prompts.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from tl_transplant.models.hooks import HookRunner
from tl_transplant.scoring.registry import ScoringError
from tl_transplant.tasks.metrics import default_differentiable
from tl_transplant.tasks.tokens import Encoded, encode

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair

#: Logger of scoring runs (cost estimates of long runs are INFO records).
log = logging.getLogger("tl_transplant.scoring")

#: ``f(logits, encoded batch) -> per-example metric``, differentiable in the logits.
MetricFn = Callable[
    [Float[torch.Tensor, "batch seq vocab"], Encoded], Float[torch.Tensor, " batch"]
]


@dataclass
class ScoringData:
    """Prompts (and answers, if any) with the resolved BOS rule."""

    name: str
    prompts: list[str]
    answers: list[str] | None
    prepend_bos: bool

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Context:
    """Everything a scorer run needs besides its units, data and options.

    ``seed`` is the run's seed, given to every scorer: random ones draw from it
    (``torch.Generator().manual_seed(ctx.seed)``), the others ignore it.
    """

    pair: ModelPair
    batch_size: int
    progress: bool
    metric: MetricFn | None = None
    seed: int = 0

    @property
    def layout(self) -> ModelLayout:
        return self.pair.layout

    def batches(
        self, data: ScoringData, *, answers: bool, desc: str
    ) -> Iterator[tuple[Encoded, int]]:
        """Yield ``(encoded batch, start index)``, tokenized lazily, with a progress bar."""
        if answers and data.answers is None:
            raise ScoringError(f"{desc} needs answers; pass a Task rather than plain prompts")
        n = len(data)
        tok = self.pair.target.tokenizer
        bar = tqdm(total=n, desc=f"{desc} [{data.name}]", unit="prompt",
                   disable=not self.progress, leave=False)
        try:
            for i in range(0, n, self.batch_size):
                j = min(n, i + self.batch_size)
                ans = data.answers[i:j] if answers and data.answers is not None else None
                yield encode(tok, data.prompts[i:j], ans, prepend_bos=data.prepend_bos), i
                bar.update(j - i)
        finally:
            bar.close()

    def hooks(self, names: Iterable[str]) -> HookRunner:
        """A :class:`~tl_transplant.models.hooks.HookRunner` on both models for these hook names."""
        return HookRunner(self.pair, names, error=ScoringError)

    def note(self, message: str) -> None:
        """Tell the user something about the run (e.g. its expected cost): an INFO log record,
        and a line on stderr (through tqdm, so bars stay intact) when ``progress`` is on."""
        log.info(message)
        if self.progress:
            tqdm.write(message, file=sys.stderr)

    def metric_fn(self) -> MetricFn:
        """The differentiable per-example task metric (default: the metric registry's
        default differentiable form, the answer log-prob)."""
        return self.metric or default_differentiable()


__all__ = ["Context", "MetricFn", "ScoringData"]
