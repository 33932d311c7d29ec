"""The whole pipeline as one call: ``tl_transplant.run(config, out_dir)``.

load pair -> load tasks (dev/test) -> score units (and single weights) on **dev** with
each method (:func:`tl_transplant.pipeline.stages.score_runs`) -> (K, budget, suggested set,
dense) x alpha sweep on dev (best config chosen there, subject to the retention
constraint and the largest budget) -> report that one config on **test** with CIs,
controls filled to its parameter count (:mod:`tl_transplant.sweeps.verdict`), retention and a
selection-corrected dev estimate -> apply it permanently (units or a weight mask) ->
export. The CLI's ``run`` and ``demo`` are thin shells over this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_transplant.errors import OutputError, os_reason
from tl_transplant.io.export import commit_out_dir, discard_out_dir, prepare_out_dir
from tl_transplant.pipeline.config import RunConfig, load_config
from tl_transplant.pipeline.plan import check_memory_plan
from tl_transplant.pipeline.result import RunResult
from tl_transplant.pipeline.resume import RunStore, run_key
from tl_transplant.pipeline.stages import (
    RESULT_KEYS,
    apply_choice,
    export_choice,
    lm_eval_tests,
    load_inputs,
    load_task_splits,
    score_methods,
    sweep_on_dev,
    write_lm_eval_outputs,
    write_results,
    write_run_report,
    write_sweep_files,
)
from tl_transplant.report.text import format_table


def run(
    config: str | Path | dict[str, Any] | RunConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    report: bool = True,
    log: Any = print,
    check_tokenizer: bool = True,
    check_finite: bool = True,
    allow_pickle: bool = False,
    overrides: dict[str, Any] | None = None,
    check_memory: bool = True,
    resume: bool = False,
) -> RunResult:
    """Run the pipeline described by ``config`` and write everything under ``out_dir``.

    Output: ``results.json`` (:class:`~tl_transplant.sweeps.records.Results`, keys
    :data:`RESULT_KEYS`; ``fraction_params`` is of the block parameters, see
    :mod:`tl_transplant.edit.budget`), ``sweep.csv``, ``sweep.png``, ``sweep.json``,
    ``scores_<label>.json`` (a weight-level method's per-unit view), ``transplant_manifest.json``
    (with the mask file of a weight-level winner), ``model/`` (if
    ``export``) and ``report.html``. Written to a temporary sibling first and
    renamed into place, so a failed run leaves nothing half-written. ``out_dir``
    must not be, or contain, the config, task files or model directories.
    ``check_tokenizer``, ``check_finite`` and ``allow_pickle`` go to ``ModelPair.load``;
    ``overrides`` to :func:`~tl_transplant.pipeline.config.load_config` (the CLI's flags).
    ``check_memory``: log the memory plan (:mod:`tl_transplant.pipeline.plan`, from the
    config and headers) and stop before loading when its peak exceeds the memory available.

    Resume (:mod:`tl_transplant.pipeline.resume`): each data-based method's scores are kept
    in ``<out_dir>.partial/`` as they finish; after an interrupted run, ``resume=True``
    reuses those whose key (config, model and task fingerprints, versions) matches and logs
    each one. Without ``resume`` an existing staging area is an error (``overwrite``
    discards it). A finished run removes it.

    Retention: the config's control tasks; without any, ``retention: auto`` (default)
    uses :func:`tl_transplant.evaluation.generic.generic_retention` and ``retention: none``
    measures none. ``sweep.max_retention_drop`` applies to whichever is used.

    The stages (:mod:`tl_transplant.pipeline.stages`): load, score, the sweep (on dev,
    the choice, the controls, the test report with retention), the results, the report,
    the permanent edit, the export.
    """
    cfg = load_config(config, overrides)
    if check_memory:
        check_memory_plan(cfg, log)
    out, tmp = prepare_out_dir(out_dir, overwrite, inputs=_run_inputs(config, cfg))
    store: RunStore | None = None
    try:
        store = RunStore.open(out, run_key(cfg, _run_inputs(None, cfg)), resume=resume,
                              overwrite=overwrite, log=log)
        inputs = load_inputs(cfg, log=log, check_tokenizer=check_tokenizer,
                             check_finite=check_finite, allow_pickle=allow_pickle)
        scored = score_methods(inputs, cfg, progress=progress, log=log, save_dir=tmp,
                               store=store)
        res = sweep_on_dev(inputs, scored, cfg, progress=progress, log=log, store=store)
        write_sweep_files(res, tmp)
        results = res.results(inputs.n_search)
        if report:  # before the permanent edit: the report compares against the target
            write_run_report(inputs, res, scored, results, tmp)
        for who in ("source", "target") if lm_eval_tests(inputs) else ():
            write_lm_eval_outputs(inputs, cfg, tmp, who, log=log)
        manifest = apply_choice(inputs, res, tmp, log=log)
        if manifest is not None and lm_eval_tests(inputs):
            write_lm_eval_outputs(inputs, cfg, tmp, "transplanted", log=log)
        export_choice(inputs, manifest, cfg, tmp, log=log)
        write_results(results, cfg, tmp)
        result = RunResult(results=results, out_dir=out, sweep=res, scores=scored.methods,
                           pair=inputs.pair, manifest=manifest, config=cfg)
        try:
            commit_out_dir(tmp, out, overwrite)
        except OSError as e:
            raise OutputError(f"cannot move the finished run into {out}: {os_reason(e)}; "
                              "choose a path you can write to") from e
        store.finish()
        return result
    except BaseException:
        discard_out_dir(tmp, out)
        if store is not None:
            store.interrupted()
        raise


def _run_inputs(config: Any, cfg: RunConfig) -> list[Any]:
    """Every local file or directory a run reads: the output must not be or contain one."""
    items: list[Any] = [cfg.source, cfg.target]
    if isinstance(config, (str, Path)):
        items.append(config)
    for tc in (cfg.task, *cfg.control_tasks):
        items += tc.input_paths()
    return [i for i in items if isinstance(i, (str, Path)) and i]


def demo_config(
    pair_name: str = "cross_generation", *, export: bool = True, full: bool = False
) -> dict[str, Any]:
    """The demo's config for a zoo pair (also a template for your own).

    Default (about a minute on 2 CPU cores): attribution (heads + neurons, and single
    weights), learned_mask (30 steps), activation_diff, weight_diff, random (units and
    weights), magnitude (top-|delta| weights) and dense (every weight at one alpha) at
    parameter budgets of 1-10% of the block weights, alpha in {0.5, 1} chosen on dev;
    the verdict against random, random@weight, magnitude and dense (at the same retention
    cost), each at the chosen size; and the method x budget comparison on test
    (``sweep.compare``). ``full`` adds ``attribution_ig``, ``activation_patch``,
    ``iterative``, learned_mask's default 100 steps, dare (an extrapolating control), a
    0.5% budget and the unit-count grid (K x four alphas): several minutes.
    A real pair (``zoo.REAL_PAIR_NAMES``) is built first if needed and gets a search sized for a
    135M model on a few CPU cores: the cheap data-based rules plus ``learned_mask``, alpha 1,
    budgets up to 5% of the block weights.
    """
    from tl_transplant import zoo

    src, tgt = zoo.pair_dirs(pair_name, build_missing=True)
    paths = zoo.task_paths(pair_name)
    bos: bool = True
    if zoo.is_real(pair_name):
        from tl_transplant.zoo.real import PREPEND_BOS

        bos = PREPEND_BOS
    task = {"path": str(paths["task"].dev), "test_path": str(paths["task"].test),
            "metric": "next_token_acc", "prepend_bos": bos, "name": f"{pair_name}:capability"}
    controls = [{"path": str(sp.dev), "test_path": str(sp.test), "metric": "next_token_acc",
                 "prepend_bos": bos, "name": f"{pair_name}:{kind}"}
                for kind, sp in paths.items() if kind != "task"]
    if zoo.is_real(pair_name):
        # learned_mask settings: a sparsity weight that gives a sparse set on SmolLM2's
        # 46k neurons (the default 1.0 leaves nearly every gate drifting up), 40 Adam steps.
        selection = {"methods": ["attribution", "learned_mask", "activation_diff",
                                 "weight_diff", "random"],
                     "units": ["head", "neuron"], "controls": ["random"],
                     "options": {"learned_mask": {"steps": 40, "lr": 0.3, "lam_sparse": 10.0}}}
        grid: dict[str, Any] = {"k": [], "budget": [0.005, 0.01, 0.02, 0.05], "alpha": [1.0],
                                "max_retention_drop": 0.02, "compare": True}
    elif full:
        selection = {"methods": ["attribution", "attribution_ig", "activation_patch",
                                 "learned_mask", "iterative", "activation_diff",
                                 "weight_diff@unit", "random", "magnitude", "dense"],
                     "units": ["head", "neuron", "weight"],
                     "controls": ["random", "magnitude", "dense", "dare"]}
        grid = {"k": [1, 2, 4, 8, 16, 24, 32, 39], "budget": [0.005, 0.01, 0.02, 0.05, 0.1],
                "alpha": [0.25, 0.5, 0.75, 1.0], "max_retention_drop": 0.05, "compare": True}
    else:  # sized to finish in about a minute on 2 CPU cores
        selection = {"methods": ["attribution", "learned_mask@unit", "activation_diff",
                                 "weight_diff@unit", "random", "magnitude", "dense"],
                     "units": ["head", "neuron", "weight"],
                     "controls": ["random", "magnitude", "dense"],
                     "options": {"learned_mask": {"steps": 30}}}
        grid = {"budget": [0.01, 0.02, 0.05, 0.1], "alpha": [0.5, 1.0],
                "max_retention_drop": 0.05, "compare": True}
    return {
        "source": str(src),
        "target": str(tgt),
        "task": task,
        "control_tasks": controls,
        "selection": selection,
        "sweep": grid,
        "seed": 0,
        "export": export,
    }


__all__ = ["RESULT_KEYS", "RunResult", "demo_config", "format_table", "load_task_splits", "run"]
