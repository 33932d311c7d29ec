"""Stages of :func:`tl_transplant.run` that are more than a call: scoring every method at
its grains, and the ``results.json`` of a finished sweep.

* :func:`score_runs`: every ``selection.methods`` entry at each grain it runs at
  (:meth:`~tl_transplant.pipeline.config.SelectionConfig.runs`: ``attribution``,
  ``attribution@weight``, ``magnitude``, ``dense``), plus the controls that are not
  methods; writes ``scores_<label>.json`` for each method (a weight-level method's
  :meth:`~tl_transplant.edit.weights.WeightScores.unit_view`: per-head/neuron sums, an
  ordinary Scores file; never the full weight scores; ``dense`` has none).
* :func:`run_results`: the run's ``results.json`` from a
  :class:`~tl_transplant.sweeps.protocol.SweepResult` (keys :data:`RESULT_KEYS`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.edit.weights import WEIGHT
from tl_transplant.sweeps.search import mask_summary

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.pipeline.config import MethodRun, RunConfig
    from tl_transplant.sweeps.protocol import SweepResult
    from tl_transplant.tasks.task import Task

#: The keys of a run's ``results.json``, in order.
RESULT_KEYS = ("baselines", "best", "test", "controls", "retention", "retention_control",
               "fraction_params", "fraction_units", "comparison", "searched", "selection",
               "notes")


def _score_one(pair: ModelPair, dev: Task, run: MethodRun, cfg: RunConfig, *,
               progress: bool, extra: dict[str, Any]) -> Any:
    from tl_transplant.scoring import score

    units: Any = {"dense": "linear", WEIGHT: WEIGHT}.get(
        run.grain, cfg.selection.kinds_for(run.method))
    return score(pair, dev, method=run.method, units=units, progress=progress,
                 batch_size=cfg.batch_size, seed=cfg.seed, **extra,
                 **cfg.selection.options.get(run.method, {}))


def score_runs(
    pair: ModelPair,
    dev: Task,
    cfg: RunConfig,
    *,
    contrast: Task | None = None,
    progress: bool = True,
    log: Callable[..., Any] = print,
    save_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score every method (at each grain) on dev; returns ``({label: scores}, {label:
    control scores})``. The controls are ``selection.controls`` at their grains
    (``random`` with ``units: [head, neuron, weight]`` is ``random`` and ``random@weight``);
    a control that is also a method shares its scores. ``contrast`` (retention-aware
    scoring) goes to the data-based methods only."""
    from tl_transplant.scoring import get_scorer

    sel = cfg.selection
    runs = sel.runs("methods")
    scores: dict[str, Any] = {}
    for r in runs:
        needs = get_scorer(r.method).needs_data
        extra: dict[str, Any] = (
            {"contrast": contrast, "lam": sel.contrast_lambda}
            if contrast is not None and needs and r.grain != "dense" else {}
        )
        where = {"dense": "every block weight", WEIGHT: "single weights"}.get(
            r.grain, "units " + ",".join(sel.kinds_for(r.method)))
        log(f"scoring {r.label} on dev ({len(dev)} examples, {where})")
        scores[r.label] = _score_one(pair, dev, r, cfg, progress=progress, extra=extra)
        if save_dir is not None and r.grain != "dense":
            s = scores[r.label]
            if r.grain == WEIGHT:
                s = s.unit_view(pair.layout, sel.unit_kinds or ("head", "neuron"))
            s.save(save_dir / f"scores_{r.label}.json")
    ctrl: dict[str, Any] = {}
    for r in sel.runs("controls"):
        if r.label not in scores:
            log(f"scoring control {r.label}")
        ctrl[r.label] = scores.get(r.label) or _score_one(pair, dev, r, cfg, progress=False,
                                                           extra={})
    return scores, ctrl


def run_results(res: SweepResult, n_search: int) -> dict[str, Any]:
    """``results.json`` of a run from its sweep: baselines, the choice and its test
    numbers, the parameter-matched controls (both sizes), retention, sizes, the
    comparison, what was searched, how much to trust the choice, and the notes."""
    base_test = res.baselines.get("test", {})
    base_dev = res.baselines["dev"]
    baselines = {side: {"dev": base_dev[side].mean,
                        "test": base_test[side].mean if side in base_test else None}
                 for side in ("source", "target")}
    d = res.to_dict()
    out: dict[str, Any] = {"baselines": baselines}
    best = res.best
    ret_info = res.config.get("retention", {})
    if best is None or best.test is None:
        out.update(best=None, test=None, controls={}, retention=[],
                   retention_control=ret_info, fraction_params=0.0, fraction_units=0.0)
    else:
        met = best.test.metrics
        out["best"] = {
            "method": best.method, "grain": best.grain, "pct_params": best.pct_params,
            "pct_units": best.pct_units, "budget": best.budget, "k": best.k,
            "alpha": best.alpha, "effective_alpha": best.effective_alpha,
            "extrapolates": best.extrapolates, "n_params": best.n_params,
            "units": list(best.units),
            "mask": None if best.mask is None else mask_summary(best.mask),
            "dev_metric": best.metric,
        }
        out["test"] = {"transplanted": met.transplanted, "tir": met.tir,
                       "recovery": met.recovery,
                       "ci": {k: (list(v) if v is not None else None)
                              for k, v in met.ci.items()}}
        out["controls"] = d["verdict"]["controls"]
        out["retention"] = [
            {"task": r.task, "before": r.before, "after": r.after, "drop": r.drop}
            for r in best.test.retention
        ]
        out["retention_control"] = ret_info
        out["fraction_params"] = best.pct_params or 0.0
        out["fraction_units"] = (best.k / n_search if best.grain == "unit" and n_search
                                 else None)
    out["comparison"] = d.get("comparison")
    out["searched"] = d.get("searched")
    out["selection"] = d["verdict"]["selection"]
    out["notes"] = d.get("notes", [])
    assert tuple(out) == RESULT_KEYS, tuple(out)
    return out


__all__ = ["RESULT_KEYS", "run_results", "score_runs"]
