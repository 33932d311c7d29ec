"""Example metric ``top3_acc``: is the first answer token among the model's 3 likeliest?

Per example 1.0 if the first answer token has one of the three highest logits at the last
prompt position, else 0.0. A 0/1 score, so it is an accuracy: the statistics report TIR
for it and a sweep's retention rule reads it in accuracy points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from tl_transplant.tasks.metrics import Batch, LogitMetric, Rows, register_metric
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import first_answer_token, last_prompt_logits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@register_metric
class Top3Acc(LogitMetric):
    """1.0 where the first answer token is in the top 3 at the last prompt position."""

    name = "top3_acc"
    description = "first answer token among the 3 highest logits (0/1)"
    accuracy = True  # per example 0/1: TIR and relative retention apply
    k = 3

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        rows = super().rows(task, tokenizer, prepend_bos)  # [BOS] prompt answer, checked
        rows.need = rows.enc.prompt_len  # only the last prompt position is read
        rows.data["target"] = first_answer_token(rows.enc)
        return rows

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        last = last_prompt_logits(logits, batch.enc).float()
        top = last.topk(self.k, dim=-1).indices.cpu()
        target = batch.rows.data["target"][batch.idx]
        return (top == target[:, None]).any(-1).double()
