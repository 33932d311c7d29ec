"""The stages of :func:`tl_transplant.run`, each a function with typed inputs and outputs.

    inputs = load_inputs(cfg, ...)                  # load: the pair, task splits, controls
    scored = score_methods(inputs, cfg, ...)        # score: every method on dev, at its grains
    res = sweep_on_dev(inputs, scored, cfg, ...)    # sweep on dev -> choose -> controls ->
                                                    #   test report -> retention
    results = res.results(inputs.n_search)          # the typed results.json
    write_sweep_files(res, tmp)                     # sweep.csv, sweep.png, sweep.json
    write_run_report(...)                           # report.html (before the edit)
    manifest = apply_choice(inputs, res, tmp, ...)  # the permanent edit and its manifest
    export_choice(inputs, manifest, tmp, ...)       # model/ (HF format)
    write_results(results, cfg, tmp)                # results.json, config.json

The sweep's own stages (:mod:`tl_transplant.sweeps.stages`) are the middle ones.

* :func:`score_runs`: every ``selection.methods`` entry at each grain it runs at
  (:meth:`~tl_transplant.pipeline.config.SelectionConfig.runs`: ``attribution``,
  ``attribution@weight``, ``magnitude``, ``dense``), plus the controls that are not
  methods; writes ``scores_<label>.json`` for each method (a weight-level method's
  :meth:`~tl_transplant.scoring.weight_scores.WeightScores.unit_view`: per-head/neuron
  sums, an ordinary Scores file; never the full weight scores; ``dense`` has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.edit.weights import WEIGHT
from tl_transplant.errors import InputError, TLTransplantError, os_reason
from tl_transplant.pipeline.result import MethodScores
from tl_transplant.sweeps.records import RESULT_KEYS, Results
from tl_transplant.sweeps.search import check_dev_size
from tl_transplant.tasks.task import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.edit.manifest import Manifest
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.pipeline.config import LmEvalTaskConfig, MethodRun, RunConfig, TaskConfig
    from tl_transplant.pipeline.resume import RunStore
    from tl_transplant.sweeps.result import SweepResult

Log = Callable[..., Any]


# ---- load ------------------------------------------------------------------------------


def load_task_splits(tc: TaskConfig | LmEvalTaskConfig, seed: int, default_name: str,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[Task, Task]:
    """(dev, test) from a task entry: a separate ``test_path``, or a seeded split. A task
    file that cannot be read is an :class:`~tl_transplant.errors.InputError`. An lm-eval
    task (``lm_eval:``) gives its dev and test documents as
    :class:`~tl_transplant.harness.view.HarnessTaskView` s (evaluated through lm-eval;
    ``tokenizer``: the target's, for the views' BOS rule)."""
    from tl_transplant.pipeline.config import LmEvalTaskConfig

    if isinstance(tc, LmEvalTaskConfig):
        from tl_transplant.harness.source import load_task

        dev, test = load_task(tc.spec()).views(tokenizer)
        dev.name, test.name = f"{tc.label}:dev", f"{tc.label}:test"
        return dev, test
    kw = tc.task_kwargs()
    name = tc.name or default_name
    try:
        if tc.test_path:
            dev = Task.from_dataset(tc.path, name=f"{name}:dev", **kw)
            test = Task.from_dataset(tc.test_path, name=f"{name}:test", **kw)
            return dev, test
        full = Task.from_dataset(tc.path, name=name, **kw)
    except TLTransplantError:
        raise
    except (OSError, ValueError) as e:  # unreadable, or not a task file (rows, fields, format)
        raise InputError(os_reason(e) if isinstance(e, OSError) else str(e)) from e
    return full.split(tc.dev_fraction, seed)


@dataclass
class RunInputs:
    """What the load stage gives: the pair, the task's and control tasks' (dev, test)
    splits, the unit kinds searched (their count: ``n_search``) and the K rows to run."""

    pair: ModelPair
    dev: Task
    test: Task
    controls: list[tuple[Task, Task]]
    kinds: tuple[str, ...]
    n_search: int
    ks: list[int]


def load_inputs(cfg: RunConfig, *, log: Log = print, check_tokenizer: bool = True,
                check_finite: bool = True, allow_pickle: bool = False) -> RunInputs:
    """Load the pair and the tasks, and check every prompt fits the target's context."""
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.tasks.tokens import resolve_prepend_bos

    log(f"loading pair: source={cfg.source} target={cfg.target}")
    dtype = None if cfg.dtype in (None, "auto") else cfg.dtype
    pair = ModelPair.load(cfg.source, cfg.target, device=cfg.device, dtype=dtype,
                          check_tokenizer=check_tokenizer, check_finite=check_finite,
                          allow_pickle=allow_pickle)
    tok = pair.target.tokenizer
    dev, test = load_task_splits(cfg.task, cfg.seed, "task", tok)
    check_dev_size(dev)  # before scoring: a dev split too small to choose on
    controls = [load_task_splits(c, cfg.seed, f"control{i}", tok)
                for i, c in enumerate(cfg.control_tasks)]
    for t in (dev, *(c[0] for c in controls)):
        if dict(t.meta.get("split") or {}).get("selection_on_test"):
            log(f"warning: {t.name} holds test documents (allow_test_selection: true); "
                "the choice made on it is selection on test, and every output says so")
    for t in (dev, test, *(x for split in controls for x in split)):
        try:
            t.check_fits(pair.target.tokenizer, resolve_prepend_bos(pair, t.prepend_bos),
                         pair.target.config)
        except TLTransplantError:
            raise
        except ValueError as e:  # a prompt longer than the model's context, an empty answer
            raise InputError(str(e)) from e
    kinds = tuple(cfg.selection.unit_kinds)
    n_search = len(pair.units(kinds)) if kinds else 0
    want_k = cfg.sweep.ks() if kinds else []
    ks = [k for k in want_k if k <= n_search] or ([n_search] if want_k else [])
    return RunInputs(pair, dev, test, controls, kinds, n_search, ks)


# ---- score -----------------------------------------------------------------------------


@dataclass
class Scored:
    """Every method's scores on dev (``{label: scores}``), and the verdict's controls."""

    methods: dict[str, MethodScores]
    controls: dict[str, MethodScores]


def _score_one(pair: ModelPair, dev: Task, run: MethodRun, cfg: RunConfig, *,
               progress: bool, extra: dict[str, Any]) -> MethodScores:
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
    log: Log = print,
    save_dir: Path | None = None,
    store: RunStore | None = None,
) -> tuple[dict[str, MethodScores], dict[str, MethodScores]]:
    """Score every method (at each grain) on dev; returns ``({label: scores}, {label:
    control scores})``. The controls are ``selection.controls`` at their grains
    (``random`` with ``units: [head, neuron, weight]`` is ``random`` and ``random@weight``);
    a control that is also a method shares its scores. ``contrast`` (retention-aware
    scoring) goes to the data-based methods only. ``store``: the run's staging area
    (:mod:`tl_transplant.pipeline.resume`): a data-based method's scores are taken from it
    when kept there, and kept there as soon as they are computed."""
    from tl_transplant.scoring import get_scorer
    from tl_transplant.scoring.weight_scores import WeightScores

    sel = cfg.selection
    runs = sel.runs("methods")
    scores: dict[str, MethodScores] = {}
    for r in runs:
        needs = get_scorer(r.method).needs_data
        extra: dict[str, Any] = (
            {"contrast": contrast, "lam": sel.contrast_lambda}
            if contrast is not None and needs and r.grain != "dense" else {}
        )
        where = {"dense": "every block weight", WEIGHT: "single weights"}.get(
            r.grain, "units " + ",".join(sel.kinds_for(r.method)))
        keep = store is not None and needs and r.grain != "dense"
        got = store.get(r.label) if keep and store is not None else None
        if got is not None:
            scores[r.label] = got
        else:
            log(f"scoring {r.label} on dev ({len(dev)} examples, {where})")
            scores[r.label] = _score_one(pair, dev, r, cfg, progress=progress, extra=extra)
            if keep and store is not None:
                store.put(r.label, scores[r.label])
        frac = scores[r.label].meta.get("unit_candidates")
        # learned_mask gated a candidate set only: say so, once (a scorer run with progress
        # bars has said it on the console already)
        if frac is not None and (got is not None or not progress):
            log(f"{r.label}: gates on the {scores[r.label].meta.get('n_candidates')} units "
                f"with the largest attribution ({frac:g} of the block parameters; the others "
                f"score 0; selection.options.{r.method}.unit_candidates: null gates every unit)")
        if save_dir is not None and r.grain != "dense":
            s = scores[r.label]
            if isinstance(s, WeightScores):
                s = s.unit_view(pair.layout, sel.unit_kinds or ("head", "neuron"))
            s.save(save_dir / f"scores_{r.label}.json")
    ctrl: dict[str, MethodScores] = {}
    for r in sel.runs("controls"):
        if r.label not in scores:
            log(f"scoring control {r.label}")
        ctrl[r.label] = scores.get(r.label) or _score_one(pair, dev, r, cfg, progress=False,
                                                           extra={})
    return scores, ctrl


def score_methods(inputs: RunInputs, cfg: RunConfig, *, progress: bool = True,
                  log: Log = print, save_dir: Path | None = None,
                  store: RunStore | None = None) -> Scored:
    """The score stage: :func:`score_runs` on dev, retention-aware against the first
    control task when ``selection.contrast_lambda`` is set."""
    contrast = (inputs.controls[0][0]
                if inputs.controls and cfg.selection.contrast_lambda else None)
    methods, controls = score_runs(inputs.pair, inputs.dev, cfg, contrast=contrast,
                                   progress=progress, log=log, save_dir=save_dir, store=store)
    return Scored(methods, controls)


# ---- sweep on dev, choose, controls, test report, retention ----------------------------


def sweep_on_dev(inputs: RunInputs, scored: Scored, cfg: RunConfig, *, progress: bool = True,
                 log: Log = print, store: RunStore | None = None) -> SweepResult:
    """The sweep's stages (:func:`tl_transplant.sweeps.stages.run_sweep`) with the config's
    settings: every (method, size, alpha) on dev, the choice on dev, its test report with
    retention, and the parameter-matched controls. ``store``: the run's staging area, which
    keeps and gives back the dev evaluations of the configurations (resume)."""
    from tl_transplant.sweeps.options import SweepOptions
    from tl_transplant.sweeps.stages import run_sweep

    control_arg: list[tuple[Task, Task]] | None = inputs.controls
    if not inputs.controls:
        control_arg = None if cfg.retention == "auto" else []
    log(f"sweep: K in {inputs.ks}, budgets {cfg.sweep.budget}, alpha in {cfg.sweep.alpha}, "
        f"methods {list(scored.methods)}, controls {list(scored.controls)}, retention "
        f"{'given' if inputs.controls else ('generic' if control_arg is None else 'none')}")
    opts = SweepOptions(
        ks=inputs.ks, alphas=cfg.sweep.alpha, units=inputs.kinds or None,
        budgets=cfg.sweep.budget, compare_on_test=cfg.sweep.compare,
        max_retention_drop=cfg.sweep.max_retention_drop, seed=cfg.seed,
        batch_size=cfg.batch_size, progress=progress, cv_folds=cfg.selection.cv_folds,
        dev_store=store)
    res = run_sweep(inputs.pair, (inputs.dev, inputs.test), scored.methods,
                    control_tasks=control_arg, controls=scored.controls, opts=opts)
    if store is not None and store.reused_evals:
        n = store.reused_evals
        log(f"reused {n} dev evaluation{'s' if n != 1 else ''} of the sweep (key "
            f"{store.key.digest[:12]})")
    return res


# ---- outputs ---------------------------------------------------------------------------


def write_sweep_files(res: SweepResult, out: Path) -> None:
    """``sweep.json`` (the sweep's own record), ``sweep.csv``, ``sweep.png`` and
    ``comparison.csv``; ``results.json`` is the run's (:func:`write_results`)."""
    res.save(out)
    (out / "sweep.json").write_text((out / "results.json").read_text())


def write_run_report(inputs: RunInputs, res: SweepResult, scored: Scored, results: Results,
                     out: Path) -> None:
    """``report.html``: one self-contained page (CircuitsVis inlined, figures embedded),
    with the run summary. Written before the permanent edit (it compares with the target)."""
    from tl_transplant.report.html import write_report

    write_report(out / "report.html", sweep_result=res, pair=inputs.pair, task=inputs.dev,
                 scores=scored.methods, results=results)


def apply_choice(inputs: RunInputs, res: SweepResult, out: Path, *,
                 log: Log = print) -> Manifest | None:
    """Apply the chosen configuration to the target for good (units or a weight mask) and
    write its manifest; None when nothing was chosen or the choice moves no weight."""
    from tl_transplant.edit.edits import apply_transplant
    from tl_transplant.edit.manifest import MANIFEST_NAME, write_manifest

    best = res.best
    if best is None:
        log("no configuration met the retention constraint; nothing applied")
        return None
    if not best.selection:  # a budget below every unit's cost: the target itself won
        log("the chosen configuration moves no weights (its budget fits no unit); "
            "nothing applied or exported")
        return None
    manifest = apply_transplant(inputs.pair, best.selection, best.effective_alpha,
                                allow_extrapolation=best.extrapolates)
    assert best.test is not None
    manifest.extra.update(method=best.method, grain=best.grain, k=best.k, budget=best.budget,
                          task=inputs.dev.name, dev_metric=best.metric,
                          test_recovery=best.test.metrics.recovery)
    if best.mask is not None:
        manifest.extra.update(mask_sha256=best.mask.sha256, mask_n_params=best.mask.n_params)
    write_manifest(out / MANIFEST_NAME, manifest)
    return manifest


def export_choice(inputs: RunInputs, manifest: Manifest | None, cfg: RunConfig, out: Path, *,
                  log: Log = print) -> None:
    """``model/``: the transplanted target in Hugging Face format (``export: true``)."""
    from tl_transplant.io.export import export_hf

    if cfg.export and manifest is not None:
        log("exporting the transplanted target to model/")
        export_hf(inputs.pair, out / "model", manifest=manifest)


def lm_eval_tests(inputs: RunInputs) -> list[Task]:
    """The test splits of the run's lm-eval tasks (task and controls), in config order."""
    tests = [inputs.test, *(t for _, t in inputs.controls)]
    return [t for t in tests if getattr(t, "harness", None) is not None]


def write_lm_eval_outputs(inputs: RunInputs, cfg: RunConfig, out: Path, who: str, *,
                          log: Log = print) -> dict[str, Path]:
    """lm-eval's own output (``results.json`` and ``samples_<task>.jsonl``, as its CLI
    writes them) of every lm-eval test split on one model, under ``lm_eval/<who>/<task>/``:
    ``who`` = ``source``, ``target`` (before the permanent edit) or ``transplanted`` (after
    it). Each is one more evaluation of the test documents through lm-eval's HFLM (the
    numbers of a plain ``lm_eval`` run on that model). Returns ``{task: results.json}``."""
    from tl_transplant.harness.run import evaluate_split

    side = inputs.pair.source if who == "source" else inputs.pair.target
    written: dict[str, Path] = {}
    for t in lm_eval_tests(inputs):
        split: Any = getattr(t, "harness", None)
        folder = out / "lm_eval" / who / t.name.removesuffix(":test")
        log(f"lm-eval: {t.name} on the {who} -> {folder.relative_to(out)}")
        res = evaluate_split(side, split, engine="hflm", batch_size=cfg.batch_size,
                             output_path=folder)
        written[t.name] = Path(res.meta["lm_eval"]["json"])
    return written


def write_results(results: Results, cfg: RunConfig, out: Path) -> None:
    """``results.json`` (the typed results, keys :data:`RESULT_KEYS`) and ``config.json``."""
    text = results.to_json()
    assert tuple(results.to_dict()) == RESULT_KEYS
    (out / "results.json").write_text(text)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))


def run_results(res: SweepResult, n_search: int) -> Results:
    """The run's typed results of a sweep (:meth:`SweepResult.results
    <tl_transplant.sweeps.result.SweepResult.results>`)."""
    return res.results(n_search)


__all__ = [
    "RESULT_KEYS",
    "RunInputs",
    "Scored",
    "apply_choice",
    "export_choice",
    "lm_eval_tests",
    "load_inputs",
    "load_task_splits",
    "run_results",
    "score_methods",
    "score_runs",
    "sweep_on_dev",
    "write_results",
    "write_run_report",
    "write_lm_eval_outputs",
    "write_sweep_files",
]
