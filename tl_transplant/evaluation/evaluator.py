"""Evaluate a model on a task, and compare source, target and transplanted target.

* :func:`evaluate` scores every example of a :class:`~tl_transplant.tasks.task.Task` with
  its metric from the registry (:mod:`tl_transplant.tasks.metrics`): logit metrics by
  one batch loop (:func:`~tl_transplant.tasks.tokens.run_batches`: batched, right-padded
  forwards of the TransformerLens bridge, each batch handed to the metric, which keeps
  only its per-row floats); generative ones (``exact_match``) by greedy ``generate``
  (:mod:`tl_transplant.evaluation.generation`: a KV cache over the same HF tensors, see
  :mod:`tl_transplant.models.decoding`; uncached through the bridge while a hook is
  active, or with ``kv_cache=False``), under ``torch.inference_mode`` with a progress bar.
* :func:`transplant_metrics` turns paired per-example scores into TIR,
  gap-based recovery and the accuracy delta, with paired bootstrap CIs.
* :func:`retention` reports a control task's metric before and after.
* :func:`evaluate_transplant` does all of it for one (units, alpha).

The definitions of TIR, recovery and the paired bootstrap CIs are in
:mod:`tl_transplant.evaluation.stats` (pure numpy); this module runs the models and hands
their per-example scores to it. How a model is run is :mod:`tl_transplant.evaluation.runner`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from tl_transplant.arch.units import Unit
from tl_transplant.errors import EvaluationError
from tl_transplant.evaluation.generation import generate_texts
from tl_transplant.evaluation.runner import (
    EvalModel,
    Intervention,
    Runner,
    maybe_enter,
    resolve_model,
)
from tl_transplant.evaluation.stats import (
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
from tl_transplant.tasks.metrics import (
    Batch,
    GenerationMetric,
    LogitMetric,
    get_metric,
    is_accuracy,
)
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import Encoded, encode, resolve_prepend_bos, run_batches

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.edit.edits import KVMode
    from tl_transplant.edit.weights import WeightMask
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

#: Units as :func:`~tl_transplant.arch.units.parse_units` takes them.
UnitsLike: TypeAlias = "Iterable[str | Unit] | str | Unit"
#: ``edit(pair, selection, alpha)``: a reversible context manager that edits the target;
#: ``selection`` is a list of units or a :class:`~tl_transplant.edit.weights.WeightMask`.
EditFactory: TypeAlias = (
    "Callable[[ModelPair, list[Unit] | WeightMask, float], "
    "contextlib.AbstractContextManager[object]]"
)

#: ``evaluate(..., engine=)``: this evaluator, lm-eval's HFLM, lm-eval through the bridge.
ENGINES = ("tl_transplant", "lm_eval", "lm_eval_bridge")

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


def _logit_scores(
    runner: Runner,
    task: Task,
    metric: LogitMetric,
    bos: bool,
    batch_size: int,
    intervention: Intervention | None,
    bar: tqdm,
) -> np.ndarray:
    """Per-example scores of a logit metric: the metric encodes the task, the one batch loop
    runs the forwards and hands each batch's logits to ``metric.score_batch``."""
    rows = metric.rows(task, runner.tokenizer, bos)
    if len(rows) != len(task):  # rows are not examples (e.g. one per choice): count rows
        bar.reset(total=len(rows))
        bar.unit = "row"
    per_row = run_batches(
        lambda ids: runner.logits(ids, intervention), rows.enc, rows.need, batch_size,
        lambda logits, idx, sub: metric.score_batch(logits, Batch(rows, idx, sub)),
        done=bar.update,
    )
    return metric.per_example(per_row, rows).numpy()


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
    runner = resolve_model(model, side, None, "bridge")
    enc = encode(runner.tokenizer, prompts, None, prepend_bos=prepend_bos)
    out: list[list[int]] = [[] for _ in prompts]
    start = int(prepend_bos)

    def top1(logits: torch.Tensor, idx: torch.Tensor, sub: Encoded) -> torch.Tensor:
        for b, i in enumerate(idx.tolist()):
            lg = logits[b, start : int(sub.prompt_len[b])]
            out[i] = [int(t) for t in lg.float().argmax(-1).tolist()]
        return torch.zeros(len(idx), dtype=torch.float64)

    with torch.inference_mode():
        run_batches(runner.logits, enc, enc.prompt_len, batch_size, top1)
    return out


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
    engine: str | None = None,
) -> EvalResult:
    """Score every example of ``task`` on ``model``; returns per-example scores and their mean.

    ``engine``: who scores. ``None`` (default): the task's own way, i.e. this evaluator
    (``"tl_transplant"``), except for an lm-eval task (a task with an ``evaluate_external``
    method: :class:`tl_transplant.harness.view.HarnessTaskView`), which runs through
    lm-eval's pipeline. ``"lm_eval"``: lm-eval's ``HFLM`` on the in-memory HF model (equal to
    a plain ``lm_eval`` run on the exported model), ``"lm_eval_bridge"``: lm-eval's pipeline
    through the bridge (hooks apply); both only for lm-eval tasks (load one with
    :func:`tl_transplant.harness.load_task`, then ``.test.as_task()``).

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
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    external = getattr(task, "evaluate_external", None)
    if engine not in (None, "auto", *ENGINES):
        raise EvaluationError(f"engine must be one of {', '.join(ENGINES)} (or None: the "
                              f"task's own), got {engine!r}")
    if external is not None and engine != "tl_transplant":
        res: EvalResult = external(model, side=side, engine=engine, batch_size=batch_size,
                                   progress=progress, intervention=intervention,
                                   forward=forward, kv_cache=kv_cache)
        return res
    if engine not in (None, "auto", "tl_transplant"):
        raise EvaluationError(
            f"engine={engine!r} evaluates lm-eval tasks; task {task.name!r} is a plain Task. "
            "Load the benchmark with tl_transplant.harness.load_task(NAME) and evaluate its "
            "split's .as_task() view, or leave engine out"
        )
    runner = resolve_model(model, side, tokenizer, forward)
    setting = task.prepend_bos if prepend_bos is None else prepend_bos
    if setting is None or (isinstance(setting, str) and setting.strip().lower() in ("auto", "")):
        bos = runner.default_bos
    else:
        bos = resolve_prepend_bos(None, setting)
    metric = get_metric(task.metric)
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
        with maybe_enter(intervention), torch.inference_mode():
            if isinstance(metric, GenerationMetric):
                gens, used = generate_texts(runner, task, bos, batch_size, intervention,
                                            generation, kv_cache, done=bar.update)
                scores, preds = metric.score_generations(task, gens)
            else:
                assert isinstance(metric, LogitMetric)
                scores = _logit_scores(runner, task, metric, bos, batch_size, intervention, bar)
    finally:
        bar.close()
    meta: dict[str, Any] = {"forward": "generate" if metric.generative else forward}
    if metric.generative:
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
        raise EvaluationError(
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
        raise EvaluationError(
            f"retention needs the same control task before and after; got {before.task!r} "
            f"(n={before.n}) and {after.task!r} (n={after.n})"
        )
    ci = paired_diff_ci(before.scores, after.scores, n_boot=n_boot, level=level, seed=seed)
    rel = (
        after.mean / before.mean if is_accuracy(before.metric) and before.mean > 0 else None
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
