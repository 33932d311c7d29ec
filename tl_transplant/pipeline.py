"""The whole pipeline as one call: ``tl_transplant.run(config, out_dir)``.

load pair -> load tasks (dev/test) -> score units on **dev** with each method ->
K x alpha sweep on dev (best config chosen there, subject to the retention
constraint) -> report that one config on **test** with CIs, controls at the same
K and alpha, retention -> apply it permanently -> export. The CLI's ``run`` and
``demo`` are thin shells over this function.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_transplant.config import RunConfig, TaskConfig, load_config
from tl_transplant.export import commit_out_dir, export_hf, prepare_out_dir
from tl_transplant.manifest import MANIFEST_NAME, write_manifest
from tl_transplant.stats import paired_diff_ci
from tl_transplant.summary import format_table
from tl_transplant.tasks import Task
from tl_transplant.tokens import resolve_prepend_bos

RESULT_KEYS = ("baselines", "best", "test", "controls", "retention", "retention_control",
               "fraction_params", "fraction_units", "comparison")


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


def _as_list(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else list(ci)


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
    block parameters, see :mod:`tl_transplant.budget`), ``sweep.csv``, ``sweep.png``,
    ``sweep.json``,
    ``scores_<method>.json``, ``transplant_manifest.json``, ``model/`` (if
    ``export``) and ``report.html``. Written to a temporary sibling first and
    renamed into place, so a failed run leaves nothing half-written. ``out_dir``
    must not be, or contain, the config, task files or model directories.
    ``check_tokenizer``, ``check_finite`` and ``allow_pickle`` go to ``ModelPair.load``;
    ``overrides`` to :func:`~tl_transplant.config.load_config` (the CLI's flags).

    Retention: the config's control tasks; without any, ``retention: auto`` (default)
    uses :func:`tl_transplant.retention.generic_retention` and ``retention: none``
    measures none. ``sweep.max_retention_drop`` applies to whichever is used.
    """
    from tl_transplant.budget import block_params
    from tl_transplant.edits import apply_transplant, plan_transplant
    from tl_transplant.evaluation import evaluate_transplant
    from tl_transplant.pair import ModelPair
    from tl_transplant.scoring import score
    from tl_transplant.sweeps import sweep
    from tl_transplant.units import normalize_kinds

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
        kinds = normalize_kinds(cfg.selection.units)
        n_search = len(pair.units(kinds))
        ks = [k for k in cfg.sweep.k if k <= n_search] or ([n_search] if cfg.sweep.k else [])

        scores: dict[str, Any] = {}
        contrast = controls[0][0] if (controls and cfg.selection.contrast_lambda) else None
        for m in cfg.selection.methods:
            log(f"scoring {m} on dev ({len(dev)} examples, units {','.join(kinds)})")
            extra: dict[str, Any] = (
                {"contrast": contrast, "lam": cfg.selection.contrast_lambda}
                if contrast is not None else {}
            )
            scores[m] = score(pair, dev, method=m, units=cfg.selection.kinds_for(m),
                              progress=progress, batch_size=cfg.batch_size, seed=cfg.seed,
                              **extra, **cfg.selection.options.get(m, {}))
            scores[m].save(tmp / f"scores_{m}.json")

        control_arg: list[tuple[Task, Task]] | None = controls
        if not controls:
            control_arg = None if cfg.retention == "auto" else []
        budgets = cfg.sweep.budget
        log(f"sweep: K in {ks}, budgets {budgets}, alpha in {cfg.sweep.alpha}, "
            f"methods {list(scores)}, retention "
            f"{'given' if controls else ('generic' if control_arg is None else 'none')}")
        res = sweep(pair, (dev, test), scores, ks=ks, alphas=cfg.sweep.alpha,
                    control_tasks=control_arg, units=kinds, budgets=budgets,
                    compare_on_test=cfg.sweep.compare,
                    max_retention_drop=cfg.sweep.max_retention_drop, seed=cfg.seed,
                    batch_size=cfg.batch_size, progress=progress)
        res.save(tmp)
        (tmp / "sweep.json").write_text((tmp / "results.json").read_text())

        base_test = res.baselines.get("test", {})
        base_dev = res.baselines["dev"]
        baselines = {side: {"dev": base_dev[side].mean,
                            "test": base_test[side].mean if side in base_test else None}
                     for side in ("source", "target")}
        best = res.best
        results: dict[str, Any] = {"baselines": baselines}
        manifest = None
        ret_info = res.config.get("retention", {})
        comparison = res.to_dict().get("comparison")
        if best is None:
            results.update(best=None, test=None, controls={}, retention=[],
                           retention_control=ret_info, fraction_params=0.0, fraction_units=0.0,
                           comparison=comparison)
            log("no configuration met the retention constraint; nothing applied")
        else:
            rep = best.test
            assert rep is not None, "sweep() evaluates the best row on test"
            met = rep.metrics
            results["best"] = {"method": best.method, "pct_params": best.pct_params,
                               "pct_units": best.pct_units, "budget": best.budget,
                               "k": best.k, "alpha": best.alpha, "n_params": best.n_params,
                               "units": list(best.units), "dev_metric": best.metric}
            results["test"] = {"transplanted": met.transplanted, "tir": met.tir,
                               "recovery": met.recovery,
                               "ci": {k: (list(v) if v is not None else None)
                                      for k, v in met.ci.items()}}
            ctrl: dict[str, Any] = {}
            for c in cfg.selection.controls:
                at = (f"budget {best.budget:g}" if isinstance(best.budget, float)
                      else f"K={best.k}")
                log(f"control {c} at {at}, alpha={best.alpha:g} on test")
                cs = score(pair, dev, method=c, units=cfg.selection.kinds_for(c), progress=False,
                           seed=cfg.seed, **cfg.selection.options.get(c, {}))
                if isinstance(best.budget, float):  # the same parameter budget
                    cunits = cs.within_budget(best.budget, pair.layout, kinds=kinds)
                else:  # the same number of units
                    cunits = cs.top(best.k, kinds=kinds)
                crep = evaluate_transplant(
                    pair, test, cunits, best.alpha, baselines={"source": rep.source,
                                                                "target": rep.target},
                    batch_size=cfg.batch_size, progress=False, seed=cfg.seed, warn=False)
                n_ctrl = plan_transplant(pair, cunits).n_params if cunits else 0
                ctrl[c] = {
                    "pct_params": n_ctrl / max(1, block_params(pair.layout)),
                    "units": [str(u) for u in cunits],
                    "test": crep.transplanted.mean,
                    "recovery": crep.metrics.recovery,
                    "best_minus_control": rep.transplanted.mean - crep.transplanted.mean,
                    "best_minus_control_ci": _as_list(paired_diff_ci(
                        rep.transplanted.scores, crep.transplanted.scores, seed=cfg.seed)),
                }
            results["controls"] = ctrl
            results["retention"] = [
                {"task": r.task, "before": r.before, "after": r.after, "drop": r.drop}
                for r in rep.retention
            ]
            results["retention_control"] = ret_info
            n_moved = plan_transplant(pair, best.units).n_params if best.units else 0
            results["fraction_params"] = n_moved / max(1, block_params(pair.layout))
            results["fraction_units"] = best.k / n_search
            results["comparison"] = comparison

            if report:  # before the permanent edit: the report compares against the target
                _write_report(pair, res, scores, dev, results, tmp)
            if not best.units:  # a budget below every unit's cost: the target itself won
                log("the chosen configuration moves no weights (its budget fits no unit); "
                    "nothing applied or exported")
            else:
                manifest = apply_transplant(pair, best.units, best.alpha)
                manifest.extra.update(method=best.method, k=best.k, budget=best.budget,
                                      task=dev.name, dev_metric=best.metric,
                                      test_recovery=met.recovery)
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
    from tl_transplant.report import write_report

    write_report(tmp / "report.html", sweep_result=res, pair=pair, task=dev, scores=scores,
                 extra={"Run summary": format_table(results, res)})


def demo_config(
    pair_name: str = "cross_generation", *, export: bool = True, full: bool = False
) -> dict[str, Any]:
    """The demo's config for a zoo pair (also a template for your own).

    Default (about a minute on 2 CPU cores): attribution, learned_mask (30 steps),
    activation_diff against ``random`` and ``weight_diff`` at the same parameter budgets
    (fractions of the block weights), alpha in {0.5, 1} chosen on dev, and the method x
    budget comparison evaluated on test (``sweep.compare``). ``full`` adds
    ``attribution_ig``, ``activation_patch``, ``iterative``, learned_mask's default 100
    steps, a 0.5% budget and the unit-count grid (K x four alphas): several minutes.
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
                                 "learned_mask", "iterative", "activation_diff", "weight_diff",
                                 "random"],
                     "units": ["head", "neuron"], "controls": ["random"]}
        grid = {"k": [1, 2, 4, 8, 16, 24, 32, 39], "budget": [0.005, 0.01, 0.02, 0.05, 0.1],
                "alpha": [0.25, 0.5, 0.75, 1.0], "max_retention_drop": 0.05, "compare": True}
    else:  # sized to finish in about a minute on 2 CPU cores
        selection = {"methods": ["attribution", "learned_mask", "activation_diff",
                                 "weight_diff", "random"],
                     "units": ["head", "neuron"], "controls": ["random"],
                     "options": {"learned_mask": {"steps": 30}}}
        grid = {"k": [], "budget": [0.01, 0.02, 0.05, 0.1], "alpha": [0.5, 1.0],
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
