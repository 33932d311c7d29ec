"""``tl-transplant``: demo, run, score, apply, export. A thin shell over the public API.

Every subcommand has ``--help``. The user-error boundary is :func:`main`: an error of
ours (:class:`~tl_transplant.errors.TLTransplantError`: bad input, a file or model that
cannot be used as asked) prints as one ``error:`` line and exits with status 2; anything
else is a bug in tl_transplant and prints its traceback and a line asking for a report
(status 1). Success exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tl_transplant.errors import InputError, OutputError, TLTransplantError, os_reason

DEMO_MARKER = ".tl_transplant_demo"  # written into demo output: the demo may replace it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that temporary directories are cleaned up."""


def _err(cmd: str, e: TLTransplantError) -> int:
    """A user error: its message's first line (it names the problem and the fix)."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    print(f"tl-transplant {cmd}: error: {msg}", file=sys.stderr)
    return 2


BUG_LINE = ("this is a bug in tl_transplant, not a problem with your input; please report it "
            "with the command you ran and this traceback")


def _bug(cmd: str, e: BaseException) -> int:
    """Not an error of ours: a bug. Its traceback, then what to do about it."""
    traceback.print_exception(e, file=sys.stderr)
    print(f"tl-transplant {cmd}: internal error ({type(e).__name__}): {BUG_LINE}",
          file=sys.stderr)
    return 1


def _fail(cmd: str, msg: str) -> int:
    print(f"tl-transplant {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _device(text: str) -> str:
    """argparse type for --device: the forms ModelPair.load takes, checked on this machine."""
    from tl_transplant.pipeline.config import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _finite_float(text: str) -> float:
    import math

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return x


def _budgets(text: str) -> list[float]:
    """argparse type for --budget: comma-separated fractions of the block parameters."""
    import math

    out = []
    for part in text.split(","):
        try:
            x = float(part.strip().removesuffix("%")) / (100 if part.strip().endswith("%") else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a number; give fractions of the block parameters, "
                "e.g. --budget 0.01,0.05 (or 1%,5%)"
            ) from None
        if not (math.isfinite(x) and 0.0 < x <= 1.0):
            raise argparse.ArgumentTypeError(
                f"each budget must be a fraction in (0, 1], got {part.strip()}; e.g. 0.01 = 1%"
            )
        out.append(x)
    return out


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from ``run``'s --units / --budget / --only-budget / --compare /
    --retention."""
    sweep: dict[str, Any] = {}
    if args.budget is not None:
        sweep["budget"] = args.budget
        if args.only_budget:
            sweep["k"] = []
    elif args.only_budget:
        raise argparse.ArgumentTypeError("--only-budget needs --budget")
    if args.compare:
        sweep["compare"] = True
    out: dict[str, Any] = {"sweep": sweep} if sweep else {}
    if args.retention is not None:
        out["retention"] = args.retention
    if getattr(args, "units", None):
        out["selection"] = {"units": [u for u in args.units.replace(" ", "").split(",") if u]}
    return out


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """ModelPair.load switches from the shared --no-check-* / --allow-pickle flags."""
    return {
        "check_tokenizer": not getattr(args, "no_check_tokenizer", False),
        "check_finite": not getattr(args, "no_check_finite", False),
        "allow_pickle": getattr(args, "allow_pickle", False),
    }


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-check-tokenizer", action="store_true",
                   help="load a pair whose tokenizers differ (only if the ids line up)")
    p.add_argument("--no-check-finite", action="store_true",
                   help="load models with NaN/inf weights (transplants still refuse "
                   "non-finite source slices)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept PyTorch .bin (pickle) checkpoints; unpickling can run code")


def _quiet_libraries() -> None:
    """Silence the per-file progress bars of transformers and datasets (for --quiet)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def cmd_demo(args: argparse.Namespace) -> int:
    from tl_transplant.pipeline.runner import demo_config, run

    out = Path(args.out or f"demo_out/{args.pair}")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not (out / DEMO_MARKER).is_file() and not args.overwrite:
        return _fail("demo", f"{out} is not empty and is not a previous demo output; choose "
                     "another --out, or pass --overwrite to replace it")
    added = _demo_foreign(out) if nonempty and not args.overwrite else []
    if added:  # the demo replaces its own output only, never files a user put there
        return _fail("demo", f"{out} is a previous demo output but also holds files the demo "
                     f"did not write ({', '.join(added[:5])}{', ...' if len(added) > 5 else ''})"
                     "; move them elsewhere or choose another --out (--overwrite replaces the "
                     "directory, those files included)")
    if args.quiet:
        _quiet_libraries()
    from tl_transplant import zoo

    what = ("real pair, built once from a pinned checkpoint into the cache"
            if zoo.is_real(args.pair) else "embedded tiny pair")
    print(f"tl-transplant demo: {what} {args.pair!r} -> {out}")
    res = run(demo_config(args.pair, export=not args.no_export, full=args.full), out,
              overwrite=True,
              progress=not args.quiet, log=(lambda *_: None) if args.quiet else print)
    (out / DEMO_MARKER).write_text(  # and what it wrote: the demo replaces only those
        "written by `tl-transplant demo`; the demo may replace this directory\n"
        + "".join(f"{p.name}\n" for p in sorted(out.iterdir()) if p.name != DEMO_MARKER))
    print()
    print(res.table())
    print(f"\nwrote {out}/ ({_written(out)})")
    return 0


def _demo_foreign(out: Path) -> list[str]:
    """Entries of a previous demo output the demo did not write (a user's notes, ...).

    The marker lists what the demo wrote; a marker of an older version lists nothing,
    and then the names a demo run writes count as its own.
    """
    import fnmatch

    lines = (out / DEMO_MARKER).read_text(errors="replace").splitlines()[1:]
    own = {n for n in lines if n} or {"results.json", "sweep.json", "sweep.csv", "sweep.png",
                                      "comparison.csv", "report.html", "model", "scores_*.json",
                                      "transplant_manifest.json", "weights-*.safetensors"}
    return [p.name for p in sorted(out.iterdir()) if p.name != DEMO_MARKER
            and not any(fnmatch.fnmatch(p.name, pat) for pat in own)]


def _written(out: Path) -> str:
    """The demo's outputs that exist, so ``--no-export`` never claims a ``model/``."""
    names = ("results.json", "sweep.csv", "sweep.png", "report.html", "model/")
    return ", ".join(n for n in names if (out / n.rstrip("/")).exists())


def cmd_run(args: argparse.Namespace) -> int:
    from tl_transplant.pipeline.runner import run

    try:
        overrides = _run_overrides(args)
    except argparse.ArgumentTypeError as e:
        return _fail("run", str(e))
    if args.quiet:
        _quiet_libraries()
    res = run(args.config, args.out, overwrite=args.overwrite, resume=args.resume,
              progress=not args.quiet,
              log=(lambda *_: None) if args.quiet else print, overrides=overrides or None,
              **_load_options(args))
    print()
    print(res.table())
    print(f"\nwrote {args.out}/")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tl_transplant.pipeline.config import load_config
    from tl_transplant.pipeline.plan import available_bytes, plan_json, plan_run

    plan = plan_run(load_config(args.config))
    plan.available_bytes = available_bytes(plan.device)
    print(plan_json(plan) if args.json else plan.summary())
    return 0


def _load_task_arg(path: str, prompt_field: str, answer_field: str, metric: str,
                   prepend_bos: str) -> Any:
    from tl_transplant.tasks.task import Task

    bos: Any = prepend_bos
    if prepend_bos in ("true", "false"):
        bos = prepend_bos == "true"
    try:
        return Task.from_dataset(path, prompt_field=prompt_field, answer_field=answer_field,
                                 metric=metric, prepend_bos=bos)
    except TLTransplantError:
        raise
    except (OSError, ValueError) as e:  # unreadable, or not a task file (rows, fields, format)
        why = os_reason(e) if isinstance(e, OSError) else str(e)
        raise InputError(why if path in why else f"--task {path}: {why}") from e


def _scorer_options(method: str, items: Sequence[str]) -> dict[str, Any]:
    """``["steps=100", "inner=attribution"]`` -> options, checked against the scorer."""
    from tl_transplant.scoring import check_options, get_scorer

    opts: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--option {item!r}: write KEY=VALUE, e.g. --option steps=100")
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    check_options(get_scorer(method), opts)
    return opts


def cmd_score(args: argparse.Namespace) -> int:
    from tl_transplant.arch.units import parse_kinds_or_units
    from tl_transplant.edit.weights import WEIGHT
    from tl_transplant.io.export import check_out_file, replace_file
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.scoring import score
    from tl_transplant.scoring.weight_scores import WeightScores

    weights = args.units.strip().lower() in (WEIGHT, "weights")
    units: Any = WEIGHT if weights else parse_kinds_or_units(args.units)  # before loading
    opts = _scorer_options(args.method, args.option)  # InputError / ScoringError: one line
    out = Path(args.out)
    allowed = (".json", ".parquet", ".pq") + ((".safetensors",) if weights else ())
    if out.suffix.lower() not in allowed:
        return _fail("score", f"--out {out}: use a .json or .parquet file name"
                     + (" (or .safetensors for the full weight scores)" if weights else ""))
    if out.is_dir():
        return _fail("score", f"--out {out} is a directory; give a file name like scores.json")
    check_out_file(out, args.overwrite, inputs=(args.task, args.source, args.target))
    task = _load_task_arg(args.task, args.prompt_field, args.answer_field, args.metric,
                          args.prepend_bos)
    pair = ModelPair.load(args.source, args.target, device=args.device, **_load_options(args))
    s = score(pair, task, method=args.method, units=units, **opts,
              batch_size=args.batch_size, progress=not args.quiet)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: {os_reason(e)}; choose a path you can write to") from e
    if isinstance(s, WeightScores):
        view = s.unit_view(pair.layout, ("head", "neuron"))
        if out.suffix.lower() == ".safetensors":
            replace_file(out, s.save)  # every weight's score
        else:
            replace_file(out, view.save)  # the unit view: per-head/neuron sums, a Scores file
        print(f"top {args.top} units by {args.method} (single weights summed per unit):")
        top = view.top(args.top)
    else:
        replace_file(out, s.save)
        print(f"top {args.top} units by {args.method}:")
        top = s.top(args.top)
    for u in top:
        print(f"  {u}")
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tl_transplant.arch.units import parse_units
    from tl_transplant.edit.edits import apply_transplant
    from tl_transplant.io.export import export_hf
    from tl_transplant.models.pair import ModelPair

    units = parse_units(args.units)  # before any model loads
    if not units:
        return _fail("export", "--units is empty; name at least one unit, e.g. 'L0.H1'")
    if not 0.0 <= args.alpha <= 1.0 and not args.allow_extrapolation:
        return _fail("export", f"--alpha {args.alpha:g} is outside [0, 1]; pass "
                     "--allow-extrapolation to push the target past the source")
    pair = ModelPair.load(args.source, args.target, device=args.device, **_load_options(args))
    m = apply_transplant(pair, units, args.alpha, kv=args.kv,
                         allow_extrapolation=args.allow_extrapolation)
    out = export_hf(pair, args.out, manifest=m, overwrite=args.overwrite)
    print(f"transplanted {len(m.units)} units (+{len(m.kv_added)} KV groups) at alpha="
          f"{args.alpha:g}: {m.n_params_moved} weights ({m.fraction_params:.3%} of the model)")
    print(f"wrote {out}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from tl_transplant import zoo

    for name in zoo.PAIR_NAMES:
        info = zoo.pair_info(name)
        print(f"{name}: {info.get('description', '')}")
        print(f"  {json.dumps(info.get('probe_accuracy', {}))}")
    return 0


_APPLY_HELP = "apply a transplant manifest to checkpoints on disk, without loading the models"
_APPLY_DESCRIPTION = """\
Apply a saved transplant manifest (transplant_manifest.json, as export_hf
writes it) to a source and a target checkpoint on disk, tensor by tensor.
Neither model is loaded: memory stays at a few MB of rows beyond the Python
and torch runtime, so a multi-billion-parameter pair can be transplanted on
any CPU box. Shards that
no unit touches are copied byte for byte; the output keeps the target's shard
layout, config and tokenizer, and matches the in-memory transplant bit for bit.

example:
  tl-transplant apply --source big-source/ --target big-target/ \\
      --manifest run/transplant_manifest.json --out transplanted/
"""


def add_apply_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``apply`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "apply",
        help=_APPLY_HELP,
        description=_APPLY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        metavar="DIR_OR_ID",
        help="source model: a local HF directory or a hub id (read from the cache "
        "when HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--target",
        required=True,
        metavar="DIR_OR_ID",
        help="target model, the one whose weights are edited (same forms as --source)",
    )
    p.add_argument(
        "--manifest",
        required=True,
        metavar="JSON",
        help="transplant_manifest.json (or a directory holding one); every "
        "transplant in it is applied, in order",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory; written via a temporary sibling and renamed into place",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept PyTorch .bin (pickle) checkpoints; unpickling can execute code, "
        "so only use this for files you trust (the output is safetensors)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="kept for old scripts: failing on a hash mismatch is now the default",
    )
    p.add_argument(
        "--allow-hash-mismatch",
        action="store_true",
        help="write the output (with a warning) even when the blended tensors do not match "
        "the manifest's sha256 hashes, i.e. the checkpoints are not the ones it was made from",
    )
    p.add_argument(
        "--allow-extrapolation",
        action="store_true",
        help="accept a manifest alpha outside [0, 1] (pushes the target past the source)",
    )
    p.set_defaults(func=main_apply)
    return p


def main_apply(args: argparse.Namespace) -> int:
    """Run ``apply`` from parsed arguments; returns the exit status."""
    from tl_transplant.io.out_of_core import apply_out_of_core

    out, stats = apply_out_of_core(
        args.source,
        args.target,
        args.manifest,
        args.out,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        strict=not getattr(args, "allow_hash_mismatch", False),
        allow_extrapolation=getattr(args, "allow_extrapolation", False),
        revision=None,
        local_files_only=None,
        cache_dir=None,
    )
    print(
        f"wrote {out}: {stats['tensors_blended']} tensors blended in "
        f"{stats['shards_rewritten']} of {stats['shards']} shards; the rest copied byte for byte"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``eval``: lm-eval tasks on a model or a run's source, target and transplanted target."""
    from tl_transplant.harness.compare import eval_models, models_of

    if args.quiet:
        _quiet_libraries()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run_dir = "source" in models_of(args.model)[0]
    if args.out is None and not run_dir:
        return _fail("eval", "--out is required when evaluating a model (a run folder "
                     "defaults to RUN_DIR/eval)")
    out = Path(args.out) if args.out is not None else Path(args.model) / "eval"
    doc = eval_models(args.model, tasks, out, include_path=args.include_path or None,
                      include_defaults=not args.no_defaults, num_fewshot=args.num_fewshot,
                      limit=args.limit, batch_size=args.batch_size, device=args.device,
                      log=(lambda *a: None) if args.quiet else print)
    for task, entry in doc["results"].items():
        for who in doc["models"]:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry[who].items())
            print(f"{task} [{who}]: {shown}")
    print(f"wrote {out / 'eval.json'} and lm-eval's results under {out / 'lm_eval'}")
    return 0


def _add_eval_command(sub: Any) -> None:
    v = sub.add_parser(
        "eval", help="run lm-evaluation-harness tasks on a model or a run's models",
        description="lm-eval (simple_evaluate, HFLM over the in-memory model) on a model, or "
        "on a run folder's source, target and transplanted model/; writes lm-eval's own JSON "
        "(OUT/lm_eval/WHO/) and ours (OUT/eval.json: metrics and, for a run, paired delta, "
        "TIR and recovery with bootstrap CIs). Needs the lm_eval extra.")
    v.add_argument("model", metavar="MODEL_OR_RUN_DIR",
                   help="an HF model (folder or hub id) or a tl-transplant run folder")
    v.add_argument("--tasks", required=True, metavar="TASK,...", help="lm-eval task names")
    v.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAMLs (repeatable)")
    v.add_argument("--no-defaults", action="store_true",
                   help="do not index lm-eval's built-in tasks (faster; only --include-path "
                   "and the shipped miniature tasks)")
    v.add_argument("--num-fewshot", type=int, default=None, metavar="N")
    v.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="the first N documents of each task (lm-eval's --limit)")
    v.add_argument("--batch-size", type=_positive_int, default=1)
    v.add_argument("--device", type=_device, default="cpu")
    v.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default for a run folder: RUN_DIR/eval)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_eval, name="eval")


def build_parser() -> argparse.ArgumentParser:
    from tl_transplant import __version__
    from tl_transplant.arch.registry import supported_model_types

    p = argparse.ArgumentParser(
        prog="tl-transplant",
        description="Find the units that carry a task in a source LM and transplant them into "
        "a target LM (TransformerLens plugin). Supported model types: "
        + ", ".join(supported_model_types()),
    )
    p.add_argument("--version", action="version", version=f"tl_transplant {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", help="run the whole pipeline on an embedded model pair",
                       description="Score, sweep K x alpha on dev, report on test, export: on "
                       "an embedded tiny pair (no download).")
    d.add_argument("--pair", default="cross_generation",
                   choices=["cross_generation", "base_instruct", *REAL_PAIRS])
    d.add_argument("--out", default=None, help="output directory (default demo_out/PAIR; "
                   "the demo replaces its own previous output)")
    d.add_argument("--no-export", action="store_true", help="skip writing model/")
    d.add_argument("--full", action="store_true", help="every scorer (also attribution_ig, "
                   "activation_patch, iterative), a 0.5%% budget and the unit-count grid "
                   "(K x 4 alphas): several minutes instead of one")
    d.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is not a previous demo output")
    d.add_argument("--quiet", action="store_true", help="no progress bars or step log")
    d.set_defaults(func=cmd_demo, name="demo")

    r = sub.add_parser("run", help="run the pipeline from a YAML config",
                       description="Run the pipeline described by CONFIG.yaml (see README: "
                       "config reference) and write results under --out.")
    r.add_argument("config", help="path to the YAML config")
    r.add_argument("--out", required=True, help="output directory (must be new or empty)")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.add_argument("--resume", action="store_true",
                   help="reuse the finished stages (scores) an interrupted run kept in "
                   "<out>.partial/ when its config, models and version match")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--units", default=None, metavar="KIND,...",
                   help="unit kinds and/or weight (single weights), e.g. head,neuron,weight; "
                   "replaces the config's selection.units")
    r.add_argument("--budget", type=_budgets, default=None, metavar="F1,F2,...",
                   help="parameter budgets (fractions of the block parameters, e.g. 0.01,0.05 "
                   "or 1%%,5%%); replaces the config's sweep.budget (without sweep.k in the "
                   "config, budgets only)")
    r.add_argument("--only-budget", action="store_true",
                   help="with --budget: sweep the budgets only (no K rows), even if the "
                   "config gives sweep.k")
    r.add_argument("--compare", action="store_true",
                   help="evaluate every (method, K or budget) at its best dev alpha on test: "
                   "the comparison table (the choice is still made on dev)")
    r.add_argument("--retention", choices=["auto", "none"], default=None,
                   help="without control_tasks: auto = generic retention proxy (default), "
                   "none = no retention; replaces the config's retention")
    _add_load_flags(r)
    r.set_defaults(func=cmd_run, name="run")

    s = sub.add_parser("score", help="score units of a pair on a task and save the scores",
                       description="Rank units (or single weights) with one scoring method; "
                       "writes JSON or parquet (by the --out suffix), or safetensors for "
                       "weight scores.")
    s.add_argument("--source", required=True, help="source model: hub id or local HF dir")
    s.add_argument("--target", required=True, help="target model: hub id or local HF dir")
    s.add_argument("--task", required=True, help="local JSONL/CSV/parquet task file")
    s.add_argument("--prompt-field", default="prompt")
    s.add_argument("--answer-field", default="answer")
    s.add_argument("--metric", default="next_token_acc")
    s.add_argument("--prepend-bos", default="auto", choices=["auto", "true", "false"])
    s.add_argument("--method", default="attribution")
    s.add_argument("--units", default="head,neuron",
                   help="comma-separated unit kinds: head, kv_head, neuron, linear; or weight "
                   "(single weights: --out .json gets the per-unit view, .safetensors every "
                   "weight's score)")
    s.add_argument("--batch-size", type=_positive_int, default=8)
    s.add_argument("--top", type=_positive_int, default=10, help="how many top units to print")
    s.add_argument("--out", default="scores.json", help="scores file (.json or .parquet)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--device", type=_device, default="cpu")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a scorer option (repeatable), VALUE read as JSON when it parses, "
                   "e.g. --option steps=100 --option lam=0.5")
    s.add_argument("--quiet", action="store_true")
    _add_load_flags(s)
    s.set_defaults(func=cmd_score, name="score")

    e = sub.add_parser("export", help="transplant given units and export an HF directory",
                       description="Apply a transplant (units, alpha) in memory and write the "
                       "edited target as a Hugging Face directory with its manifest.")
    e.add_argument("--source", required=True)
    e.add_argument("--target", required=True)
    e.add_argument("--units", required=True, help="e.g. 'L1.H2,L0.N7,L3.mlp.down_proj'")
    e.add_argument("--alpha", type=_finite_float, default=1.0)
    e.add_argument("--allow-extrapolation", action="store_true",
                   help="accept --alpha outside [0, 1]")
    e.add_argument("--kv", default="group", choices=["group", "none"])
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--device", type=_device, default="cpu")
    _add_load_flags(e)
    e.set_defaults(func=cmd_export, name="export")

    a = add_apply_command(sub)
    a.set_defaults(name="apply")

    pl = sub.add_parser("plan", help="estimate a run's peak memory from its config (no "
                        "weights loaded)")
    pl.add_argument("config", help="path to the YAML config")
    pl.add_argument("--json", action="store_true",
                    help="print a JSON object: peak_bytes (peak RSS of the whole run) and stages")
    pl.set_defaults(func=cmd_plan, name="plan")

    _add_eval_command(sub)

    z = sub.add_parser("pairs", help="list the embedded model pairs")
    z.set_defaults(func=cmd_pairs, name="pairs")
    add_zoo_command(sub)
    return p


# = zoo.REAL_PAIR_NAMES, spelled out to keep --help import-light
REAL_PAIRS = ("smollm2_rtn4", "smollm2_ft_tens", "smollm2_ct_catalog")


def cmd_zoo(args: argparse.Namespace) -> int:
    from tl_transplant import zoo

    if args.zoo_cmd == "list":
        for name in zoo.ALL_PAIR_NAMES:
            if zoo.is_real(name):
                from tl_transplant.zoo.real import is_built, pair_root, spec

                root = pair_root(name)
                state = f"built at {root}" if is_built(root) else "not built"
                print(f"{name} (real, {state}): {spec(name).description}")
            else:
                print(f"{name} (embedded): {zoo.pair_info(name).get('description', '')}")
        return 0
    root = zoo.build(args.pair, args.out, force=args.force, log=print)
    print(f"built {args.pair} -> {root}")
    return 0


def add_zoo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``zoo build NAME [--out DIR]`` and ``zoo list``; returns the ``zoo`` parser."""
    z = subparsers.add_parser("zoo", help="build or list zoo pairs (real pairs are built "
                              "from a real checkpoint into a cache)")
    zs = z.add_subparsers(dest="zoo_cmd", metavar="ZOO_COMMAND", required=True)
    b = zs.add_parser("build", help="build a real zoo pair (deterministic, minutes on CPU)")
    b.add_argument("pair", choices=list(REAL_PAIRS))
    b.add_argument("--out", default=None, help="directory to build into (default "
                   "~/.cache/tl_transplant/zoo/PAIR or $TL_TRANSPLANT_ZOO_CACHE/PAIR)")
    b.add_argument("--force", action="store_true", help="rebuild even if already built")
    zs.add_parser("list", help="list every zoo pair and whether it is built")
    z.set_defaults(func=cmd_zoo, name="zoo")
    return z


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    with _sigterm_as_interrupt(), _short_warnings(args.name):
        try:
            return int(args.func(args) or 0)
        except Terminated:
            print(f"tl-transplant {args.name}: terminated; nothing written", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(f"tl-transplant {args.name}: interrupted; nothing written", file=sys.stderr)
            return 130
        except TLTransplantError as e:  # ours: a user error, one line
            return _err(args.name, e)
        except Exception as e:  # anything else is a bug: say so, with its traceback
            return _bug(args.name, e)


@contextlib.contextmanager
def _short_warnings(cmd: str) -> Iterator[None]:
    """Print warnings as one ``tl-transplant CMD: warning: ...`` line (no source excerpt)."""
    old = warnings.formatwarning

    def fmt(message: Any, category: Any, filename: str, lineno: int, line: Any = None) -> str:
        return f"tl-transplant {cmd}: warning: {message}\n"

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = old


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` so that ``except BaseException`` cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
