"""``tl-transplant eval MODEL_OR_RUN_DIR --tasks ...``: lm-eval on a model, or on a run's
source, target and transplanted target, with lm-eval's JSON beside ours.

:func:`eval_models` runs :func:`~tl_transplant.harness.run.evaluate_lm_eval` (lm-eval's
``simple_evaluate`` with ``HFLM`` over the in-memory model) on each model and writes

* ``lm_eval/<who>/results.json`` and ``samples_<task>.jsonl``: lm-eval's own output;
* ``eval.json`` (ours): every task's lm-eval metrics per model and, for a run directory, the
  paired statistics of the transplant (:func:`~tl_transplant.evaluation.evaluator.
  transplant_metrics` on lm-eval's per-document values: delta, TIR, recovery with paired
  bootstrap CIs) for each per-document metric.

A run directory (``config.json`` + ``transplant_manifest.json``, as ``tl-transplant run``
writes it) gives ``source`` and ``target`` from its config and ``transplanted`` from its
exported ``model/``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tl_transplant.harness.errors import HarnessError

RUN_FILES = ("config.json", "transplant_manifest.json")


def models_of(path: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``({who: model spec}, load options)`` for a model (``{"model": path}``) or a run dir."""
    p = Path(path).expanduser()
    if not (p.is_dir() and all((p / f).is_file() for f in RUN_FILES)):
        return {"model": str(path)}, {}
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HarnessError(f"{p / 'config.json'} is not a run's config ({e})") from e
    if not isinstance(cfg, dict) or not {"source", "target"} <= set(cfg):
        raise HarnessError(f"{p / 'config.json'} names no source and target; not a run folder")
    if not (p / "model").is_dir():
        raise HarnessError(
            f"run {p} has no exported model/ (it ran with export: false, or chose no "
            "transplant); export it with tl-transplant apply --manifest "
            f"{p / 'transplant_manifest.json'}, then evaluate that folder"
        )
    dtype = cfg.get("dtype")
    opts = {"dtype": None if dtype in (None, "auto") else dtype}
    return {"source": str(cfg["source"]), "target": str(cfg["target"]),
            "transplanted": str(p / "model")}, opts


def _per_doc(out: Mapping[str, Any], task: str, metric_key: str) -> np.ndarray | None:
    metric, _, filt = metric_key.partition(",")
    rows = [s for s in (out.get("samples") or {}).get(task, []) if s.get("filter") == filt]
    if not rows or any(metric not in s for s in rows):
        return None
    rows.sort(key=lambda s: int(s["doc_id"]))
    try:
        return np.array([float(s[metric]) for s in rows], dtype=np.float64)
    except (TypeError, ValueError):  # e.g. perplexity's (loglikelihood, length) pairs
        return None


def _summary(outs: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    from tl_transplant.evaluation.evaluator import transplant_metrics

    summary: dict[str, Any] = {}
    for task in tasks:
        entry: dict[str, Any] = {}
        for who, out in outs.items():
            res = dict(out["results"].get(task, {}))
            entry[who] = {k: v for k, v in res.items()
                          if k != "alias" and "_stderr" not in k and isinstance(v, (int, float))}
        if {"source", "target", "transplanted"} <= set(outs):
            paired: dict[str, Any] = {}
            for key in entry["target"]:
                tgt, tr, src = (_per_doc(outs[w], task, key)
                                for w in ("target", "transplanted", "source"))
                if tgt is None or tr is None or src is None:
                    continue
                m = transplant_metrics(tgt, tr, src, metric=key.partition(",")[0], warn=False)
                paired[key] = m.to_dict()
            entry["paired"] = paired
        summary[task] = entry
    return summary


def eval_models(
    model_or_run: str | Path,
    tasks: Sequence[str],
    out: str | Path,
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    log: Any = print,
) -> dict[str, Any]:
    """lm-eval on a model or a run's three models; writes lm-eval's JSON and ``eval.json``
    under ``out`` and returns what ``eval.json`` holds."""
    from tl_transplant.harness.run import evaluate_lm_eval
    from tl_transplant.models.side import ModelSide

    if not tasks:
        raise HarnessError("--tasks: name at least one lm-eval task")
    models, opts = models_of(model_or_run)
    out = Path(out)
    outs: dict[str, dict[str, Any]] = {}
    for who, spec in models.items():
        log(f"lm-eval on the {who} ({spec}): {', '.join(tasks)}")
        side = ModelSide.load(spec, device=device, role=who, **opts)
        outs[who] = evaluate_lm_eval(
            side, list(tasks), include_path=include_path, include_defaults=include_defaults,
            num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
            output_path=out / "lm_eval" / who)
        del side
    doc = {"models": models, "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
           "engine": "lm_eval (HFLM over the in-memory model)",
           "lm_eval_json": {w: str(out / "lm_eval" / w / "results.json") for w in models},
           "results": _summary(outs, tasks)}
    (out / "eval.json").write_text(json.dumps(doc, indent=2, default=str))
    return doc


__all__ = ["eval_models", "models_of"]
