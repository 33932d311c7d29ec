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

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_transplant.edit.manifest import MANIFEST_NAME, write_manifest
from tl_transplant.io.export import commit_out_dir, export_hf, prepare_out_dir
from tl_transplant.pipeline.config import RunConfig, TaskConfig, load_config
from tl_transplant.pipeline.stages import RESULT_KEYS, run_results, score_runs
from tl_transplant.report.text import format_table
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import resolve_prepend_bos


@dataclass
class RunResult:
    """What a run produced: the ``results.json`` dict plus the live objects behind it."""

    results: dict[str, Any]
    out_dir: Path
    sweep: Any
    scores: dict[str, Any]
    pair: Any
    manifest: Any = None
    config: RunConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The short text table the CLI prints."""
        return format_table(self.results, self.sweep)


def load_task_splits(tc: TaskConfig, seed: int, default_name: str) -> tuple[Task, Task]:
    """(dev, test) from a task entry: a separate ``test_path``, or a seeded split."""
    kw = tc.task_kwargs()
    name = tc.name or default_name
    if tc.test_path:
        dev = Task.from_dataset(tc.path, name=f"{name}:dev", **kw)
        test = Task.from_dataset(tc.test_path, name=f"{name}:test", **kw)
        return dev, test
    full = Task.from_dataset(tc.path, name=name, **kw)
    return full.split(tc.dev_fraction, seed)


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
) -> RunResult:
    """Run the pipeline described by ``config`` and write everything under ``out_dir``.

    Output: ``results.json`` (keys: :data:`RESULT_KEYS`; ``fraction_params`` is of the
    block parameters, see :mod:`tl_transplant.edit.budget`), ``sweep.csv``, ``sweep.png``,
    ``sweep.json``,
    ``scores_<label>.json`` (a weight-level method's per-unit view), ``transplant_manifest.json``
    (with the mask file of a weight-level winner), ``model/`` (if
    ``export``) and ``report.html``. Written to a temporary sibling first and
    renamed into place, so a failed run leaves nothing half-written. ``out_dir``
    must not be, or contain, the config, task files or model directories.
    ``check_tokenizer``, ``check_finite`` and ``allow_pickle`` go to ``ModelPair.load``;
    ``overrides`` to :func:`~tl_transplant.pipeline.config.load_config` (the CLI's flags).

    Retention: the config's control tasks; without any, ``retention: auto`` (default)
    uses :func:`tl_transplant.evaluation.generic.generic_retention` and ``retention: none``
    measures none. ``sweep.max_retention_drop`` applies to whichever is used.
    """
    from tl_transplant.edit.edits import apply_transplant
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.sweeps.protocol import sweep

    cfg = load_config(config, overrides)
    out, tmp = prepare_out_dir(out_dir, overwrite, inputs=_run_inputs(config, cfg))
    try:
        log(f"loading pair: source={cfg.source} target={cfg.target}")
        dtype = None if cfg.dtype in (None, "auto") else cfg.dtype
        pair = ModelPair.load(cfg.source, cfg.target, device=cfg.device, dtype=dtype,
                              check_tokenizer=check_tokenizer, check_finite=check_finite,
                              allow_pickle=allow_pickle)
        dev, test = load_task_splits(cfg.task, cfg.seed, "task")
        controls = [load_task_splits(c, cfg.seed, f"control{i}")
                    for i, c in enumerate(cfg.control_tasks)]
        for t in (dev, test, *(x for split in controls for x in split)):
            t.check_fits(pair.target.tokenizer, resolve_prepend_bos(pair, t.prepend_bos),
                         pair.target.config)
        kinds = tuple(cfg.selection.unit_kinds)
        n_search = len(pair.units(kinds)) if kinds else 0
        want_k = cfg.sweep.ks() if kinds else []
        ks = [k for k in want_k if k <= n_search] or ([n_search] if want_k else [])

        contrast = controls[0][0] if (controls and cfg.selection.contrast_lambda) else None
        scores, ctrl = score_runs(pair, dev, cfg, contrast=contrast, progress=progress,
                                  log=log, save_dir=tmp)
        control_arg: list[tuple[Task, Task]] | None = controls
        if not controls:
            control_arg = None if cfg.retention == "auto" else []
        budgets = cfg.sweep.budget
        log(f"sweep: K in {ks}, budgets {budgets}, alpha in {cfg.sweep.alpha}, "
            f"methods {list(scores)}, controls {list(ctrl)}, retention "
            f"{'given' if controls else ('generic' if control_arg is None else 'none')}")
        res = sweep(pair, (dev, test), scores, ks=ks, alphas=cfg.sweep.alpha,
                    control_tasks=control_arg, units=kinds or None, budgets=budgets,
                    compare_on_test=cfg.sweep.compare,
                    max_retention_drop=cfg.sweep.max_retention_drop, seed=cfg.seed,
                    batch_size=cfg.batch_size, progress=progress, controls=ctrl,
                    cv_folds=cfg.selection.cv_folds)
        res.save(tmp)
        (tmp / "sweep.json").write_text((tmp / "results.json").read_text())

        results = run_results(res, n_search)
        best = res.best
        manifest = None
        if best is None:
            log("no configuration met the retention constraint; nothing applied")
        else:
            if report:  # before the permanent edit: the report compares against the target
                _write_report(pair, res, scores, dev, results, tmp)
            if not best.selection:  # a budget below every unit's cost: the target itself won
                log("the chosen configuration moves no weights (its budget fits no unit); "
                    "nothing applied or exported")
            else:
                manifest = apply_transplant(pair, best.selection, best.effective_alpha,
                                            allow_extrapolation=best.extrapolates)
                assert best.test is not None
                manifest.extra.update(method=best.method, grain=best.grain, k=best.k,
                                      budget=best.budget, task=dev.name,
                                      dev_metric=best.metric,
                                      test_recovery=best.test.metrics.recovery)
                if best.mask is not None:
                    manifest.extra.update(mask_sha256=best.mask.sha256,
                                          mask_n_params=best.mask.n_params)
                write_manifest(tmp / MANIFEST_NAME, manifest)
            if cfg.export and manifest is not None:
                log("exporting the transplanted target to model/")
                export_hf(pair, tmp / "model", manifest=manifest)
        assert tuple(results) == RESULT_KEYS, tuple(results)
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (tmp / "config.json").write_text(cfg.model_dump_json(indent=2))
        if report and best is None:
            _write_report(pair, res, scores, dev, results, tmp)
        result = RunResult(results=results, out_dir=out, sweep=res, scores=scores, pair=pair,
                           manifest=manifest, config=cfg)
        commit_out_dir(tmp, out)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_inputs(config: Any, cfg: RunConfig) -> list[Any]:
    """Every local file or directory a run reads: the output must not be or contain one."""
    items: list[Any] = [cfg.source, cfg.target]
    if isinstance(config, (str, Path)):
        items.append(config)
    for tc in (cfg.task, *cfg.control_tasks):
        items += [tc.path, tc.test_path]
    return [i for i in items if isinstance(i, (str, Path)) and i]


def _write_report(pair: Any, res: Any, scores: dict[str, Any], dev: Task,
                  results: dict[str, Any], tmp: Path) -> None:
    """report.html: one self-contained page (CircuitsVis inlined, figures embedded)."""
    from tl_transplant.report.html import write_report

    write_report(tmp / "report.html", sweep_result=res, pair=pair, task=dev, scores=scores,
                 extra={"Run summary": format_table(results, res)})


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
