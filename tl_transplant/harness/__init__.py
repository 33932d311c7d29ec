"""lm-evaluation-harness tasks as a task source and an evaluator (optional extra ``lm_eval``).

Design note
-----------
How it maps onto tl_transplant:

* **Task source.** :func:`load_task` (spec: ``{lm_eval: NAME, include_path: DIR, dev: {task,
  split, limit}, test: {split, limit}, num_fewshot: N, allow_test_selection, seed, metric}``,
  :class:`HarnessSpec`) reads an lm-eval task through lm-eval's ``TaskManager`` and task
  objects and returns a :class:`HarnessTask` with a ``dev`` and a ``test``
  :class:`HarnessSplit`: the documents, lm-eval's requests for them (its prompts with few-shot
  context from lm-eval's sampler and ``fewshot_random_seed``, continuations or ``until`` /
  ``max_gen_toks``), and the targets. Dev comes from the validation or training split, test
  from the test split the YAML names; they never share a document; dev from a test split is
  refused unless ``allow_test_selection`` (then ``selection_on_test`` is in every meta).
* **Evaluator.** :func:`evaluate_split` runs a model on a split through lm-eval's own
  request -> response -> filters -> ``process_results`` pipeline (``log_samples``) and returns
  the per-document metric as an :class:`~tl_transplant.evaluation.EvalResult` (``task`` =
  ``"NAME:dev"``/``"NAME:test"``, ``metric`` = lm-eval's metric name, ``scores`` = its
  per-document values, whose mean is checked equal to lm-eval's aggregate), so
  ``transplant_metrics`` / ``retention`` / the paired bootstrap work unchanged. The model is
  a ModelSide (``pair.target`` with any transplant applied in place) answered by
  :class:`TLLM` (an lm-eval ``LM``: batched bridge forwards for log-likelihoods, KV-cached
  greedy decoding with lm-eval's stop strings), or by lm-eval's ``HFLM`` (``engine="hflm"``).
* **Differentiable view.** :meth:`HarnessSplit.as_task` is the same documents as a plain
  :class:`~tl_transplant.tasks.Task` (prompt = lm-eval's context; ``mc_logprob`` over
  lm-eval's continuations for multiple choice, ``answer_logprob`` of the continuation or
  target otherwise), which the scorers (attribution, learned_mask, ...) take as any task.
* **engine="lm_eval".** :func:`evaluate_lm_eval` runs ``simple_evaluate`` with
  ``HFLM(pretrained=<in-memory model>)`` on task names and writes lm-eval's JSON; a plain
  ``lm_eval`` run on the exported model with :func:`hflm_model_args` gives equal numbers.
* **Offline.** The miniature tasks in ``tasks/`` (``tl_math500_mini``, ``tl_math_mini``,
  ``tl_mc_mini``) read local JSONL through :func:`tl_transplant.harness.data.local_files`;
  lm-eval 0.4.13 computes ``exact_match`` itself (a port of HF evaluate's), and metrics that
  would need ``evaluate.load`` from the hub are refused at load (``exact_match`` marked
  ``hf_evaluate`` gets lm-eval's local port). Built-in lm-eval tasks fetch their datasets from
  the hub unless they are in the datasets cache.

Where it plugs in:

* Runs: YAML ``task: {lm_eval: NAME, include_path: DIR, dev: {...}, test: {...},
  num_fewshot: N, name: ...}`` and ``control_tasks`` entries of the same form
  (:class:`tl_transplant.pipeline.config.LmEvalTaskConfig`). The run loads them with
  :func:`load_task` and hands the sweep the splits' :class:`~tl_transplant.harness.view.
  HarnessTaskView` s: the scorers read them as plain Tasks; every evaluation of them (dev,
  test, controls, retention) goes through lm-eval (:meth:`HarnessTaskView.evaluate_external`),
  so CIs, TIR, recovery and retention use lm-eval's per-document metric. Dev documents from a
  test split are refused unless ``allow_test_selection`` (then the run's notes, results.json,
  report.html and log say so). The run writes lm-eval's own JSON for source, target and the
  transplanted target under ``lm_eval/``.
* ``evaluate(model, view, engine=None | "lm_eval" | "lm_eval_bridge" | "tl_transplant")``
  (:mod:`tl_transplant.harness.view`); :func:`evaluate_lm_eval` for whole tasks.
* ``tl-transplant eval MODEL_OR_RUN_DIR --tasks a,b`` (:func:`~tl_transplant.harness.compare.
  eval_models`): lm-eval on a model, or a run's source, target and exported model/, writing
  lm-eval's JSON beside ours (``eval.json``, with the paired statistics for a run).

Nothing here imports lm-eval at import time; the first call that needs it raises
:class:`HarnessError` with ``pip install "tl_transplant[lm_eval]"`` when it is missing.
"""

from __future__ import annotations

from typing import Any

from tl_transplant.harness.data import local_files
from tl_transplant.harness.errors import INSTALL_HINT, HarnessError, require_lm_eval
from tl_transplant.harness.run import (
    ENGINES,
    evaluate_lm_eval,
    evaluate_split,
    hflm,
    hflm_model_args,
    per_example,
    write_lm_eval_json,
)
from tl_transplant.harness.source import (
    BINARY_METRICS,
    PACKAGE_TASKS,
    SUPPORTED_OUTPUT_TYPES,
    HarnessSplit,
    HarnessTask,
    find_task,
    load_task,
    task_manager,
)
from tl_transplant.harness.spec import LM_EVAL_FEWSHOT_SEED, HarnessSpec, SplitSpec


def __getattr__(name: str) -> Any:
    if name in ("TLLM", "adds_bos"):  # imports lm-eval
        from tl_transplant.harness import lm

        return getattr(lm, name)
    if name in ("HarnessTaskView", "VIEW_ENGINES"):  # imports the task machinery (torch)
        from tl_transplant.harness import view

        return getattr(view, name)
    if name in ("eval_models", "models_of"):
        from tl_transplant.harness import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BINARY_METRICS",
    "ENGINES",
    "INSTALL_HINT",
    "LM_EVAL_FEWSHOT_SEED",
    "PACKAGE_TASKS",
    "SUPPORTED_OUTPUT_TYPES",
    "TLLM",
    "VIEW_ENGINES",
    "HarnessError",
    "HarnessSpec",
    "HarnessSplit",
    "HarnessTask",
    "HarnessTaskView",
    "SplitSpec",
    "adds_bos",
    "eval_models",
    "evaluate_lm_eval",
    "evaluate_split",
    "find_task",
    "hflm",
    "hflm_model_args",
    "load_task",
    "local_files",
    "models_of",
    "per_example",
    "require_lm_eval",
    "task_manager",
    "write_lm_eval_json",
]
