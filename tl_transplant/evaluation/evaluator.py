"""Evaluate a model on a task, and compare source, target and transplanted target.

* :func:`evaluate` scores every example of a :class:`~tl_transplant.tasks.task.Task`
  (logit metrics by batched, right-padded forwards of the TransformerLens
  bridge; ``exact_match`` by greedy ``generate`` with a KV cache over the same
  HF tensors, see :mod:`tl_transplant.models.decoding`; uncached through the bridge
  while a hook is active, or with ``kv_cache=False``),
  under ``torch.inference_mode`` with a progress bar.
* :func:`transplant_metrics` turns paired per-example scores into TIR,
  gap-based recovery and the accuracy delta, with paired bootstrap CIs.
* :func:`retention` reports a control task's metric before and after.
* :func:`evaluate_transplant` does all of it for one (units, alpha).

The definitions of TIR, recovery and the paired bootstrap CIs are in
:mod:`tl_transplant.evaluation.stats` (pure numpy); this module runs the models and hands
their per-example scores to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np
import torch
from jaxtyping import Float, Int

from tl_transplant.arch.units import Unit
from tl_transplant.evaluation.stats import (
    ACCURACY_METRICS,
    DEFAULT_GAP_TOL,
    DEFAULT_N_BOOT,
    TransplantMetrics,
    UndefinedMetricWarning,
    bootstrap_means,
    paired_diff_ci,
    paired_metrics,
    recovery,
    tir,
)
from tl_transplant.tasks.task import AGREEMENT_ATOL, Task, parse_reference
from tl_transplant.tasks.tokens import (
    Encoded,
    answer_logprobs,
    choice_logprobs,
    encode,
    first_answer_token,
    last_prompt_logits,
    mc_scores,
    resolve_prepend_bos,
)

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import (
        GenerationConfig,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedTokenizerBase,
    )

    from tl_transplant.edit.edits import KVMode
    from tl_transplant.edit.weights import WeightMask
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

#: What :func:`evaluate` runs: a side, a pair (with ``side=``) or any callable LM
#: (HF causal LM, TransformerBridge) mapping input ids to logits or an output with ``.logits``.
EvalModel: TypeAlias = "ModelSide | ModelPair | Callable[[torch.Tensor], Any]"
#: A context manager entered once, or a factory ``f(input_ids)`` entered per batch.
Intervention: TypeAlias = (
    "contextlib.AbstractContextManager[object] "
    "| Callable[[Int[torch.Tensor, 'batch seq']], contextlib.AbstractContextManager[object]]"
)
#: Units as :func:`~tl_transplant.arch.units.parse_units` takes them.
UnitsLike: TypeAlias = "Iterable[str | Unit] | str | Unit"
#: ``edit(pair, selection, alpha)``: a reversible context manager that edits the target;
#: ``selection`` is a list of units or a :class:`~tl_transplant.edit.weights.WeightMask`.
EditFactory: TypeAlias = (
    "Callable[[ModelPair, list[Unit] | WeightMask, float], "
    "contextlib.AbstractContextManager[object]]"
)

# ---- model resolution ------------------------------------------------------------------


@dataclass
class _Runner:
    """How to run one model: a logits forward, a generator and a tokenizer."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    generator: GenerationMixin | None
    tokenizer: PreTrainedTokenizerBase
    default_bos: bool
    device: torch.device


def _device_of(module: Any) -> torch.device:  # duck-typed: .cfg.device or .parameters()
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


def _resolve(
    what: EvalModel, side: str | None, tokenizer: PreTrainedTokenizerBase | None, forward: str
) -> _Runner:
    model: Any = what  # duck-typed: pairs and sides are recognised by their attributes
    if hasattr(model, "source") and hasattr(model, "target") and hasattr(model, "layout"):
        if side not in ("source", "target"):
            raise ValueError(
                "evaluate() got a ModelPair; pass side='source' or side='target' (or the side "
                "itself, e.g. pair.target)"
            )
        model = getattr(model, side)
    if hasattr(model, "bridge") and hasattr(model, "hf") and hasattr(model, "tokenizer"):
        if forward not in ("bridge", "hf"):
            raise ValueError(f"forward must be 'bridge' or 'hf', got {forward!r}")
        mod = model.bridge if forward == "bridge" else model.hf
        return _Runner(
            name=str(model.name),
            forward=lambda ids: _logits_of(mod(ids)),
            generator=model.hf,
            tokenizer=tokenizer or model.tokenizer,
            default_bos=bool(model.prepend_bos),
            device=_device_of(mod),
        )
    if not callable(model):
        raise TypeError(
            "evaluate() takes a ModelSide, a ModelPair with side=..., or a callable model "
            f"(HF causal LM, TransformerBridge, HookedTransformer); got {type(model).__name__}"
        )
    tok = tokenizer or getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("evaluate() needs tokenizer=... for a bare model")
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
    return _Runner(
        name=str(name),
        forward=lambda ids: _logits_of(model(ids)),
        generator=gen,
        tokenizer=tok,
        default_bos=default_bos,
        device=_device_of(model),
    )


@contextlib.contextmanager
def _maybe_enter(intervention: Intervention | None) -> Iterator[None]:
    if intervention is not None and hasattr(intervention, "__enter__"):
        with cast(contextlib.AbstractContextManager[object], intervention):
            yield
    else:
        yield


def _per_batch(
    intervention: Intervention | None, ids: Int[torch.Tensor, "batch seq"]
) -> contextlib.AbstractContextManager[object]:
    """A per-batch context: ``intervention(input_ids)`` if it is a factory, else a no-op."""
    if intervention is not None and not hasattr(intervention, "__enter__"):
        cm = intervention(ids)
        if not hasattr(cm, "__enter__"):
            raise TypeError("intervention(input_ids) must return a context manager")
        return cm
    return contextlib.nullcontext()


# ---- results ---------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-example scores of one model on one task (``mean`` is the task score)."""

    task: str
    metric: str
    model: str
    scores: np.ndarray
    prepend_bos: bool
    generations: list[str] | None = None
    predictions: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.scores.mean()) if len(self.scores) else float("nan")

    @property
    def n(self) -> int:
        return int(len(self.scores))

    def __repr__(self) -> str:
        return (
            f"EvalResult(task={self.task!r}, model={self.model!r}, {self.metric}="
            f"{self.mean:.4g}, n={self.n}, prepend_bos={self.prepend_bos})"
        )

    def to_dict(self, with_scores: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task": self.task,
            "metric": self.metric,
            "model": self.model,
            "mean": self.mean,
            "n": self.n,
            "prepend_bos": self.prepend_bos,
            "meta": self.meta,
        }
        if with_scores:
            d["scores"] = [float(v) for v in self.scores]
            if self.predictions is not None:
                d["predictions"] = list(self.predictions)
        return d


# ---- evaluation ------------------------------------------------------------------------


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def _sub(enc: Encoded, idx: list[int], width: int) -> Encoded:
    t = torch.tensor(idx, dtype=torch.long)
    return Encoded(enc.input_ids[t, :width], enc.prompt_len[t], enc.answer_len[t], enc.pad_id)


def _wrong_first_tokens(
    tokenizer: PreTrainedTokenizerBase, task: Task, enc: Encoded
) -> tuple[Int[torch.Tensor, "batch n_wrong"], Float[torch.Tensor, "batch n_wrong"]]:
    assert task.wrong_answers is not None
    width = max(len(w) for w in task.wrong_answers)
    ids = torch.zeros(len(task), width, dtype=torch.long)
    mask = torch.zeros(len(task), width)
    first = first_answer_token(enc)
    for i, ws in enumerate(task.wrong_answers):
        for j, w in enumerate(ws):
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ValueError(f"task {task.name!r}: example {i}: wrong answer {w!r} is empty")
            if toks[0] == int(first[i]):
                raise ValueError(
                    f"task {task.name!r}: example {i}: wrong answer {w!r} starts with the same "
                    f"token as the answer {task.answers[i]!r}; logit_diff compares first tokens"
                )
            ids[i, j] = toks[0]
            mask[i, j] = 1.0
    return ids, mask


def _mc_scores(
    runner: _Runner,
    task: Task,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
    bar: tqdm,
) -> np.ndarray:
    """``mc_logprob``: 1.0 where the correct choice has the strictly highest total log-prob."""
    cb = task.encode_choices(runner.tokenizer, bos)

    def fwd(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(runner.device)
        with _per_batch(intervention, ids):
            return runner.forward(ids)

    row_lp = choice_logprobs(fwd, cb, batch_size)
    bar.update(len(task))
    return mc_scores(row_lp, cb, task.correct_choice).numpy()


def _context_logits(
    runner: _Runner,
    prompts: Sequence[str],
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
) -> Iterator[tuple[int, Float[torch.Tensor, "pos vocab"]]]:
    """(example, logits at each predicted prompt position): every prompt token, BOS excluded.

    Right-padded batches sorted by length, as the other logit metrics run.
    """
    enc = encode(runner.tokenizer, prompts, None, prepend_bos=bos)
    start = int(bos)
    order = sorted(range(len(prompts)), key=lambda i: (-int(enc.prompt_len[i]), i))
    for idx in _batches(order, batch_size):
        sub = _sub(enc, idx, int(enc.prompt_len[idx].max()))
        ids = sub.input_ids.to(runner.device)
        with _per_batch(intervention, ids):
            logits = runner.forward(ids)
        for b, i in enumerate(idx):
            yield i, logits[b, start : int(enc.prompt_len[i])]


def _agreement(
    logits: Float[torch.Tensor, "pos vocab"], ref: Int[torch.Tensor, " pos"]
) -> Float[torch.Tensor, " pos"]:
    """1.0 where ``ref`` is the top-1 up to :data:`~tl_transplant.tasks.task.AGREEMENT_ATOL` plus
    float noise of the logits' dtype (so the reference model itself agrees everywhere)."""
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 0.0
    x = logits.float()
    top = x.max(-1).values
    at = x.gather(-1, ref.to(x.device)[:, None]).squeeze(-1)
    return (at >= top - (AGREEMENT_ATOL + 4 * eps * top.abs())).double().cpu()


def reference_top1(
    model: EvalModel,
    prompts: Sequence[str],
    *,
    prepend_bos: bool,
    side: str | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """The model's top-1 next token at every predicted position of each prompt (BOS
    excluded), teacher-forced: the references of ``next_token_agreement``."""
    runner = _resolve(model, side, None, "bridge")
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for i, lg in _context_logits(runner, prompts, prepend_bos, batch_size, None):
            out[i] = [int(t) for t in lg.float().argmax(-1).tolist()]
    return out


def _agreement_scores(
    runner: _Runner,
    task: Task,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
    bar: tqdm,
) -> np.ndarray:
    """``next_token_agreement``: per example, the fraction of positions agreeing with the
    stored reference top-1 tokens."""
    ref_info = task.meta.get("reference")
    if isinstance(ref_info, dict) and "prepend_bos" in ref_info and ref_info["prepend_bos"] != bos:
        raise ValueError(
            f"task {task.name!r}: its reference tokens were computed with prepend_bos="
            f"{ref_info['prepend_bos']} but it is evaluated with prepend_bos={bos}; evaluate "
            "with the task's own setting or rebuild it "
            "(tl_transplant.evaluation.generic.generic_retention)"
        )
    refs = [
        torch.tensor(parse_reference(a, f"task {task.name!r}: {task.row_label(i)}"))
        for i, a in enumerate(task.answers)
    ]
    out = torch.zeros(len(task), dtype=torch.float64)
    for i, lg in _context_logits(runner, task.prompts, bos, batch_size, intervention):
        ref = refs[i]
        if len(ref) != lg.shape[0] or int(ref.max()) >= lg.shape[-1]:
            built = ref_info.get("model", "?") if isinstance(ref_info, dict) else "?"
            raise ValueError(
                f"task {task.name!r}: {task.row_label(i)}: the prompt has {lg.shape[0]} "
                f"predicted positions (vocab {lg.shape[-1]}) but {len(ref)} reference tokens "
                f"(max id {int(ref.max())}); the references were built for another tokenizer "
                f"or BOS setting (model {built!r}); rebuild them with "
                "tl_transplant.evaluation.generic.generic_retention(pair)"
            )
        out[i] = _agreement(lg, ref).mean()
        bar.update(1)
    return out.numpy()


def _logit_scores(
    runner: _Runner,
    task: Task,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
    bar: tqdm,
) -> np.ndarray:
    if task.metric == "mc_logprob":
        return _mc_scores(runner, task, bos, batch_size, intervention, bar)
    if task.metric == "next_token_agreement":
        return _agreement_scores(runner, task, bos, batch_size, intervention, bar)
    enc = encode(runner.tokenizer, task.prompts, task.answers, prepend_bos=bos)
    if bool((enc.answer_len == 0).any()):
        i = int((enc.answer_len == 0).nonzero()[0])
        raise ValueError(f"task {task.name!r}: example {i}: answer is empty after tokenization")
    first_only = task.metric in ("next_token_acc", "logit_diff")
    need = enc.prompt_len if first_only else enc.prompt_len + enc.answer_len
    order = sorted(range(len(task)), key=lambda i: (-int(need[i]), i))
    targets = first_answer_token(enc)
    wrong = (
        _wrong_first_tokens(runner.tokenizer, task, enc) if task.metric == "logit_diff" else None
    )
    out = torch.zeros(len(task), dtype=torch.float64)
    for idx in _batches(order, batch_size):
        sub = _sub(enc, idx, int(need[idx].max()))
        ids = sub.input_ids.to(runner.device)
        with _per_batch(intervention, ids):
            logits = runner.forward(ids)
        t = torch.tensor(idx, dtype=torch.long)
        if task.metric == "answer_logprob":
            vals = answer_logprobs(logits, sub.to(logits.device)).double().cpu()
        else:
            last = last_prompt_logits(logits, sub).float().cpu()
            if task.metric == "next_token_acc":
                vals = (last.argmax(-1) == targets[t]).double()
            else:
                assert wrong is not None
                w_ids, w_mask = wrong[0][t], wrong[1][t]
                right = last.gather(-1, targets[t][:, None]).squeeze(-1)
                wl = (last.gather(-1, w_ids) * w_mask).sum(-1) / w_mask.sum(-1)
                vals = (right - wl).double()
        out[t] = vals
        bar.update(len(idx))
    return out.numpy()


def _generation_config(
    gen: GenerationMixin, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, pad: int
) -> GenerationConfig:
    from transformers import GenerationConfig

    eos = getattr(getattr(gen, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    # Explicit greedy settings so the model's own generation_config (repetition
    # penalty, sampling) cannot leak in. use_cache=False here; greedy_generate turns
    # it on only for the unwrapped HF tree (tl_transplant.models.decoding): under
    # transformer-lens 4.3 with transformers 5.x the bridge's attention never fills
    # the KV cache that generate() passes, so cached decoding through the bridged
    # model would see only the newest token. tests/test_generation.py checks the
    # cached path against this uncached one token for token.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=False,
    )


def _eos_set(cfg: GenerationConfig | PretrainedConfig) -> set[int]:
    eos = cfg.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _generate(
    runner: _Runner,
    task: Task,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
    bar: tqdm,
    generation: str,
    kv_cache: bool = True,
) -> tuple[np.ndarray, list[str], list[str], str]:
    """Greedy decode every prompt; also says whether the batches used the KV cache."""
    from tl_transplant.models.decoding import greedy_generate

    gen = runner.generator
    if gen is None:
        raise ValueError(
            f"task {task.name!r} uses exact_match, which needs a model with .generate "
            "(an HF causal LM or a ModelSide)"
        )
    if generation not in ("left_pad", "by_length"):
        raise ValueError(f"generation must be 'left_pad' or 'by_length', got {generation!r}")
    tok = runner.tokenizer
    enc = encode(tok, task.prompts, None, prepend_bos=bos)
    rows = [enc.input_ids[i, : int(enc.prompt_len[i])] for i in range(len(task))]
    cfg = _generation_config(gen, tok, task.max_new_tokens, enc.pad_id)
    eos = _eos_set(cfg)
    order = sorted(range(len(task)), key=lambda i: (-len(rows[i]), i))
    if generation == "left_pad":
        groups = _batches(order, batch_size)
    else:  # equal-length groups: no padding at all
        groups = []
        for length in sorted({len(r) for r in rows}, reverse=True):
            same = [i for i in order if len(rows[i]) == length]
            groups.extend(_batches(same, batch_size))
    texts: list[str] = [""] * len(task)
    n_cached = 0
    dev = _device_of(gen)
    for idx in groups:
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, width - len(rows[i]) :] = rows[i]
            mask[b, width - len(rows[i]) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        with _per_batch(intervention, ids):
            out, cached = greedy_generate(gen, ids, mask, cfg, kv_cache=kv_cache)
        n_cached += int(cached)
        for b, i in enumerate(idx):
            new = out[b, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            texts[i] = str(tok.decode(new[:cut], skip_special_tokens=True))
        bar.update(len(idx))
    fn = task.extract_fn
    preds = [fn(t) for t in texts]
    scores = np.array(
        [float(task.matches(p, a)) for p, a in zip(preds, task.answers)], dtype=np.float64
    )
    used = "uncached" if n_cached == 0 else "cached" if n_cached == len(groups) else "mixed"
    return scores, texts, preds, used


def evaluate(
    model: EvalModel,
    task: Task,
    *,
    side: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prepend_bos: bool | str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    intervention: Intervention | None = None,
    forward: str = "bridge",
    generation: str = "left_pad",
    kv_cache: bool = True,
) -> EvalResult:
    """Score every example of ``task`` on ``model``; returns per-example scores and their mean.

    ``model``: a :class:`~tl_transplant.models.pair.ModelSide` (``pair.target``), a
    ``ModelPair`` with ``side="source"|"target"``, or a bare HF model / bridge with
    ``tokenizer=``. Logit metrics use batched right-padded forwards of the bridge
    (``forward="hf"`` uses the HF module; both see the same weights).
    ``exact_match`` uses greedy ``generate`` with left padding and an attention
    mask (``generation="by_length"`` batches equal-length prompts only). With
    ``kv_cache=True`` it decodes with a KV cache through the unwrapped HF modules
    (same tensors, so transplants show), except while a hook is registered on the
    model (e.g. inside ``patch_activations``): then, and with ``kv_cache=False``
    (the reference), every step recomputes the prefix through the bridge.
    ``meta["kv_cache"]`` says which ran: ``"cached"``, ``"uncached"`` or ``"mixed"``.

    ``prepend_bos`` overrides the task's setting; ``"auto"`` follows the model
    (see :mod:`tl_transplant.tasks.task`). ``intervention``: a context manager entered
    once around all forwards/generations, or a callable ``f(input_ids)``
    returning a context manager entered around each batch (e.g. an activation
    patch that needs the batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner = _resolve(model, side, tokenizer, forward)
    setting = task.prepend_bos if prepend_bos is None else prepend_bos
    if setting is None or (isinstance(setting, str) and setting.strip().lower() in ("auto", "")):
        bos = runner.default_bos
    else:
        bos = resolve_prepend_bos(None, setting)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(task),
        desc=f"{task.name} [{runner.name}]",
        disable=not progress,
        leave=False,
        unit="ex",
    )
    gens = preds = None
    used = ""
    try:
        with _maybe_enter(intervention), torch.inference_mode():
            if task.metric == "exact_match":
                scores, gens, preds, used = _generate(
                    runner, task, bos, batch_size, intervention, bar, generation, kv_cache
                )
            else:
                scores = _logit_scores(runner, task, bos, batch_size, intervention, bar)
    finally:
        bar.close()
    meta: dict[str, Any] = {"forward": forward if task.metric != "exact_match" else "generate"}
    if task.metric == "exact_match":
        meta.update(max_new_tokens=task.max_new_tokens, generation=generation)
        meta["kv_cache"] = used
    if "split" in task.meta:
        meta["split"] = task.meta["split"]
    return EvalResult(
        task=task.name,
        metric=task.metric,
        model=runner.name,
        scores=scores,
        prepend_bos=bos,
        generations=gens,
        predictions=preds,
        meta=meta,
    )


# ---- transplant metrics ----------------------------------------------------------------


def _scores(x: EvalResult | np.ndarray | Sequence[float]) -> np.ndarray:
    return x.scores if isinstance(x, EvalResult) else np.asarray(x, dtype=np.float64)


def transplant_metrics(
    target: EvalResult | np.ndarray,
    transplanted: EvalResult | np.ndarray,
    source: EvalResult | np.ndarray | None = None,
    *,
    metric: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    gap_tol: float = DEFAULT_GAP_TOL,
    warn: bool = True,
) -> TransplantMetrics:
    """Delta, TIR and recovery with paired bootstrap CIs (:mod:`tl_transplant.evaluation.stats`).

    Scores must be paired: example i is the same prompt in every array; EvalResults
    must be on the same task with the same n. ``metric`` defaults to theirs.
    """
    if metric is None:
        metric = next(
            (r.metric for r in (target, transplanted, source) if isinstance(r, EvalResult)),
            "next_token_acc",
        )
    results = [r for r in (target, transplanted, source) if isinstance(r, EvalResult)]
    if len({(r.task, r.n) for r in results}) > 1:
        raise ValueError(
            "transplant_metrics needs paired scores on the same task; got "
            + ", ".join(f"{r.model}: {r.task} (n={r.n})" for r in results)
        )
    return paired_metrics(
        _scores(target),
        _scores(transplanted),
        None if source is None else _scores(source),
        metric=metric,
        n_boot=n_boot,
        level=level,
        seed=seed,
        gap_tol=gap_tol,
        warn=warn,
    )


@dataclass
class Retention:
    """A control task's metric before and after an edit; ``drop = before - after``."""

    task: str
    metric: str
    n: int
    before: float
    after: float
    drop: float
    ci_drop: tuple[float, float] | None
    relative: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "n": self.n,
            "before": self.before,
            "after": self.after,
            "drop": self.drop,
            "ci_drop": list(self.ci_drop) if self.ci_drop is not None else None,
            "relative": self.relative,
        }


def retention(
    before: EvalResult,
    after: EvalResult,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> Retention:
    """Drop of a control task's metric (positive = lost), with a paired bootstrap CI.

    ``relative = after / before`` for 0/1 metrics with ``before > 0``, else None.
    """
    if before.task != after.task or before.n != after.n:
        raise ValueError(
            f"retention needs the same control task before and after; got {before.task!r} "
            f"(n={before.n}) and {after.task!r} (n={after.n})"
        )
    ci = paired_diff_ci(before.scores, after.scores, n_boot=n_boot, level=level, seed=seed)
    rel = (
        after.mean / before.mean if before.metric in ACCURACY_METRICS and before.mean > 0 else None
    )
    return Retention(
        task=before.task,
        metric=before.metric,
        n=before.n,
        before=before.mean,
        after=after.mean,
        drop=before.mean - after.mean,
        ci_drop=ci,
        relative=rel,
    )


# ---- one transplant, end to end ----------------------------------------------------------


@dataclass
class TransplantReport:
    """Source, target and transplanted target on one task, plus retention on controls."""

    task: str
    metric: str
    prepend_bos: bool
    units: list[str]
    alpha: float
    source: EvalResult
    target: EvalResult
    transplanted: EvalResult
    metrics: TransplantMetrics
    retention: list[Retention] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_drop(self) -> float:
        """The largest retention drop over the control tasks (0 without controls)."""
        return max((r.drop for r in self.retention), default=0.0)

    def to_dict(self, with_scores: bool = False) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "prepend_bos": self.prepend_bos,
            "units": list(self.units),
            "alpha": self.alpha,
            "source": self.source.to_dict(with_scores),
            "target": self.target.to_dict(with_scores),
            "transplanted": self.transplanted.to_dict(with_scores),
            "metrics": self.metrics.to_dict(),
            "retention": [r.to_dict() for r in self.retention],
            "max_drop": self.max_drop,
            "meta": self.meta,
        }


def evaluate_transplant(
    pair: ModelPair,
    task: Task,
    units: UnitsLike | WeightMask,
    alpha: float = 1.0,
    *,
    control_tasks: Sequence[Task] = (),
    kv: KVMode = "group",
    prepend_bos: bool | str | None = None,
    baselines: dict[str, EvalResult] | None = None,
    control_before: dict[str, EvalResult] | None = None,
    edit: EditFactory | None = None,
    batch_size: int = 16,
    progress: bool = True,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    gap_tol: float = DEFAULT_GAP_TOL,
    warn: bool = True,
    allow_extrapolation: bool = False,
) -> TransplantReport:
    """Evaluate source, target and ``transplant(pair, units, alpha)`` on ``task`` and controls.

    ``units``: units, or a :class:`~tl_transplant.edit.weights.WeightMask` (a weight-level
    transplant; the report's ``units`` is then empty and ``meta["mask"]`` describes it).
    The transplant is reversible: the target is restored bit-exactly on return.
    ``baselines`` (``{"source": ..., "target": ...}``) and ``control_before``
    (by task name) reuse earlier results. ``edit(pair, selection, alpha)`` may
    replace the weight transplant by any other reversible context manager.
    ``allow_extrapolation`` lets the default transplant take alpha > 1 (DARE's 1/p).
    """
    from tl_transplant.arch.units import parse_units
    from tl_transplant.edit.edits import transplant
    from tl_transplant.edit.weights import WeightMask

    unit_list: list[Unit] | WeightMask = (
        units if isinstance(units, WeightMask) else parse_units(units))
    bos = resolve_prepend_bos(pair, task.prepend_bos if prepend_bos is None else prepend_bos)

    def ev(side: ModelSide, t: Task) -> EvalResult:
        b = resolve_prepend_bos(pair, t.prepend_bos if prepend_bos is None else prepend_bos)
        return evaluate(side, t, prepend_bos=b, batch_size=batch_size, progress=progress)

    base = dict(baselines or {})
    if "source" not in base:
        base["source"] = evaluate(
            pair.source, task, prepend_bos=bos, batch_size=batch_size, progress=progress
        )
    if "target" not in base:
        base["target"] = evaluate(
            pair.target, task, prepend_bos=bos, batch_size=batch_size, progress=progress
        )
    before = dict(control_before or {})
    for c in control_tasks:
        if c.name not in before:
            before[c.name] = ev(pair.target, c)
    make: EditFactory = edit or (lambda p, u, a: transplant(
        p, u, a, kv=kv, allow_extrapolation=allow_extrapolation))
    after: dict[str, EvalResult] = {}
    with make(pair, unit_list, alpha) if unit_list and alpha != 0 else contextlib.nullcontext():
        x = evaluate(pair.target, task, prepend_bos=bos, batch_size=batch_size, progress=progress)
        for c in control_tasks:
            after[c.name] = ev(pair.target, c)
    metrics = transplant_metrics(
        base["target"],
        x,
        base["source"],
        n_boot=n_boot,
        level=level,
        seed=seed,
        gap_tol=gap_tol,
        warn=warn,
    )
    ret = [
        retention(before[c.name], after[c.name], n_boot=n_boot, level=level, seed=seed)
        for c in control_tasks
    ]
    meta: dict[str, Any] = {"kv": kv}
    if isinstance(unit_list, WeightMask):
        meta["mask"] = {"n_params": unit_list.n_params, "sha256": unit_list.sha256}
    return TransplantReport(
        task=task.name,
        metric=task.metric,
        prepend_bos=bos,
        units=[] if isinstance(unit_list, WeightMask) else [str(u) for u in unit_list],
        alpha=float(alpha),
        source=base["source"],
        target=base["target"],
        transplanted=x,
        metrics=metrics,
        retention=ret,
        meta=meta,
    )


# The statistics live in tl_transplant.evaluation.stats; they stay importable from here.
__all__ = [
    "DEFAULT_GAP_TOL",
    "DEFAULT_N_BOOT",
    "EvalResult",
    "Retention",
    "TransplantMetrics",
    "TransplantReport",
    "UndefinedMetricWarning",
    "bootstrap_means",
    "evaluate",
    "evaluate_transplant",
    "recovery",
    "reference_top1",
    "retention",
    "tir",
    "transplant_metrics",
]
