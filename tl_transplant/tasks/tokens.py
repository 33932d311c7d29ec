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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
from jaxtyping import Float, Int

from tl_transplant.errors import TaskError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

PrependBos = bool | Literal["auto"]


def resolve_prepend_bos(
    side_or_pair: ModelSide | ModelPair | None,
    setting: PrependBos | str | None = "auto",
) -> bool:
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
            raise TaskError(f"prepend_bos must be 'auto', true or false, got {setting!r}")
    if setting is None or setting == "auto":
        side = cast("ModelSide", getattr(side_or_pair, "target", side_or_pair))
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

    def to(self, device: torch.device | str) -> Encoded:
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
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    prepend_bos: bool,
) -> Encoded:
    """Tokenize prompts (and answers, teacher-forced after them) into a right-padded batch."""
    if answers is not None and len(answers) != len(prompts):
        raise TaskError(f"{len(prompts)} prompts but {len(answers)} answers")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise TaskError(
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
            raise TaskError(f"prompt {i} is empty after tokenization: {p!r}")
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
    """Sum over answer tokens of log p(answer token | prefix): differentiable, per example.

    Only the positions that predict an answer token are upcast and normalised (at least
    float32: bf16/fp16 logits are upcast, float64 stay float64), so the metric adds
    ``answer tokens x vocab`` floats to the batch's logits, not another ``batch x seq x
    vocab`` tensor.
    """
    seq = min(int(enc.input_ids.shape[1]), int(logits.shape[1]))
    ids = enc.input_ids[:, :seq].to(logits.device)
    # Position t predicts token t+1.
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    mask = enc.answer_mask().to(logits.device)[:, :seq] > 0
    rows, pos = mask.nonzero(as_tuple=True)
    picked = logits[rows, pos].to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(picked, dim=-1)
    tok_lp = logp.gather(-1, nxt[rows, pos][:, None]).squeeze(-1)
    out = torch.zeros(logits.shape[0], dtype=tok_lp.dtype, device=logits.device)
    return out.index_add(0, rows, tok_lp)


def last_prompt_logits(
    logits: Float[torch.Tensor, "batch seq vocab"], enc: Encoded
) -> Float[torch.Tensor, "batch vocab"]:
    """Logits at each example's last prompt position (what predicts the first answer token)."""
    idx = enc.last_prompt_pos.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


def first_answer_token(enc: Encoded) -> Int[torch.Tensor, " batch"]:
    """The first answer token id of each example (requires answers)."""
    if bool((enc.answer_len == 0).any()):
        raise TaskError("some examples have an empty answer after tokenization")
    return enc.input_ids[torch.arange(len(enc)), enc.prompt_len]


# ---- the batch loop ------------------------------------------------------------------


def run_batches(
    logits_fn: Callable[[Int[torch.Tensor, "b seq"]], Float[torch.Tensor, "b seq vocab"]],
    enc: Encoded,
    need: Int[torch.Tensor, " rows"],
    batch_size: int,
    score: Callable[
        [Float[torch.Tensor, "b seq vocab"], Int[torch.Tensor, " b"], Encoded],
        Float[torch.Tensor, " b"],
    ],
    done: Callable[[int], object] | None = None,
) -> Float[torch.Tensor, " rows"]:
    """One float64 per row of ``enc``: ``score(logits, rows, their Encoded)`` per batch.

    Rows run longest ``need`` first (ties by index), ``batch_size`` at a time, each batch
    cut to its longest ``need`` (right padding after a row never changes its logits, see
    the module docstring). Only the scores are kept: each batch's logits are dropped before
    the next forward. ``done(n)`` is called after each batch of ``n`` rows (progress).
    """
    order = sorted(range(len(enc)), key=lambda r: (-int(need[r]), r))
    out = torch.zeros(len(enc), dtype=torch.float64)
    size = max(1, int(batch_size))
    for lo in range(0, len(order), size):
        idx = torch.tensor(order[lo : lo + size], dtype=torch.long)
        width = int(need[idx].max())
        sub = Encoded(enc.input_ids[idx, :width], enc.prompt_len[idx], enc.answer_len[idx],
                      enc.pad_id)
        logits = logits_fn(sub.input_ids)
        out[idx] = score(logits, idx, sub)
        del logits
        if done is not None:
            done(len(idx))
    return out


# ---- context length -------------------------------------------------------------------

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def context_limit(hf_config: PretrainedConfig | dict | None) -> int | None:
    """The model's context length from its HF config (``max_position_embeddings``,
    ``n_positions``, ...), or None when it declares none (treated as unlimited)."""
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for key in _CONTEXT_KEYS:
            v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def check_context(
    enc: Encoded,
    limit: int | None,
    task_name: str,
    label: Callable[[int], str] | None = None,
    extra: int = 0,
    rows: Sequence[int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the first example longer than the model's context.

    A row needs ``prompt_len + answer_len + extra`` positions (``extra``: tokens still
    to generate). ``label(i)`` names example ``i`` (default ``"example i"``); ``rows``
    maps encoded rows to example indices (for :class:`ChoiceBatch`, ``.example``).
    ``limit=None`` means unlimited.
    """
    if limit is None:
        return
    need = enc.prompt_len + enc.answer_len + int(extra)
    over = (need > int(limit)).nonzero().flatten().tolist()
    if not over:
        return
    r = int(over[0])
    i = int(rows[r]) if rows is not None else r
    where = label(i) if label is not None else f"example {i}"
    parts = f"{int(enc.prompt_len[r])} prompt + {int(enc.answer_len[r])} answer"
    if extra:
        parts += f" + {int(extra)} to generate"
    n_bad = len({int(rows[x]) for x in over} if rows is not None else over)
    raise TaskError(
        f"task {task_name!r}: {where} needs {int(need[r])} tokens ({parts}), more than the "
        f"model's context of {int(limit)}; {n_bad} example(s) are too long: shorten or drop "
        "them (or lower max_new_tokens)"
    )


# ---- multiple choice (mc_logprob) ----------------------------------------------------


@dataclass
class ChoiceBatch:
    """One ``[BOS] prompt choice`` row per (example, choice), for ``mc_logprob``.

    ``enc`` is encoded exactly like an ``answer_logprob`` task whose answers are the
    choices (each tokenized on its own, after the prompt); ``example[r]`` and
    ``choice[r]`` say which example and which of its choices row ``r`` is.
    """

    enc: Encoded
    example: Int[torch.Tensor, " rows"]
    choice: Int[torch.Tensor, " rows"]
    n_examples: int


def encode_choices(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    prepend_bos: bool,
) -> ChoiceBatch:
    """Flatten (prompt, choice) pairs into rows encoded by :func:`encode`."""
    if len(choices) != len(prompts):
        raise TaskError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    flat_p: list[str] = []
    flat_c: list[str] = []
    ex: list[int] = []
    ch: list[int] = []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        if not cs:
            raise TaskError(f"example {i} has no choices")
        for j, c in enumerate(cs):
            flat_p.append(p)
            flat_c.append(c)
            ex.append(i)
            ch.append(j)
    enc = encode(tokenizer, flat_p, flat_c, prepend_bos=prepend_bos)
    if bool((enc.answer_len == 0).any()):
        r = int((enc.answer_len == 0).nonzero()[0])
        raise TaskError(f"example {ex[r]}: choice {ch[r]} is empty after tokenization")
    return ChoiceBatch(enc, torch.tensor(ex), torch.tensor(ch), len(prompts))


def choice_logprobs(
    logits_fn: Callable[[Int[torch.Tensor, "batch seq"]], Float[torch.Tensor, "batch seq vocab"]],
    batch: ChoiceBatch,
    batch_size: int = 16,
) -> Float[torch.Tensor, " rows"]:
    """Total teacher-forced log-prob of each row's choice (:func:`answer_logprobs`), float64.

    ``logits_fn(input_ids)`` is the model's forward (wrap any per-batch intervention
    in it); rows are run by :func:`run_batches`, so padding never changes a result.
    """
    enc = batch.enc
    return run_batches(
        logits_fn, enc, enc.prompt_len + enc.answer_len, batch_size,
        lambda logits, idx, sub: answer_logprobs(logits, sub.to(logits.device)).double().cpu(),
    )


def mc_scores(
    row_logprobs: Float[torch.Tensor, " rows"], batch: ChoiceBatch, correct: Sequence[int]
) -> Float[torch.Tensor, " batch"]:
    """Per example 1.0 if its correct choice has the strictly highest total log-prob, else 0.0.

    Ties (e.g. a model indifferent between choices) score 0, so a constant model gets
    no credit for whichever choice happens to come first.
    """
    if len(correct) != batch.n_examples:
        raise TaskError(f"{batch.n_examples} examples but {len(correct)} correct indices")
    lp = row_logprobs.detach().double().cpu()
    out = torch.zeros(batch.n_examples, dtype=torch.float64)
    for i in range(batch.n_examples):
        rows = (batch.example == i).nonzero().flatten()
        vals = lp[rows]
        right = vals[batch.choice[rows] == int(correct[i])]
        if len(right) != 1:
            raise TaskError(f"example {i}: correct index {correct[i]} is not one of its choices")
        others = vals[batch.choice[rows] != int(correct[i])]
        out[i] = float(bool((right[0] > others).all()))
    return out
