"""Scoring and selection: which units carry the task.

>>> s = score(pair, task, "attribution", units=("head", "neuron"))   # doctest: +SKIP
>>> with transplant(pair, s.top(8, kinds="head")):                    # doctest: +SKIP
...     ...

Methods (one module each in this package, registered by name):

* ``paper_l1``: the source method's rule for whole linears (|mean L1 of the
  output at the last token, source - target|), optionally over greedy decode steps;
* ``activation_diff``: mean source-target distance of each unit's activation;
* ``attribution``: first-order estimate of the metric change from patching the
  unit's source activation into the target (signed);
* ``activation_patch``: the exact patching effect of each unit (signed); many units
  per forward (replicated batch), ``candidates=`` for a shortlist on large models
  (e.g. ``{"method": "attribution", "top": 200}``; the others get NaN);
* ``attribution_ig``: integrated gradients of the metric along target -> source
  activations of all scored units together (EAP-IG style; ``steps``, ``rule``);
* ``learned_mask``: joint selection: a sigmoid gate per unit on ``W_t + m (W_s - W_t)``,
  trained for task loss + KL to the unedited target + a parameter penalty; ranking by
  gate, ``meta["suggested"]`` = gates > 0.5 (Localize-and-Stitch style);
* ``iterative``: wraps any scorer (``inner=``): pick the top chunk, transplant it
  reversibly, re-score the rest against the edited target, until ``k``/``budget``;
* ``weight_diff``: ``||W_source - W_target||`` over the unit's slices (no data);
* ``random``: seeded random control (no data; ``seed=``); see also :meth:`Scores.bottom`.

Adding a scorer (``docs/adding_a_scorer.md``): subclass :class:`Scorer`, declare
typed ``Options``, implement ``run`` with the kit exported here (data batching,
:class:`UnitTable`/:class:`Accumulator`, :mod:`tl_transplant.models.hooks`), and
``@register`` it; a package can ship one through the ``tl_transplant.scorers``
entry point group.

Retention-aware scoring: ``contrast=other_task`` scores ``score_task - lam *
score_contrast`` with the same method, favouring units that carry the missing
capability but not what the target must keep doing.

Consistency (for the data-based methods): the fraction of prompts on which the
unit's per-prompt score is strictly above the median per-prompt score of all
scored units of the same kind (lower median for an even count).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import pkgutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from tl_transplant.arch.units import (
    UNIT_KINDS,
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitError,
    normalize_kinds,
    parse_unit,
)
from tl_transplant.edit.weights import WEIGHT
from tl_transplant.models.hooks import Handler, HookRunner, capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable, unit_index
from tl_transplant.scoring.data import Context, MetricFn, ScoringData
from tl_transplant.scoring.effects import Delta, Effects
from tl_transplant.scoring.registry import (
    ENTRY_POINT_GROUP,
    SCORERS,
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    WeightRawScores,
    available_methods,
    check_options,
    get_scorer,
    option_help,
    register,
)
from tl_transplant.scoring.scores import Scores
from tl_transplant.scoring.tensors import (
    loaded_param,
    out_weight,
    rows_that_fit,
    take_positions,
    work,
)
from tl_transplant.scoring.weight_scores import WeightScores
from tl_transplant.tasks.tokens import resolve_prepend_bos

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair

#: Modules of this package that are the scorer kit, not scorers.
_KIT = frozenset({"accumulate", "data", "effects", "registry", "scores", "tensors",
                  "weight_scores"})

# Import every scorer module so that each registers itself (a new scorer is one new file).
for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name not in _KIT:
        importlib.import_module(f"{__name__}.{_mod.name}")

_UNITS_HELP = (
    "'head', 'kv_head', 'neuron', 'linear', a tuple of these (e.g. ('head', 'neuron')), "
    "or explicit units such as ['L1.H2', 'L0.N7', 'L3.attn.q_proj']"
)


def _unit_items(units: Any) -> list[Any]:
    if isinstance(units, str):
        return [p for p in units.replace(" ", "").split(",") if p]
    if isinstance(units, (Head, KVHead, Neuron, Linear)):
        return [units]
    try:
        return list(units)
    except TypeError:
        raise ScoringError(f"invalid units {units!r}; valid values are {_UNITS_HELP}") from None


def _resolve_units(pair: ModelPair, units: Any, scorer: type[Scorer]) -> tuple[list[Unit], str]:
    """Turn ``units`` (kinds or explicit units) into the list to score, plus a description."""
    explicit: list[Unit] | None = None
    if units is None:
        wanted = list(scorer.default_kinds)
    else:
        items = _unit_items(units)
        if not items:
            raise ScoringError(f"units is empty; valid values are {_UNITS_HELP}")
        try:
            wanted = list(normalize_kinds([str(x) for x in items]))
            if not all(isinstance(x, str) for x in items):
                raise UnitError("not kind names")
        except UnitError:
            try:
                explicit = list(dict.fromkeys(pair.validate(parse_unit(x)) for x in items))
            except (UnitError, TypeError) as e:
                raise ScoringError(
                    f"invalid units {units!r} ({e}); valid values are {_UNITS_HELP}"
                ) from None
            wanted = sorted({u.kind for u in explicit}, key=UNIT_KINDS.index)
    bad = [k for k in wanted if k not in scorer.kinds]
    if bad:
        raise ScoringError(
            f"{scorer.name} cannot score {bad[0]} units; valid units for {scorer.name}: "
            + ", ".join(scorer.kinds)
        )
    if explicit is not None:
        return explicit, ",".join(str(u) for u in explicit)
    return pair.units(wanted), "+".join(wanted)


def _as_data(pair: ModelPair, task_or_prompts: Any, prepend_bos: Any, scorer: type[Scorer],
             role: str = "task") -> ScoringData | None:
    if task_or_prompts is None:
        if scorer.needs_data:
            raise ScoringError(
                f"{scorer.name} needs data: pass a Task or a list of prompt strings as {role}"
            )
        return None
    if isinstance(task_or_prompts, str):
        task_or_prompts = [task_or_prompts]
    if hasattr(task_or_prompts, "prompts"):
        prompts = list(task_or_prompts.prompts)
        answers = getattr(task_or_prompts, "answers", None)
        answers = None if answers is None else list(answers)
        name = str(getattr(task_or_prompts, "name", "task"))
        bos = resolve_prepend_bos(pair, getattr(task_or_prompts, "prepend_bos", "auto"))
    elif isinstance(task_or_prompts, Sequence) and all(isinstance(p, str) for p in task_or_prompts):
        prompts, answers, name = list(task_or_prompts), None, "prompts"
        bos = resolve_prepend_bos(pair, prepend_bos)
    else:
        raise ScoringError(
            f"{role} must be a Task or a list of prompt strings, got "
            f"{type(task_or_prompts).__name__}"
        )
    if not prompts:
        raise ScoringError(f"{role} has no prompts")
    if answers is not None and len(answers) != len(prompts):
        raise ScoringError(f"{role}: {len(prompts)} prompts but {len(answers)} answers")
    if scorer.needs_answers and answers is None:
        raise ScoringError(
            f"{scorer.name} needs answers (its metric is the answer log-prob): pass a Task "
            f"with answers as {role}, not plain prompts"
        )
    return ScoringData(name, prompts, answers, bos)


def _is_weight_grain(units: Any) -> bool:
    """``units="weight"`` (or ``["weight"]``): score individual weights; mixing is refused."""
    if units is None or isinstance(units, (Head, KVHead, Neuron, Linear)):
        return False
    items = _unit_items(units)
    has = [str(x).strip().lower() in (WEIGHT, "weights") for x in items]
    if any(has) and not all(has):
        raise ScoringError(
            "units mixes 'weight' with unit kinds or units; score weights in a call of their "
            "own (units='weight') and units in another"
        )
    return bool(items) and all(has)


@overload
def score(
    pair: ModelPair,
    task_or_prompts: Any,
    method: str,
    units: Literal["weight"],
    *,
    batch_size: int = 8,
    progress: bool = True,
    contrast: Any = None,
    lam: float = 1.0,
    metric: MetricFn | None = None,
    prepend_bos: bool | str = "auto",
    seed: int = 0,
    **options: Any,
) -> WeightScores: ...


@overload
def score(
    pair: ModelPair,
    task_or_prompts: Any,
    method: str,
    units: str | Iterable[str | Unit] | Unit | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    contrast: Any = None,
    lam: float = 1.0,
    metric: MetricFn | None = None,
    prepend_bos: bool | str = "auto",
    seed: int = 0,
    **options: Any,
) -> Scores: ...


def score(
    pair: ModelPair,
    task_or_prompts: Any,
    method: str,
    units: str | Iterable[str | Unit] | Unit | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    contrast: Any = None,
    lam: float = 1.0,
    metric: MetricFn | None = None,
    prepend_bos: bool | str = "auto",
    seed: int = 0,
    **options: Any,
) -> Scores | WeightScores:
    """Score units of ``pair`` on a task (or plain prompts) with one method.

    ``units``: unit kind(s) (``"head"``, ``"kv_head"``, ``"neuron"``, ``"linear"``
    or a tuple) or explicit units; ``None`` means the method's default kinds.
    ``contrast``/``lam``: retention-aware scoring, ``score - lam * score_on_contrast``.
    ``metric``: ``f(logits, encoded) -> [batch]`` for attribution/activation_patch
    (default: summed answer log-prob). ``prepend_bos`` applies to plain prompts (a
    Task carries its own). ``seed``: the run's seed, given to every method (the
    ``random`` control draws from it; the others ignore it). Method options go in
    ``**options``, validated against the method's ``Options`` before any model
    runs (e.g. ``positions="answer"``, ``decode_steps=8``, ``alpha=0.5``).
    Scores do not depend on ``batch_size`` (up to float rounding).

    ``units="weight"`` scores every individual weight of the block linears with a
    weight-level method (``weight_level``; see :mod:`tl_transplant.edit.weights`) and returns
    :class:`~tl_transplant.scoring.weight_scores.WeightScores` instead of :class:`Scores`.
    """
    cls = get_scorer(method)
    if _is_weight_grain(units):
        return _score_weights(pair, task_or_prompts, cls, batch_size=batch_size,
                              progress=progress, contrast=contrast, lam=lam, metric=metric,
                              prepend_bos=prepend_bos, seed=seed, options=options)
    if not cls.unit_level:
        raise ScoringError(
            f"{method} scores individual weights only; call it with units='weight'"
        )
    opts = check_options(cls, options)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScoringError(f"seed must be an int, got {seed!r}")
    unit_list, unit_desc = _resolve_units(pair, units, cls)
    data = _as_data(pair, task_or_prompts, prepend_bos, cls)
    cdata = None
    if contrast is not None:
        if not cls.needs_data:
            raise ScoringError(
                f"contrast= needs a data-based method; {method} does not look at data, so its "
                "score on a contrast task would equal its task score"
            )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ScoringError(f"lam must be a finite number, got {lam!r}")
        cdata = _as_data(pair, contrast, prepend_bos, cls, role="contrast")
    if metric is not None and not callable(metric):
        raise ScoringError("metric must be a callable f(logits, encoded) -> per-example tensor")
    ctx = Context(pair=pair, batch_size=batch_size, progress=progress, metric=metric, seed=seed)
    scorer = cls(ctx, opts)
    scorer.check()
    raw: RawScores = scorer.run(unit_list, data)
    if cdata is not None:
        raw = scorer.combine(raw, scorer.run(unit_list, cdata), float(lam))
    d = pair.layout.dims
    meta: dict[str, Any] = {
        "method": method,
        "signed": cls.signed,
        "options": opts.model_dump(),
        "units": unit_desc,
        "task": None if data is None else data.name,
        "n_prompts": None if data is None else len(data),
        "prepend_bos": None if data is None else data.prepend_bos,
        "batch_size": batch_size,
        "seed": seed,
        "metric": None if not cls.needs_answers else getattr(metric, "__name__", "answer_logprob"),
        "contrast": None if cdata is None else cdata.name,
        "lam": None if cdata is None else float(lam),
        "source": pair.source.name,
        "target": pair.target.name,
        "family": pair.layout.family.family,
        "dims": {"n_layers": d.n_layers, "H": d.H, "KV": d.KV, "dh": d.dh, "D": d.D, "I": d.I},
        "linear_names": pair.layout.linear_names(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **raw.meta,
    }
    return Scores(unit_list, raw.values, method=method, consistency=raw.consistency,
                  columns=raw.columns, meta=meta, budget_rule=raw.budget_rule,
                  suggested=raw.suggested, alpha_scale=raw.alpha_scale,
                  dense_alphas=raw.dense_alphas)


def _check_common(batch_size: Any, seed: Any, metric: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScoringError(f"seed must be an int, got {seed!r}")
    if metric is not None and not callable(metric):
        raise ScoringError("metric must be a callable f(logits, encoded) -> per-example tensor")


def _score_weights(
    pair: ModelPair, task_or_prompts: Any, cls: type[Scorer], *, batch_size: int, progress: bool,
    contrast: Any, lam: float, metric: MetricFn | None, prepend_bos: bool | str, seed: int,
    options: dict[str, Any],
) -> WeightScores:
    """:func:`score` at the weight grain: one score per weight of every block linear."""
    if not cls.weight_level:
        ok = ", ".join(m for m in available_methods() if m in SCORERS and SCORERS[m].weight_level)
        raise ScoringError(
            f"{cls.name} cannot score individual weights; weight-level methods: {ok}"
        )
    opts = check_options(cls, options)
    _check_common(batch_size, seed, metric)
    data = _as_data(pair, task_or_prompts, prepend_bos, cls)
    cdata = None
    if contrast is not None:
        if not cls.needs_data:
            raise ScoringError(
                f"contrast= needs a data-based method; {cls.name} does not look at data"
            )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ScoringError(f"lam must be a finite number, got {lam!r}")
        cdata = _as_data(pair, contrast, prepend_bos, cls, role="contrast")
    ctx = Context(pair=pair, batch_size=batch_size, progress=progress, metric=metric, seed=seed)
    scorer = cls(ctx, opts)
    scorer.check()
    raw: WeightRawScores = scorer.run_weights(data)
    if cdata is not None:
        raw = scorer.combine_weights(raw, scorer.run_weights(cdata), float(lam))
    want = pair.layout.unit_tensors()
    missing = [n for n in want if n not in raw.values]
    if missing or set(raw.values) - set(want):
        raise ScoringError(
            f"{cls.name}.run_weights must score exactly the block linears' tensors "
            f"(layout.unit_tensors()); missing {missing[:2]}"
        )
    for n, v in raw.values.items():
        if tuple(v.shape) != tuple(pair.layout.shapes[n]):
            raise ScoringError(f"{cls.name}: scores of {n} have shape {tuple(v.shape)}, "
                               f"the tensor's is {tuple(pair.layout.shapes[n])}")
    d = pair.layout.dims
    meta: dict[str, Any] = {
        "method": cls.name,
        "grain": WEIGHT,
        "signed": cls.signed,
        "options": opts.model_dump(),
        "units": WEIGHT,
        "task": None if data is None else data.name,
        "n_prompts": None if data is None else len(data),
        "prepend_bos": None if data is None else data.prepend_bos,
        "batch_size": batch_size,
        "seed": seed,
        "metric": None if not cls.needs_answers else getattr(metric, "__name__", "answer_logprob"),
        "contrast": None if cdata is None else cdata.name,
        "lam": None if cdata is None else float(lam),
        "source": pair.source.name,
        "target": pair.target.name,
        "family": pair.layout.family.family,
        "dims": {"n_layers": d.n_layers, "H": d.H, "KV": d.KV, "dh": d.dh, "D": d.D, "I": d.I},
        "linear_names": pair.layout.linear_names(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **raw.meta,
    }
    meta.pop("suggested", None)  # WeightScores records the typed set's summary
    return WeightScores(raw.values, method=cls.name, meta=meta, suggested=raw.suggested,
                        budget_rule=raw.budget_rule, alpha_scale=raw.alpha_scale)


__all__ = [
    "ENTRY_POINT_GROUP",
    "SCORERS",
    "Accumulator",
    "Context",
    "Delta",
    "Effects",
    "Handler",
    "HookRunner",
    "MetricFn",
    "RawScores",
    "Scorer",
    "ScorerOptions",
    "Scores",
    "ScoringData",
    "ScoringError",
    "UnitTable",
    "WeightRawScores",
    "WeightScores",
    "available_methods",
    "capturer",
    "check_options",
    "get_scorer",
    "loaded_param",
    "option_help",
    "out_weight",
    "rows_that_fit",
    "register",
    "score",
    "take_positions",
    "unit_index",
    "work",
]
