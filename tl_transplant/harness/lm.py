"""An lm-eval ``LM`` over a tl_transplant model side: lm-eval's requests, our forwards.

:class:`TLLM` answers lm-eval's ``loglikelihood`` and ``generate_until`` requests with a
:class:`~tl_transplant.models.pair.ModelSide` (usually ``pair.target`` with a transplant applied in
place), so lm-eval's prompts, stop sequences, filters and metrics score our model:

* tokenization is HFLM's (``tok_encode``: the tokenizer's own special tokens unless
  ``add_bos_token`` says otherwise; a context and continuation are tokenized together and
  split, lm-eval's ``TemplateLM._encode_pair``);
* log-likelihoods: batched right-padded forwards, log-softmax in the logits' dtype, HFLM's
  left truncation to ``max_length + 1`` tokens; requests whose inputs are identical (e.g.
  one-token choices after one context) share one forward row, as HFLM's cache does (on a
  4-choice task with one-token answers that is 4x fewer rows). The rows run through the
  TransformerLens bridge, so hooks (e.g. :func:`~tl_transplant.edit.patching.patch_activations`)
  take effect; ``forward="auto"`` uses the unwrapped HF modules
  (:func:`tl_transplant.models.decoding.plain_model`, the same tensors) while no hook is active;
* generation: greedy, left-padded batches, ``max_gen_toks`` new tokens, lm-eval's stop-string
  criteria, decoded without special tokens and cut at the first stop string
  (``postprocess_generated_text``); decoded with a KV cache through the unwrapped HF modules
  (:mod:`tl_transplant.models.decoding`: the same tensors the transplant edits), uncached
  through the bridge while a hook is active. Sampling (``do_sample: true``) is refused.

HFLM itself inherits the checkpoint's ``generation_config`` (e.g. a repetition penalty);
this decodes plainly greedily, as :func:`tl_transplant.evaluation.evaluator.evaluate` does.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Int

from tl_transplant.harness.errors import HarnessError, require_lm_eval

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.models.pair import ModelSide

require_lm_eval()
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

#: What answers log-likelihood requests (see :class:`TLLM`).
FORWARDS = ("auto", "bridge", "hf")
#: HFLM's default ``max_gen_toks`` when a task sets none.
DEFAULT_MAX_GEN_TOKS = 256


def adds_bos(tokenizer: PreTrainedTokenizerBase, add_bos_token: bool | None = None) -> bool:
    """Whether lm-eval's HF tokenization (``add_bos_token`` as HFLM's) starts with BOS."""
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("a", **_add_special_kwargs(None, add_bos_token))
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


class TLLM(TemplateLM):  # lm_eval is untyped: TemplateLM is Any to mypy
    """lm-eval's ``LM`` interface over a :class:`~tl_transplant.models.pair.ModelSide`.

    ``forward``: ``"bridge"`` (default; hooks see every forward), ``"auto"`` (unwrapped HF
    modules unless a hook is active, then the bridge) or ``"hf"`` (the wrapped HF module);
    ``kv_cache``: cached greedy decoding when no hook is active;
    ``add_bos_token``: HFLM's option (None: the tokenizer's own special tokens).
    """

    backend = "causal"

    def __init__(
        self,
        side: ModelSide,
        *,
        batch_size: int = 16,
        add_bos_token: bool | None = None,
        forward: str = "bridge",
        kv_cache: bool = True,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if not (hasattr(side, "bridge") and hasattr(side, "hf") and hasattr(side, "tokenizer")):
            raise HarnessError(
                f"TLLM wraps a tl_transplant ModelSide (e.g. pair.target), got "
                f"{type(side).__name__}"
            )
        if forward not in FORWARDS:
            raise HarnessError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
        if batch_size < 1:
            raise HarnessError(f"batch_size must be >= 1, got {batch_size}")
        self.side = side
        self.tokenizer = side.tokenizer
        self.add_bos_token = add_bos_token
        self.forward_kind = forward
        self.kv_cache = kv_cache
        self._batch_size = int(batch_size)
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self._device = side.device
        self.used_cache: list[bool] = []
        self.used_forward: list[str] = []

    # ---- lm-eval's properties --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return int(resolve_max_length(self.side.config, self.tokenizer))

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.side.name, "engine": "tl_transplant.harness.TLLM",
                "forward": self.forward_kind, "add_bos_token": self.add_bos_token}

    # ---- tokenization (HFLM's rules) ----------------------------------------------------
    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        enc = list(self.tokenizer.encode(string, **special))
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens))

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eot_token_id)

    # ---- log-likelihoods --------------------------------------------------------------
    def _logits(self, ids: Int[torch.Tensor, "batch seq"]) -> torch.Tensor:
        from tl_transplant.models.decoding import DecodingError, can_cache, plain_model

        kind = self.forward_kind
        mod: Any = self.side.bridge if kind == "bridge" else self.side.hf
        if kind == "auto":
            kind, mod = "bridge", self.side.bridge
            if can_cache(self.side.hf):
                with contextlib.suppress(DecodingError):
                    kind, mod = "plain", plain_model(self.side.hf)
        self.used_forward.append(kind)
        out = mod(ids.to(self.device))
        return out.logits if hasattr(out, "logits") else out

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
        for (strs, ctx, cont) in requests:
            if not ctx or not cont:
                raise HarnessError(
                    f"a log-likelihood request tokenizes to an empty context or continuation "
                    f"({strs!r:.120}); lm-eval tokenizes them together and splits, so a "
                    "continuation must start a new token (e.g. with the target delimiter's space)"
                )
        uniq: dict[tuple[int, ...], int] = {}  # identical input rows share one forward row
        for r in rows:
            uniq.setdefault(tuple(r), len(uniq))
        keys = list(uniq)
        row_of = [uniq[tuple(r)] for r in rows]
        users: list[list[int]] = [[] for _ in keys]
        for i, u in enumerate(row_of):
            users[u].append(i)
        order = sorted(range(len(keys)), key=lambda u: (-len(keys[u]), u))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, leave=False,
                   desc=f"loglikelihood [{self.side.name}]")
        with torch.inference_mode():
            for idx in _batches(order, override_bs or self.batch_size):
                width = max(len(keys[u]) for u in idx)
                ids = torch.full((len(idx), width), self._pad_id, dtype=torch.long)
                for b, u in enumerate(idx):
                    ids[b, : len(keys[u])] = torch.tensor(keys[u])
                logp = F.log_softmax(self._logits(ids), dim=-1)
                for b, u in enumerate(idx):
                    n = len(keys[u])
                    for i in users[u]:
                        cont = requests[i][2]
                        lp = logp[b, n - len(cont) : n]
                        tgt = torch.tensor(cont, device=lp.device)
                        greedy = bool((lp.argmax(-1) == tgt).all())
                        out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), greedy)
                    bar.update(len(users[u]))
        bar.close()
        return [o for o in out if o is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise HarnessError(
            "loglikelihood_rolling (perplexity tasks) has no per-example score here; "
            "use a multiple_choice, loglikelihood or generate_until task"
        )

    # ---- generation -------------------------------------------------------------------
    def _greedy(
        self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, until: list[str]
    ) -> torch.Tensor:
        """Greedy decode with lm-eval's stop criteria (cf. decoding.greedy_generate)."""
        from lm_eval.models.utils_hf import stop_sequences_criteria
        from transformers import GenerationConfig

        from tl_transplant.models.decoding import DecodingError, can_cache, plain_model

        gen = self.side.hf
        eos = getattr(getattr(gen, "generation_config", None), "eos_token_id", None)
        cfg = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1, repetition_penalty=1.0,
            no_repeat_ngram_size=0, pad_token_id=self._pad_id,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
        )
        stop = stop_sequences_criteria(self.tokenizer, until, ids.shape[1], ids.shape[0])
        model: Any = gen
        cfg.use_cache = False
        if self.kv_cache and can_cache(gen):
            try:
                model, cfg.use_cache = plain_model(gen), True
            except DecodingError:
                model = gen
        self.used_cache.append(bool(cfg.use_cache))
        return model.generate(
            input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=stop
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        args = [tuple(r.args) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(args)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(args), disable=disable_tqdm or not self.progress, leave=False,
                   desc=f"generate_until [{self.side.name}]")
        with torch.inference_mode():
            for members in groups.values():
                kwargs = normalize_gen_kwargs(copy.deepcopy(args[members[0]][1]), self.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise HarnessError(
                        "this lm-eval task samples (do_sample: true); only greedy decoding is "
                        "supported, so its per-example scores would not be reproducible"
                    )
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                max_ctx = self.max_length - max_new
                if max_ctx <= 0:
                    raise HarnessError(
                        f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                        f"{self.max_length} tokens"
                    )
                enc = {i: self.tok_encode(str(args[i][0]), left_truncate_len=max_ctx)
                       for i in members}
                order = sorted(members, key=lambda i: (-len(enc[i]), str(args[i][0])))
                for idx in _batches(order, self.batch_size):
                    width = max(len(enc[i]) for i in idx)
                    ids = torch.full((len(idx), width), self._pad_id, dtype=torch.long)
                    mask = torch.zeros((len(idx), width), dtype=torch.long)
                    for b, i in enumerate(idx):
                        ids[b, width - len(enc[i]):] = torch.tensor(enc[i])
                        mask[b, width - len(enc[i]):] = 1
                    dev = self.device
                    gen = self._greedy(ids.to(dev), mask.to(dev), max_new, until)
                    for b, i in enumerate(idx):
                        text = self.tok_decode(gen[b, width:].tolist())
                        out[i] = str(postprocess_generated_text(text, until, None))
                    bar.update(len(idx))
        bar.close()
        return out


__all__ = ["DEFAULT_MAX_GEN_TOKS", "FORWARDS", "TLLM", "adds_bos"]
