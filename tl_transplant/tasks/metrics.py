"""The metric registry: a metric is ONE object, and everything that depends on it asks it.

A metric says how it encodes a task's examples, how it scores a batch down to one float
per example, whether it is an *accuracy* (per example in [0, 1]; TIR and the relative
retention are defined only for those), which task fields it needs and which config it
reads, and its differentiable form for the scorers where it has one. Tasks
(:class:`~tl_transplant.tasks.task.Task`), :func:`~tl_transplant.evaluation.evaluator.evaluate`,
the statistics (:mod:`tl_transplant.evaluation.stats`), the run's config validation and
the scorers' default metric all read this registry, so a metric is added in one place:

* subclass :class:`LogitMetric` (scored from the model's logits: :meth:`~LogitMetric.rows`
  encodes the task, :meth:`~LogitMetric.score_batch` turns one batch of logits into one
  float per row, :meth:`~LogitMetric.per_example` folds rows into examples) or
  :class:`GenerationMetric` (scored from greedy generations:
  :meth:`~GenerationMetric.score_generations`);
* decorate it with :func:`register_metric`; ``Task(..., metric=name)`` and YAML
  ``metric: name`` then work. Installed packages can add metrics through the entry point
  group :data:`ENTRY_POINT_GROUP` (loaded when a metric of that name is asked for).

Built-in metrics (:mod:`tl_transplant.tasks.task` describes them for users):
``next_token_acc``, ``answer_logprob``, ``logit_diff``, ``exact_match``,
``next_token_agreement``, ``mc_logprob``, and lm-eval's ``acc``, ``acc_norm`` and
``math_verify`` (so lm-eval tasks' per-example results count as accuracies: TIR, relative
retention). Evaluation runs every logit metric through
one loop (:func:`tl_transplant.tasks.tokens.run_batches`: rows longest first, each batch
cut to its longest row) and keeps only the per-row floats of each batch, never its logits.
"""

from __future__ import annotations

import importlib.metadata as _md
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from jaxtyping import Float, Int

from tl_transplant.errors import TaskError, TLTransplantError
from tl_transplant.tasks.tokens import (
    ChoiceBatch,
    Encoded,
    answer_logprobs,
    encode,
    first_answer_token,
    last_prompt_logits,
    mc_scores,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.tasks.task import Task

#: Entry point group through which installed packages add metrics (name = metric name,
#: value = the module that registers it or the Metric class itself).
ENTRY_POINT_GROUP = "tl_transplant.metrics"

#: ``f(logits, encoded batch) -> per-example metric``, differentiable in the logits.
MetricFn = Callable[
    [Float[torch.Tensor, "batch seq vocab"], Encoded], Float[torch.Tensor, " batch"]
]

#: Per-example Task fields a metric may need (one list per example).
NEEDABLE_FIELDS = ("wrong_answers", "choices")
#: Task settings a metric may read besides prompts and answers.
ACCEPTABLE_FIELDS = ("max_new_tokens", "extract", "meta")

#: The metric whose differentiable form the scorers use when given none.
DEFAULT_DIFFERENTIABLE = "answer_logprob"

#: ``next_token_agreement``: logit slack under which the reference token still counts as
#: the top-1 (ties and batch-shape float noise must not read as a change of behaviour).
AGREEMENT_ATOL = 1e-3


class MetricError(TLTransplantError, ValueError):
    """An unknown metric name, or a metric class that cannot be registered."""


# ---- what a logit metric runs -----------------------------------------------------------


@dataclass
class Rows:
    """A task encoded for a logit metric: one right-padded row per forward row.

    ``need[r]`` is the number of positions row ``r`` needs (a batch is cut to its longest
    row, so padding never changes a result); ``example[r]`` the example of row ``r``
    (None: row ``r`` is example ``r``); ``data`` holds the metric's per-row or per-task
    extras (target ids, wrong-answer ids, reference tokens, ...).
    """

    task: Task
    enc: Encoded
    need: Int[torch.Tensor, " rows"]
    prepend_bos: bool
    example: Int[torch.Tensor, " rows"] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.enc)


@dataclass
class Batch:
    """One forward's rows: ``idx`` (into :class:`Rows`) and their ids cut to ``width``."""

    rows: Rows
    idx: Int[torch.Tensor, " b"]
    enc: Encoded

    @property
    def task(self) -> Task:
        return self.rows.task


# ---- the metric classes -------------------------------------------------------------------


class Metric:
    """Base class: a named way to score a task's examples (see the module docstring).

    Class attributes: ``name``; ``description`` (one line); ``accuracy`` (per example in
    [0, 1], so TIR and the relative retention apply); ``needs`` (per-example Task fields
    that must be set, from :data:`NEEDABLE_FIELDS`); ``accepts`` (Task settings it reads,
    from :data:`ACCEPTABLE_FIELDS`); ``generative`` (scored from generations).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    accuracy: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[tuple[str, ...]] = ()
    generative: ClassVar[bool] = False

    def check_task(self, task: Task) -> None:
        """Checks of a task's examples beyond :attr:`needs`, when the task is built."""

    def context_batch(
        self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool
    ) -> tuple[Encoded | ChoiceBatch, int]:
        """What must fit the model's context: the encoded rows and the tokens still to come
        (default: ``[BOS] prompt answer``, nothing more)."""
        return task.encode(tokenizer, prepend_bos), 0

    def differentiable(self) -> MetricFn | None:
        """The metric as ``f(logits, encoded) -> [batch]``, differentiable in the logits, for
        the gradient scorers (None: it has no such form)."""
        return None

    def __repr__(self) -> str:
        return f"<metric {self.name!r}>"


class LogitMetric(Metric):
    """A metric scored from teacher-forced logits, one batch at a time."""

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        """Encode the task (default: ``[BOS] prompt answer`` per example, every position
        needed); raise naming the example if an answer tokenizes to nothing."""
        enc = encode(tokenizer, task.prompts, task.answers, prepend_bos=prepend_bos)
        if bool((enc.answer_len == 0).any()):
            i = int((enc.answer_len == 0).nonzero()[0])
            raise TaskError(f"task {task.name!r}: example {i}: answer is empty after tokenization")
        return Rows(task, enc, enc.prompt_len + enc.answer_len, prepend_bos)

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        """One float per row of the batch (float64 on the CPU)."""
        raise NotImplementedError

    def per_example(
        self, scores: Float[torch.Tensor, " rows"], rows: Rows
    ) -> Float[torch.Tensor, " n"]:
        """Fold the per-row floats into per-example ones (default: row ``r`` is example ``r``)."""
        return scores


class GenerationMetric(Metric):
    """A metric scored from each prompt's greedy generation (``max_new_tokens`` at most)."""

    generative = True
    accepts: ClassVar[tuple[str, ...]] = ("max_new_tokens",)

    def context_batch(
        self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool
    ) -> tuple[Encoded | ChoiceBatch, int]:
        return encode(tokenizer, task.prompts, None, prepend_bos=prepend_bos), task.max_new_tokens

    def score_generations(
        self, task: Task, texts: Sequence[str]
    ) -> tuple[Float[np.ndarray, " n"], list[str]]:
        """Per-example scores (float64) and the predictions they compared, from the decoded
        generations (special tokens skipped, cut at EOS)."""
        raise NotImplementedError


# ---- registry -------------------------------------------------------------------------------

METRIC_REGISTRY: dict[str, Metric] = {}

_M = TypeVar("_M", bound="type[Metric] | Metric")


def register_metric(metric: _M) -> _M:
    """Register a metric (a :class:`Metric` subclass, as a class decorator, or an instance):
    ``Task(..., metric=name)``, :func:`evaluate` and YAML ``metric: name`` then use it."""
    obj = metric() if isinstance(metric, type) else metric
    if not isinstance(obj, (LogitMetric, GenerationMetric)):
        raise MetricError(f"{metric!r} must subclass LogitMetric or GenerationMetric")
    cls = type(obj)
    name = obj.name
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise MetricError(f"{cls.__name__} needs a non-empty `name` without surrounding spaces")
    old = METRIC_REGISTRY.get(name)
    if old is not None and type(old) is not cls:
        raise MetricError(f"two metrics are named {name!r}: {type(old).__name__} and "
                          f"{cls.__name__}")
    for attr, allowed in (("needs", NEEDABLE_FIELDS), ("accepts", ACCEPTABLE_FIELDS)):
        bad = [f for f in getattr(obj, attr) if f not in allowed]
        if bad:
            raise MetricError(f"metric {name!r}: {attr} {bad} are not Task fields it can "
                              f"{attr[:-1]} (choose from {', '.join(allowed)})")
    if isinstance(obj, LogitMetric) and type(obj).score_batch is LogitMetric.score_batch:
        raise MetricError(f"metric {name!r}: a LogitMetric must implement score_batch")
    if isinstance(obj, GenerationMetric) and (
            type(obj).score_generations is GenerationMetric.score_generations):
        raise MetricError(f"metric {name!r}: a GenerationMetric must implement score_generations")
    METRIC_REGISTRY[name] = obj
    return metric


def _plugins() -> dict[str, _md.EntryPoint]:
    """Installed metric entry points by name (re-read each call: sys.path may change)."""
    return {ep.name: ep for ep in _md.entry_points(group=ENTRY_POINT_GROUP)}


def _load_plugin(ep: _md.EntryPoint) -> None:
    where = f"metric plugin {ep.name!r} (entry point {ep.value!r})"
    try:
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Metric) and obj.name == ep.name:
            register_metric(obj)
    except Exception as e:
        raise MetricError(f"{where} failed to load: {type(e).__name__}: {e}") from e
    if ep.name not in METRIC_REGISTRY:
        raise MetricError(f"{where} loaded but registered no metric named {ep.name!r}")


def available_metrics() -> list[str]:
    """Registered metric names (in registration order), then installed, unloaded plugins."""
    return list(METRIC_REGISTRY) + sorted(set(_plugins()) - set(METRIC_REGISTRY))


def get_metric(name: str) -> Metric:
    """The metric registered as ``name`` (loading its plugin), or a :class:`MetricError`."""
    if isinstance(name, str) and name not in METRIC_REGISTRY:
        ep = _plugins().get(name)
        if ep is not None:
            _load_plugin(ep)
    if not isinstance(name, str) or name not in METRIC_REGISTRY:
        raise MetricError(f"unknown metric {name!r}; valid: {', '.join(available_metrics())}")
    return METRIC_REGISTRY[name]


def accuracy_metrics() -> tuple[str, ...]:
    """The registered accuracy metrics (``Metric.accuracy``), in registration order."""
    return tuple(n for n, m in METRIC_REGISTRY.items() if m.accuracy)


def is_accuracy(name: str) -> bool:
    """Whether ``name`` is a registered accuracy metric (per example in [0, 1])."""
    m = METRIC_REGISTRY.get(name) if isinstance(name, str) else None
    return m is not None and m.accuracy


def needs_of(name: str) -> tuple[str, ...]:
    """The per-example fields metric ``name`` needs (none for an unknown name: building the
    Task then names the problem)."""
    try:
        return get_metric(name).needs
    except MetricError:
        return ()


def default_differentiable() -> MetricFn:
    """The scorers' metric when they are given none: :data:`DEFAULT_DIFFERENTIABLE`'s form."""
    fn = get_metric(DEFAULT_DIFFERENTIABLE).differentiable()
    assert fn is not None
    return fn


def __getattr__(name: str) -> Any:
    # METRICS / ACCURACY_METRICS: the registered names now (a metric registered later shows).
    if name == "METRICS":
        return tuple(available_metrics())
    if name == "ACCURACY_METRICS":
        return accuracy_metrics()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the built-in metrics ------------------------------------------------------------------


def _first_token_rows(rows: Rows) -> Rows:
    """Only the last prompt position matters: the batch needs the prompt, not the answer."""
    rows.need = rows.enc.prompt_len
    rows.data["target"] = first_answer_token(rows.enc)
    return rows


@register_metric
class NextTokenAcc(LogitMetric):
    """1.0 if the argmax at the last prompt position is the first answer token, else 0.0."""

    name = "next_token_acc"
    description = "argmax at the last prompt position == first answer token (0/1)"
    accuracy = True

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        return _first_token_rows(super().rows(task, tokenizer, prepend_bos))

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        last = last_prompt_logits(logits, batch.enc).float().cpu()
        return (last.argmax(-1) == batch.rows.data["target"][batch.idx]).double()


@register_metric
class AnswerLogprob(LogitMetric):
    """Sum over answer tokens of ``log p(token | prefix)``, teacher-forced."""

    name = "answer_logprob"
    description = "teacher-forced log-prob of the whole answer"

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        return answer_logprobs(logits, batch.enc.to(logits.device)).double().cpu()

    def differentiable(self) -> MetricFn:
        return answer_logprobs


def _wrong_first_tokens(
    tokenizer: PreTrainedTokenizerBase, task: Task, first: Int[torch.Tensor, " n"]
) -> tuple[Int[torch.Tensor, "n n_wrong"], Float[torch.Tensor, "n n_wrong"]]:
    """First token ids of each example's wrong answers, padded, and their 0/1 mask."""
    assert task.wrong_answers is not None
    width = max(len(w) for w in task.wrong_answers)
    ids = torch.zeros(len(task), width, dtype=torch.long)
    mask = torch.zeros(len(task), width)
    for i, ws in enumerate(task.wrong_answers):
        for j, w in enumerate(ws):
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise TaskError(f"task {task.name!r}: example {i}: wrong answer {w!r} is empty")
            if toks[0] == int(first[i]):
                raise TaskError(
                    f"task {task.name!r}: example {i}: wrong answer {w!r} starts with the same "
                    f"token as the answer {task.answers[i]!r}; logit_diff compares first tokens"
                )
            ids[i, j] = toks[0]
            mask[i, j] = 1.0
    return ids, mask


@register_metric
class LogitDiff(LogitMetric):
    """Logit of the first answer token minus the mean logit of the wrong answers' first
    tokens, at the last prompt position."""

    name = "logit_diff"
    description = "answer logit minus the mean wrong-answer logit (first tokens)"
    needs = ("wrong_answers",)

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        rows = _first_token_rows(super().rows(task, tokenizer, prepend_bos))
        rows.data["wrong"] = _wrong_first_tokens(tokenizer, task, rows.data["target"])
        return rows

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        last = last_prompt_logits(logits, batch.enc).float().cpu()
        t = batch.idx
        w_ids, w_mask = batch.rows.data["wrong"][0][t], batch.rows.data["wrong"][1][t]
        right = last.gather(-1, batch.rows.data["target"][t][:, None]).squeeze(-1)
        wl = (last.gather(-1, w_ids) * w_mask).sum(-1) / w_mask.sum(-1)
        return (right - wl).double()


@register_metric
class ExactMatch(GenerationMetric):
    """Greedy generation, passed through the task's ``extract``, equals the answer."""

    name = "exact_match"
    description = "greedy generation, extracted, equals the answer (0/1)"
    accuracy = True
    accepts = ("max_new_tokens", "extract")

    def score_generations(
        self, task: Task, texts: Sequence[str]
    ) -> tuple[Float[np.ndarray, " n"], list[str]]:
        fn = task.extract_fn
        preds = [fn(t) for t in texts]
        scores = np.array(
            [float(task.matches(p, a)) for p, a in zip(preds, task.answers)], dtype=np.float64
        )
        return scores, preds


def reference_answer(token_ids: Sequence[int]) -> str:
    """The answer string of a ``next_token_agreement`` example: its reference token ids."""
    ids = [int(t) for t in token_ids]
    if not ids or any(t < 0 for t in ids):
        raise TaskError(f"reference token ids must be a non-empty list of ids >= 0, got {ids}")
    return " ".join(map(str, ids))


def parse_reference(answer: str, where: str = "answer") -> list[int]:
    """The reference token ids of a ``next_token_agreement`` answer (inverse of
    :func:`reference_answer`); anything else raises naming ``where``."""
    parts = answer.split()
    if not parts or not all(p.isdigit() for p in parts):
        raise TaskError(
            f"{where}: metric 'next_token_agreement' needs the answer to be the reference "
            f"token ids separated by spaces (build the task with "
            f"tl_transplant.evaluation.generic.generic_retention), got {answer!r:.80}"
        )
    return [int(p) for p in parts]


def agreement(
    logits: Float[torch.Tensor, "pos vocab"], ref: Int[torch.Tensor, " pos"]
) -> Float[torch.Tensor, " pos"]:
    """1.0 where ``ref`` is the top-1 up to :data:`AGREEMENT_ATOL` plus float noise of the
    logits' dtype (so the reference model itself agrees everywhere)."""
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 0.0
    x = logits.float()
    top = x.max(-1).values
    at = x.gather(-1, ref.to(x.device)[:, None]).squeeze(-1)
    return (at >= top - (AGREEMENT_ATOL + 4 * eps * top.abs())).double().cpu()


def prompt_rows(task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
    """Prompts only (no answers), each needing its own length: for metrics that read the
    logits at every predicted prompt position (positions ``prepend_bos .. prompt_len-1``)."""
    enc = encode(tokenizer, task.prompts, None, prepend_bos=prepend_bos)
    return Rows(task, enc, enc.prompt_len, prepend_bos)


@register_metric
class NextTokenAgreement(LogitMetric):
    """Fraction of the prompt's predicted positions where the model's top-1 is the stored
    reference token (the generic retention's metric)."""

    name = "next_token_agreement"
    description = "fraction of prompt positions whose top-1 is the reference token"
    accuracy = True
    accepts = ("meta",)

    def check_task(self, task: Task) -> None:
        for i, a in enumerate(task.answers):
            parse_reference(a, f"task {task.name!r}: {task.row_label(i)}")

    def context_batch(
        self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool
    ) -> tuple[Encoded | ChoiceBatch, int]:
        return encode(tokenizer, task.prompts, None, prepend_bos=prepend_bos), 0  # ids, not text

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        ref_info = task.meta.get("reference")
        if (isinstance(ref_info, dict) and "prepend_bos" in ref_info
                and ref_info["prepend_bos"] != prepend_bos):
            raise TaskError(
                f"task {task.name!r}: its reference tokens were computed with prepend_bos="
                f"{ref_info['prepend_bos']} but it is evaluated with prepend_bos={prepend_bos}; "
                "evaluate with the task's own setting or rebuild it "
                "(tl_transplant.evaluation.generic.generic_retention)"
            )
        rows = prompt_rows(task, tokenizer, prepend_bos)
        rows.data["refs"] = [
            torch.tensor(parse_reference(a, f"task {task.name!r}: {task.row_label(i)}"))
            for i, a in enumerate(task.answers)
        ]
        return rows

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        task, start = batch.task, int(batch.rows.prepend_bos)
        out = torch.zeros(len(batch.idx), dtype=torch.float64)
        for b, i in enumerate(batch.idx.tolist()):
            lg = logits[b, start : int(batch.enc.prompt_len[b])]
            ref = batch.rows.data["refs"][i]
            if len(ref) != lg.shape[0] or int(ref.max()) >= lg.shape[-1]:
                info = task.meta.get("reference")
                built = info.get("model", "?") if isinstance(info, dict) else "?"
                raise TaskError(
                    f"task {task.name!r}: {task.row_label(i)}: the prompt has {lg.shape[0]} "
                    f"predicted positions (vocab {lg.shape[-1]}) but {len(ref)} reference "
                    f"tokens (max id {int(ref.max())}); the references were built for another "
                    f"tokenizer or BOS setting (model {built!r}); rebuild them with "
                    "tl_transplant.evaluation.generic.generic_retention(pair)"
                )
            out[b] = agreement(lg, ref).mean()
        return out


@register_metric
class McLogprob(LogitMetric):
    """1.0 if the correct choice has the strictly highest total teacher-forced log-prob
    among the example's choices (ties score 0)."""

    name = "mc_logprob"
    description = "the correct choice has the strictly highest total log-prob (0/1)"
    accuracy = True
    needs = ("choices",)

    def context_batch(
        self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool
    ) -> tuple[Encoded | ChoiceBatch, int]:
        return task.encode_choices(tokenizer, prepend_bos), 0

    def rows(self, task: Task, tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Rows:
        cb = task.encode_choices(tokenizer, prepend_bos)
        return Rows(task, cb.enc, cb.enc.prompt_len + cb.enc.answer_len, prepend_bos,
                    example=cb.example, data={"choices": cb})

    def score_batch(
        self, logits: Float[torch.Tensor, "b seq vocab"], batch: Batch
    ) -> Float[torch.Tensor, " b"]:
        return answer_logprobs(logits, batch.enc.to(logits.device)).double().cpu()

    def per_example(
        self, scores: Float[torch.Tensor, " rows"], rows: Rows
    ) -> Float[torch.Tensor, " n"]:
        return mc_scores(scores, rows.data["choices"], rows.task.correct_choice)


def _first_argmax_correct(
    row_logprobs: Float[torch.Tensor, " rows"], rows: Rows, normalize: bool
) -> Float[torch.Tensor, " n"]:
    """lm-eval's multiple-choice accuracy: 1.0 when the choice with the highest total log-prob
    (divided by the choice's length in characters with ``normalize``) is the correct one; ties
    go to the first choice, as ``np.argmax`` in lm-eval's ``process_results``."""
    cb: ChoiceBatch = rows.data["choices"]
    task = rows.task
    correct = task.correct_choice
    choices = task.choices or []
    lp = row_logprobs.detach().double().cpu()
    out = torch.zeros(cb.n_examples, dtype=torch.float64)
    for i in range(cb.n_examples):
        idx = (cb.example == i).nonzero().flatten()
        order = torch.argsort(cb.choice[idx], stable=True)
        which, vals = cb.choice[idx][order], lp[idx][order]
        if normalize:
            lens = torch.tensor([float(len(choices[i][int(c)])) for c in which],
                                dtype=torch.float64)
            vals = vals / lens
        out[i] = float(int(which[int(torch.argmax(vals))]) == int(correct[i]))
    return out


@register_metric
class Acc(McLogprob):
    """lm-eval's ``acc``: the highest total log-prob among the choices is the correct one
    (ties: the first choice wins, unlike ``mc_logprob``)."""

    name = "acc"
    description = "lm-eval's acc: argmax of the choices' total log-prob is correct (0/1)"

    def per_example(
        self, scores: Float[torch.Tensor, " rows"], rows: Rows
    ) -> Float[torch.Tensor, " n"]:
        return _first_argmax_correct(scores, rows, normalize=False)


@register_metric
class AccNorm(McLogprob):
    """lm-eval's ``acc_norm``: as ``acc`` with each choice's log-prob divided by its length in
    characters (lm-eval counts the choice text without the target delimiter)."""

    name = "acc_norm"
    description = "lm-eval's acc_norm: argmax of log-prob per character is correct (0/1)"

    def per_example(
        self, scores: Float[torch.Tensor, " rows"], rows: Rows
    ) -> Float[torch.Tensor, " n"]:
        return _first_argmax_correct(scores, rows, normalize=True)


#: What to install for ``math_verify`` (the package of the same name, in the lm_eval extra).
MATH_VERIFY_HINT = 'pip install "tl_transplant[lm_eval]" (or pip install math-verify)'


def math_equivalent(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` (a model's generation) states ``answer`` (``\\boxed{}`` or bare
    LaTeX), by HF's ``math_verify`` as lm-eval's MATH tasks use it:
    ``verify(gold=parse(answer), target=parse(prediction))``."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise MetricError(f"metric 'math_verify' needs the math_verify package: "
                          f"{MATH_VERIFY_HINT}") from e
    gold = parse(answer)
    if not gold:  # a bare answer such as "50" or "\\frac{1}{2}": read it as LaTeX
        gold = parse(f"${answer}$")
    return bool(verify(gold=gold, target=parse(prediction)))


@register_metric
class MathVerify(GenerationMetric):
    """Greedy generation is mathematically equal to the answer (HF ``math_verify``, as in
    lm-eval's ``minerva_math``/``hendrycks_math`` tasks); needs the ``math_verify`` package."""

    name = "math_verify"
    description = "greedy generation equals the answer by math_verify (0/1)"
    accuracy = True
    accepts = ("max_new_tokens",)

    def score_generations(
        self, task: Task, texts: Sequence[str]
    ) -> tuple[Float[np.ndarray, " n"], list[str]]:
        scores = np.array([float(math_equivalent(t, a)) for t, a in zip(texts, task.answers)],
                          dtype=np.float64)
        return scores, list(texts)


__all__ = [
    "ACCEPTABLE_FIELDS",
    "AGREEMENT_ATOL",
    "DEFAULT_DIFFERENTIABLE",
    "ENTRY_POINT_GROUP",
    "METRIC_REGISTRY",
    "NEEDABLE_FIELDS",
    "Batch",
    "GenerationMetric",
    "MATH_VERIFY_HINT",
    "LogitMetric",
    "Metric",
    "MetricError",
    "MetricFn",
    "Rows",
    "accuracy_metrics",
    "agreement",
    "available_metrics",
    "default_differentiable",
    "get_metric",
    "is_accuracy",
    "math_equivalent",
    "needs_of",
    "parse_reference",
    "prompt_rows",
    "reference_answer",
    "register_metric",
]
