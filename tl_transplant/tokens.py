"""Tokenization shared by scoring and evaluation, identical for both models.

Prompts and answers are tokenized *separately* without special tokens and
concatenated, with BOS prepended iff ``prepend_bos`` resolves to True:

* ``"auto"``: what the hooked model does for this architecture
  (``bridge.cfg.default_prepend_bos``: True for GPT-2/Llama/Gemma/Phi-3, False
  for GPT-NeoX/Qwen2/Phi);
* ``True`` / ``False``: forced.

Both sides of a pair share a family and a vocabulary, so one encoding serves
both. Batches are right-padded: under a causal mask real tokens never attend
to the padding after them, so no attention mask is needed and positions stay
0..n-1 (exact for rotary and learned position embeddings alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

PrependBos = bool | Literal["auto"]


def resolve_prepend_bos(side_or_pair: Any, setting: PrependBos | str | None = "auto") -> bool:
    """Resolve ``"auto"``/``True``/``False`` (also ``"true"``/``"false"``) to a bool."""
    if isinstance(setting, str):
        low = setting.strip().lower()
        if low in ("auto", ""):
            setting = "auto"
        elif low in ("true", "1", "yes"):
            setting = True
        elif low in ("false", "0", "no"):
            setting = False
        else:
            raise ValueError(f"prepend_bos must be 'auto', true or false, got {setting!r}")
    if setting is None or setting == "auto":
        side = getattr(side_or_pair, "target", side_or_pair)
        return bool(side.prepend_bos)
    return bool(setting)


@dataclass
class Encoded:
    """A right-padded batch of ``[BOS] prompt answer`` token ids.

    ``prompt_len[b]`` counts BOS and prompt tokens, so the last prompt position
    is ``prompt_len - 1`` and answer token ``j`` is predicted at
    ``prompt_len - 1 + j``.
    """

    input_ids: Int[torch.Tensor, "batch seq"]
    prompt_len: Int[torch.Tensor, " batch"]
    answer_len: Int[torch.Tensor, " batch"]
    pad_id: int

    @property
    def last_prompt_pos(self) -> Int[torch.Tensor, " batch"]:
        return self.prompt_len - 1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: Any) -> Encoded:
        return Encoded(
            self.input_ids.to(device),
            self.prompt_len.to(device),
            self.answer_len.to(device),
            self.pad_id,
        )

    def answer_mask(self) -> Float[torch.Tensor, "batch seq"]:
        """1.0 at positions that predict an answer token (the positions whose logits score it)."""
        seq = self.input_ids.shape[1]
        pos = torch.arange(seq, device=self.input_ids.device)[None, :]
        start = (self.prompt_len - 1)[:, None]
        end = start + self.answer_len[:, None]
        return ((pos >= start) & (pos < end)).float()


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    prepend_bos: bool,
) -> Encoded:
    """Tokenize prompts (and answers, teacher-forced after them) into a right-padded batch."""
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError(
            "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False"
        )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[list[int]] = []
    plen: list[int] = []
    alen: list[int] = []
    for i, p in enumerate(prompts):
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        if prepend_bos:
            ids = [bos, *ids]
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization: {p!r}")
        a_ids = (
            []
            if answers is None
            else list(tokenizer(answers[i], add_special_tokens=False)["input_ids"])
        )
        rows.append(ids + a_ids)
        plen.append(len(ids))
        alen.append(len(a_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Encoded(input_ids, torch.tensor(plen), torch.tensor(alen), int(pad))


def answer_logprobs(
    logits: Float[torch.Tensor, "batch seq vocab"], enc: Encoded
) -> Float[torch.Tensor, " batch"]:
    """Sum over answer tokens of log p(answer token | prefix): differentiable, per example."""
    # At least float32 (bf16/fp16 logits are upcast; float64 ones stay float64).
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    seq = enc.input_ids.shape[1]
    # Position t predicts token t+1; gather the next token at each position.
    nxt = torch.cat([enc.input_ids[:, 1:], enc.input_ids[:, :1]], dim=1).to(logits.device)
    tok_lp = logp.gather(-1, nxt[..., None]).squeeze(-1)
    mask = enc.answer_mask().to(logits.device)[:, :seq]
    return (tok_lp * mask).sum(-1)


def last_prompt_logits(
    logits: Float[torch.Tensor, "batch seq vocab"], enc: Encoded
) -> Float[torch.Tensor, "batch vocab"]:
    """Logits at each example's last prompt position (what predicts the first answer token)."""
    idx = enc.last_prompt_pos.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


def first_answer_token(enc: Encoded) -> Int[torch.Tensor, " batch"]:
    """The first answer token id of each example (requires answers)."""
    if bool((enc.answer_len == 0).any()):
        raise ValueError("some examples have an empty answer after tokenization")
    return enc.input_ids[torch.arange(len(enc)), enc.prompt_len]
