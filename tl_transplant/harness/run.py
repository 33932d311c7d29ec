"""Run lm-eval on a tl_transplant model and turn its per-document metrics into EvalResults.

* :func:`evaluate_split`: one :class:`~tl_transplant.harness.source.HarnessSplit` through
  lm-eval's own pipeline (requests -> model -> filters -> ``process_results``) with
  ``log_samples``; the per-document values of the chosen metric become an
  :class:`~tl_transplant.evaluation.evaluator.EvalResult` (paired bootstrap, TIR, recovery,
  retention work on it unchanged). ``engine="tl"`` answers the requests with :class:`TLLM` (the
  bridge; hooks apply); ``engine="hflm"`` with lm-eval's own ``HFLM`` over the same tensors.
* :func:`evaluate_lm_eval`: ``simple_evaluate`` with ``HFLM(pretrained=<the in-memory HF
  model>)`` (no export round trip; KV-cached generation) on whole lm-eval tasks, writing
  lm-eval's own result JSON. :func:`hflm_model_args` gives the arguments with which a plain
  ``lm_eval`` run on the exported model reproduces those numbers exactly.

Equality with a plain run needs the same dtype (pass the in-memory one; HFLM's
``dtype="auto"`` follows the checkpoint's config), the same attention implementation
(tl_transplant loads models with ``attn_implementation="eager"``; a plain HFLM load picks
``sdpa``) and the same batch size (padding and batch shapes can change float rounding);
:func:`hflm_model_args` returns all three. Measured on the tiny Llama of the tests (float32,
a transplant applied): with them, every log-likelihood is bit-equal; batch sizes 1, 2 and 4
were bit-equal there too, ``sdpa`` moved log-likelihoods by up to 4.8e-7 and bfloat16 by
0.026 (accuracies unchanged on those 10 documents).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.harness.errors import HarnessError, require_lm_eval
from tl_transplant.harness.source import HarnessSplit, task_manager

if TYPE_CHECKING:
    from tl_transplant.evaluation.evaluator import EvalResult
    from tl_transplant.models.pair import ModelPair, ModelSide

ENGINES = ("tl", "hflm")


def _side(model: ModelSide | ModelPair, side: str | None) -> ModelSide:
    m: Any = model
    if hasattr(m, "source") and hasattr(m, "target") and hasattr(m, "layout"):
        if side not in ("source", "target"):
            raise HarnessError("got a ModelPair; pass side='source' or side='target'")
        m = getattr(m, side)
    if not (hasattr(m, "hf") and hasattr(m, "tokenizer") and hasattr(m, "bridge")):
        raise HarnessError(
            f"expected a tl_transplant ModelSide or ModelPair, got {type(model).__name__}"
        )
    return m


@contextlib.contextmanager
def _keep_global_rng() -> Iterator[None]:
    """``simple_evaluate`` seeds python's, numpy's and torch's global generators (lm-eval's
    defaults, kept for comparability); the caller's generator states are restored after."""
    import random

    import torch

    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


def _param_ids(model: Any) -> dict[str, int]:
    return {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}


def hflm(side: ModelSide, *, batch_size: int = 1, **kwargs: Any) -> Any:
    """lm-eval's ``HFLM`` over ``side``'s HF modules, unwrapped from the bridge
    (:func:`tl_transplant.models.decoding.plain_model`: the very tensors transplants edit, so an
    applied transplant is what it evaluates; HF's KV cache works there). The tokenizer is a
    copy (HFLM may set a pad token)."""
    import copy

    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from tl_transplant.models.decoding import plain_model

    model = plain_model(side.hf)
    before = _param_ids(model)
    import logging

    quiet = logging.getLogger("lm_eval")  # its warnings that an in-memory model was passed
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(side.tokenizer),
                  batch_size=batch_size, **kwargs)
    finally:
        quiet.setLevel(level)
    if _param_ids(model) != before:
        raise HarnessError(
            "HFLM re-tied or replaced parameters of the in-memory model; its numbers would not "
            "be the transplanted model's"
        )
    return lm


def hflm_model_args(side: ModelSide, path: str | Path, *, batch_size: int = 1) -> dict[str, Any]:
    """``model_args`` for a plain ``lm_eval`` HFLM run on ``side`` exported to ``path`` that
    reproduces :func:`evaluate_lm_eval`'s numbers: same dtype, attention and batch size."""
    import torch

    dtype = next(side.hf.parameters()).dtype
    attn = getattr(side.config, "_attn_implementation", None) or "eager"
    return {
        "pretrained": str(path),
        "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype,
        "attn_implementation": attn,
        "device": str(side.device),
        "batch_size": batch_size,
    }


def _run(lm: Any, split: HarnessSplit, bootstrap_iters: int) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate

    task = split.lm_task
    task.set_fewshot_seed(seed=split.seed)  # the contexts read at load time, again
    name = task.task_name
    out = evaluate(
        lm=lm,
        task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
        samples={name: list(split.doc_ids)},
        log_samples=True,
        bootstrap_iters=bootstrap_iters,
    )
    if out is None:
        raise HarnessError("lm-eval returned no results (not rank 0)")
    return dict(out)


def per_example(out: Mapping[str, Any], split: HarnessSplit) -> tuple[np.ndarray, list[dict]]:
    """The chosen metric's per-document values from lm-eval's logged samples, in
    ``split.doc_ids`` order, checked against lm-eval's own aggregate (their mean)."""
    name = split.lm_task.task_name
    rows = [s for s in out["samples"][name] if s["filter"] == split.filter]
    by_id = {int(s["doc_id"]): s for s in rows}
    missing = [d for d in split.doc_ids if d not in by_id]
    if missing:
        raise HarnessError(f"{split.label}: lm-eval logged no sample for documents {missing[:5]}")
    samples = [by_id[d] for d in split.doc_ids]
    if any(split.metric not in s for s in samples):
        raise HarnessError(f"{split.label}: some documents have no {split.metric!r} value")
    scores = np.array([float(s[split.metric]) for s in samples], dtype=np.float64)
    agg = float(out["results"][name][split.metric_key])
    if not np.isclose(scores.mean(), agg, rtol=1e-9, atol=1e-12):
        raise HarnessError(
            f"{split.label}: mean of per-document {split.metric} ({scores.mean()}) differs from "
            f"lm-eval's aggregate ({agg})"
        )
    return scores, samples


def _check_contexts(samples: list[dict], split: HarnessSplit) -> None:
    for s, want in zip(samples, split.requests):
        got = [tuple(a) for a in s["arguments"]]
        if [g[0] for g in got] != [w[0] for w in want]:
            raise HarnessError(
                f"{split.label}: lm-eval built other prompts than were read for document "
                f"{s['doc_id']}; the few-shot sampler is not reproducible for this task"
            )


def evaluate_split(
    model: ModelSide | ModelPair | Any,
    split: HarnessSplit,
    *,
    side: str | None = None,
    engine: str = "tl",
    batch_size: int = 16,
    intervention: contextlib.AbstractContextManager[object] | None = None,
    add_bos_token: bool | None = None,
    forward: str = "bridge",
    kv_cache: bool = True,
    progress: bool = False,
    bootstrap_iters: int = 0,
    output_path: str | Path | None = None,
) -> EvalResult:
    """Score ``split``'s documents through lm-eval's pipeline; per-document values as an
    :class:`~tl_transplant.evaluation.evaluator.EvalResult`.

    ``model``: a ModelSide (``pair.target``, transplant applied in place), a ModelPair with
    ``side=``, or an lm-eval ``LM`` instance (used as is). ``engine``: ``"tl"`` (:class:`TLLM`)
    or ``"hflm"`` (lm-eval's HFLM on the unwrapped HF modules; hooks are not seen).
    ``forward`` / ``kv_cache``: :class:`TLLM`'s (``meta["forward"]`` / ``meta["kv_cache"]``
    say what ran).
    ``intervention``: a context manager entered around the run (e.g. an activation patch).
    ``output_path``: a folder for lm-eval's own JSON (:func:`write_lm_eval_json`).
    ``meta["lm_eval"]`` holds lm-eval's aggregate and results, the metric key and, for
    log-likelihood tasks, each document's per-request log-likelihoods; ``meta["split"]`` the
    documents and whether selection used test documents; ``predictions`` are the filtered
    responses of ``generate_until`` tasks and ``generations`` their raw text.
    """
    require_lm_eval()
    from lm_eval.api.model import LM

    from tl_transplant.evaluation.evaluator import EvalResult

    if engine not in ENGINES:
        raise HarnessError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "hflm" and intervention is not None:
        raise HarnessError(
            "engine='hflm' runs the unwrapped HF modules, where TransformerLens hooks and "
            "activation patches do not apply; use engine='tl' with an intervention"
        )
    if isinstance(model, LM):
        lm, model_name = model, type(model).__name__
    else:
        s = _side(model, side)
        model_name = str(s.name)
        if engine == "tl":
            from tl_transplant.harness.lm import TLLM

            lm = TLLM(s, batch_size=batch_size, add_bos_token=add_bos_token, forward=forward,
                      kv_cache=kv_cache, progress=progress)
        else:
            kw = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
            lm = hflm(s, batch_size=batch_size, **kw)
    with intervention if intervention is not None else contextlib.nullcontext():
        out = _run(lm, split, bootstrap_iters)
    scores, samples = per_example(out, split)
    _check_contexts(samples, split)
    gens = preds = None
    lls: list[list[float]] | None = None
    if split.output_type == "generate_until":
        gens = [str(s["resps"][0][0]) for s in samples]
        preds = [str(s["filtered_resps"][0]) for s in samples]
    else:  # each request's (loglikelihood, is_greedy)
        lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    name = split.lm_task.task_name
    meta: dict[str, Any] = {
        "engine": engine if not isinstance(model, LM) else "custom",
        "split": split.meta(),
        "lm_eval": {
            "task": name,
            "metric": split.metric_key,
            "aggregate": float(out["results"][name][split.metric_key]),
            "results": out["results"][name],
            "n-shot": out.get("n-shot", {}).get(name),
            "version": out.get("versions", {}).get(name),
            "loglikelihoods": lls,
        },
        "selection_on_test": split.selection_on_test,
    }
    if getattr(lm, "used_cache", None):
        used = lm.used_cache
        meta["kv_cache"] = "cached" if all(used) else "uncached" if not any(used) else "mixed"
    if getattr(lm, "used_forward", None):
        kinds = set(lm.used_forward)
        meta["forward"] = kinds.pop() if len(kinds) == 1 else "mixed"
    if output_path is not None:
        meta["lm_eval"]["json"] = str(write_lm_eval_json(out, output_path, model=model_name))
    return EvalResult(
        task=split.label,
        metric=split.metric,
        model=model_name,
        scores=scores,
        prepend_bos=_bos(lm),
        generations=gens,
        predictions=preds,
        meta=meta,
    )


def _bos(lm: Any) -> bool:
    """Whether the LM's tokenization started each prompt with BOS (HFLM's rules)."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return False
    from tl_transplant.harness.lm import adds_bos

    return adds_bos(tok, getattr(lm, "add_bos_token", None))


def write_lm_eval_json(out: Mapping[str, Any], folder: str | Path, *, model: str = "") -> Path:
    """lm-eval's output as its CLI lays it out: ``results.json`` (everything but the samples)
    and ``samples_<task>.jsonl`` (one logged sample per line) in ``folder``."""
    from lm_eval.utils import handle_non_serializable

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    agg = {k: v for k, v in out.items() if k != "samples"}
    if model:
        agg.setdefault("config", {}).setdefault("model", model)
    path = folder / "results.json"
    path.write_text(json.dumps(agg, indent=2, default=handle_non_serializable,
                               ensure_ascii=False))
    for task, rows in (out.get("samples") or {}).items():
        with open(folder / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def evaluate_lm_eval(
    model: ModelSide | ModelPair,
    tasks: Sequence[str],
    *,
    side: str | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    fewshot_random_seed: int = 1234,
    bootstrap_iters: int = 0,
    output_path: str | Path | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the in-memory HF model (``engine="lm_eval"``).

    Runs ``HFLM(pretrained=<side's HF modules>)`` (:func:`hflm`) on lm-eval task names, with
    a transplant applied in place if there is one; writes lm-eval's JSON to ``output_path``
    (:func:`write_lm_eval_json`) and returns lm-eval's result dict. A plain ``lm_eval`` run
    on the exported model with :func:`hflm_model_args` gives the same numbers. lm-eval's
    global seeding is undone on return (the caller's random states are kept).
    """
    require_lm_eval()
    from lm_eval.evaluator import simple_evaluate

    from tl_transplant.harness.spec import _paths

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HarnessError(f"limit must be a positive integer, got {limit!r}")
    s = _side(model, side)
    tm = task_manager(_paths(include_path), include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        from tl_transplant.harness.source import find_task

        find_task(unknown[0], _paths(include_path), include_defaults)  # raises, naming matches
    lm = hflm(s, batch_size=batch_size)
    with _keep_global_rng():
        out = simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
            task_manager=tm, log_samples=True, bootstrap_iters=bootstrap_iters,
            fewshot_random_seed=fewshot_random_seed, **simple_evaluate_kwargs,
        )
    if out is None:
        raise HarnessError("lm-eval returned no results (not rank 0)")
    out = dict(out)
    if output_path is not None:
        write_lm_eval_json(out, output_path, model=str(s.name))
    return out


__all__ = [
    "ENGINES",
    "evaluate_lm_eval",
    "evaluate_split",
    "hflm",
    "hflm_model_args",
    "per_example",
    "write_lm_eval_json",
]
