"""Benchmark: export vs plain save_pretrained, and peak RSS of scoring and evaluation at N and 4N.

On the tiny llama shape of ``bench_sweep.py`` and on the real zoo pair
``smollm2_rtn4`` (SmolLM2-135M-Instruct vs its 4-bit RTN copy), each in fresh
subprocesses (every peak RSS, ``ru_maxrss``, comes from a process that did
only that one thing):

* export: a process loads the pair, blends K random heads+neurons into the
  target (``apply_transplant``), then times ``tl_transplant.export_hf`` and the
  plain HF way, ``model.save_pretrained(d)`` + ``tokenizer.save_pretrained(d)``
  (``model``: a plain HF model sharing the target's tensors, see ``plain_model``),
  interleaved ``reps`` times (best kept; untimed ``rmtree`` in between), and
  checks the two outputs hold bit-identical tensors under the same names.
  Peak RSS: one process per way (load + apply + one write); what the write
  adds is its own peak minus the RSS just before it (below);
* RSS at N and 4N prompts: one process each for ``evaluate(pair.target, ...)``
  and ``score(pair, ..., method)`` (``attribution`` over heads, KV groups and
  neurons; ``activation_diff`` over heads and neurons) at N and at 4N prompts.
  Flat memory: what the call adds does not grow with N.

What a call adds: right before it the child resets its peak RSS to its
current RSS (``echo 5 > /proc/self/clear_refs``, Linux), and after it reads
the peak (``VmHWM``) again; the difference is the call's own peak above what
was resident, free of the loading peak and of process-to-process noise.

Prompts: tiny, the built-in ``induction`` task (``answer_logprob``); SmolLM2,
the pair's ``add_units`` prompts (~25 tokens, ``next_token_acc``; 80 exist).

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --quick            # both models
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --model smollm2    # N=16, 4N=64

Children use ``OMP_NUM_THREADS=1`` unless it is set. Compare the ratios: the
machine may be shared, and the ratios come from numbers taken close together.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sweep  # noqa: E402  (pair builders shared; it also puts this checkout on sys.path)

#: per model and size: N (RSS is also measured at 4N), export reps, units blended before export.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "full": {**bench_sweep.SIZES["full"], "n": 64, "reps": 3, "k": 256},
        "quick": {**bench_sweep.SIZES["quick"], "n": 16, "reps": 2, "k": 64},
    },
    "smollm2": {
        "full": {"n": 16, "reps": 3, "k": 1024},
        "quick": {"n": 8, "reps": 2, "k": 1024},
    },
}
SCORE_CASES = {
    "attribution": ("head", "kv_head", "neuron"),
    "activation_diff": ("head", "neuron"),
}
ALPHA = 0.5
EVAL_BATCH, SCORE_BATCH = 16, 8
#: Targets: export within 1.2x save_pretrained's time and 1.1x (+ 8 MB) the peak RSS it adds;
#: memory of scoring and evaluation flat: the peak RSS a call adds at 4N <= 1.25x that at N.
EXPORT_TIME_TARGET, EXPORT_RSS_TARGET, FLAT_TARGET = 1.2, 1.1, 1.25


# ---- child side -----------------------------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _start_peak() -> dict[str, Any]:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``), so the peak
    read after a call is the call's own; returns the peak so far and the RSS now (MB)."""
    out: dict[str, Any] = {"load_peak_mb": _rss_mb()}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out.update(rss_before_mb=_status_mb("VmRSS"), reset=True)
    except OSError:  # not Linux, or not allowed: fall back to the peak so far
        out.update(rss_before_mb=out["load_peak_mb"], reset=False)
    return out


def _end_peak(start: dict[str, Any]) -> dict[str, Any]:
    """The call's peak (``rss_mb``: the process's, ``call_peak_mb``: since ``_start_peak``)."""
    call = _status_mb("VmHWM") if start["reset"] else _rss_mb()
    return {**start, "call_peak_mb": call, "rss_mb": max(call, start["load_peak_mb"])}


def _prompts(a: dict[str, Any], n: int) -> Any:
    """n prompts of the model's task (the same first n in every child)."""
    if a["model"] == "smollm2":
        return bench_sweep.real_prompts(n)
    from tl_transplant.tasks.builtin import builtin_task

    return builtin_task("induction", n=n, seed=0, metric="answer_logprob", prepend_bos=True)


def _units(pair: Any, k: int) -> list[Any]:
    """k heads+neurons in a seeded random order (the same in every child)."""
    import numpy as np

    pool = pair.units(["head", "neuron"])
    return [pool[i] for i in np.random.default_rng(0).permutation(len(pool))[:k]]


def _loaded(a: dict[str, Any], apply: bool) -> tuple[Any, float]:
    from tl_transplant import apply_transplant

    t = time.perf_counter()
    pair = bench_sweep.load_pair(a)
    if apply:
        apply_transplant(pair, _units(pair, a["k"]), ALPHA)
    return pair, time.perf_counter() - t


def plain_model(pair: Any) -> Any:
    """A plain HF model holding the target's own tensors (shared, not copied).

    ``pair.target.hf`` itself cannot be saved: the bridge wraps its modules in place, and
    ``save_pretrained`` then fails on the tied-weights check. So the plain way is an HF model
    built on the meta device from the same config, given the side's tensors with
    ``assign=True`` (no copy, no extra memory), then re-tied.
    """
    import torch
    from transformers import AutoModelForCausalLM

    side = pair.target
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(side.config)
    missing, unexpected = model.load_state_dict(side.state_dict(), strict=False, assign=True)
    model.tie_weights()
    left = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if unexpected or left:
        raise SystemExit(f"plain model: unexpected {unexpected[:3]}, still on meta {left[:3]}")
    return model


def _save_plain(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tensors(d: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def child_eval(a: dict[str, Any]) -> dict[str, Any]:
    from tl_transplant.evaluation.evaluator import evaluate

    pair, _ = _loaded(a, False)
    task = _prompts(a, a["n_prompts"])
    start = _start_peak()
    t = time.perf_counter()
    mean = evaluate(pair.target, task, batch_size=EVAL_BATCH, progress=False).mean
    dt = time.perf_counter() - t
    return {**_end_peak(start), "work_s": dt, "mean": mean}


def child_score(a: dict[str, Any]) -> dict[str, Any]:
    from tl_transplant.scoring import score

    pair, _ = _loaded(a, False)
    task = _prompts(a, a["n_prompts"])
    start = _start_peak()
    t = time.perf_counter()
    score(pair, task, a["method"], SCORE_CASES[a["method"]], batch_size=SCORE_BATCH,
          progress=False)
    dt = time.perf_counter() - t
    return {**_end_peak(start), "work_s": dt}


def child_write(a: dict[str, Any]) -> dict[str, Any]:
    """Load + apply, then one write (``a["way"]``: export or save): its peak RSS."""
    from tl_transplant import export_hf

    pair, _ = _loaded(a, True)
    plain = plain_model(pair)
    out = Path(a["out"])
    start = _start_peak()
    t = time.perf_counter()
    if a["way"] == "export":
        export_hf(pair, out, overwrite=True)
    else:
        _save_plain(plain, pair.target.tokenizer, out)
    dt = time.perf_counter() - t
    return {**_end_peak(start), "work_s": dt}


def child_export_time(a: dict[str, Any]) -> dict[str, Any]:
    """Interleaved export_hf / save_pretrained writes of one edited target; bit-identity check."""
    import torch

    from tl_transplant import export_hf

    pair, _ = _loaded(a, True)
    plain = plain_model(pair)
    root = Path(a["out"])
    t_exp, t_save = [], []
    for _ in range(a["reps"]):
        for way, times in (("export", t_exp), ("save", t_save)):
            out = root / way
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            if way == "export":
                export_hf(pair, out)
            else:
                _save_plain(plain, pair.target.tokenizer, out)
            times.append(time.perf_counter() - t)
    te, ts = _tensors(root / "export"), _tensors(root / "save")
    same_keys = set(te) == set(ts)
    differ = [
        k
        for k in te
        if k in ts
        and (
            te[k].dtype != ts[k].dtype
            or not torch.equal(te[k].reshape(-1).view(torch.uint8),
                               ts[k].reshape(-1).view(torch.uint8))
        )
    ]
    return {
        "export_s": t_exp,
        "save_s": t_save,
        "export_mb": _dir_mb(root / "export"),
        "save_mb": _dir_mb(root / "save"),
        "n_tensors": len(te),
        "key_diff": sorted(set(te) ^ set(ts))[:5],
        "same_keys": same_keys,
        "n_differ": len(differ),
        "n_moved": pair.applied[-1].n_params_moved,
        "n_units": a["k"],
        "model": bench_sweep.describe(pair, a),
    }


CHILDREN = {
    "eval": child_eval,
    "score": child_score,
    "write": child_write,
    "export_time": child_export_time,
}


# ---- parent side ----------------------------------------------------------------------


def _run(mode: str, a: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(a)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark child {mode!r} failed (exit {proc.returncode})")
    res = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    res["process_s"] = time.perf_counter() - t
    return res


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def bench_model(model: str, size: str, tmp: Path) -> bool:
    """Run every child for one model, print its two tables; True when the checks pass."""
    a = {**SIZES[model][size], "model": model}
    n = a["n"]
    print(f"\n## {model} ({size}); {_load()}", flush=True)

    # export vs save_pretrained: time (interleaved, one process), then RSS (one process each)
    ex = _run("export_time", {**a, "out": str(tmp / f"{model}_time")})
    rss_w = {
        way: _run("write", {**a, "way": way, "out": str(tmp / f"{model}_{way}")})
        for way in ("export", "save")
    }
    print(f"model: {ex['model']}")
    print(
        f"export: K={ex['n_units']} random heads+neurons blended (alpha {ALPHA}, "
        f"{ex['n_moved'] / 1e6:.2f} M weights moved), then export_hf vs "
        f"hf.save_pretrained + tokenizer.save_pretrained; best of {a['reps']} interleaved"
    )
    w = 32
    print(f"{'':{w}}{'export_hf':>11}{'save_pretr.':>12}{'ratio':>8}   target")
    te, ts = min(ex["export_s"]), min(ex["save_s"])
    print(
        f"{'write time (s)':{w}}{te:11.2f}{ts:12.2f}{te / ts:8.2f}   "
        f"<= {EXPORT_TIME_TARGET} {_verdict(te / ts <= EXPORT_TIME_TARGET)}"
    )
    re_, rs = rss_w["export"]["rss_mb"], rss_w["save"]["rss_mb"]
    ge = rss_w["export"]["call_peak_mb"] - rss_w["export"]["rss_before_mb"]
    gs = rss_w["save"]["call_peak_mb"] - rss_w["save"]["rss_before_mb"]
    print(f"{'peak RSS (MB)':{w}}{re_:11.0f}{rs:12.0f}{re_ / rs:8.2f}")
    print(
        f"{'peak RSS added by the write':{w}}{ge:11.0f}{gs:12.0f}{'':8}   "
        f"export <= {EXPORT_RSS_TARGET} x save + 8 MB "
        f"{_verdict(ge <= EXPORT_RSS_TARGET * gs + 8)}   (RSS before the write: "
        f"{rss_w['export']['rss_before_mb']:.0f} / {rss_w['save']['rss_before_mb']:.0f} MB)"
    )
    print(f"{'output size (MB)':{w}}{ex['export_mb']:11.1f}{ex['save_mb']:12.1f}")
    ok_export = ex["same_keys"] and ex["n_differ"] == 0
    print(
        f"check: same tensor names {ex['same_keys']} {ex['key_diff'] or ''}; bit-identical "
        f"{ex['n_tensors'] - ex['n_differ']}/{ex['n_tensors']}"
    )

    # peak RSS at N and 4N prompts
    rows = [("evaluate", "eval", {})] + [
        (f"score {m}", "score", {"method": m}) for m in SCORE_CASES
    ]
    print(
        f"\npeak RSS at N={n} and 4N={4 * n} prompts, one fresh process each "
        f"(eval batch {EVAL_BATCH}, score batch {SCORE_BATCH}); {_load()}"
    )
    print(
        f"{'':{w}}{'RSS@N':>7}{'RSS@4N':>8}{'4N/N':>6}{'+@N':>7}{'+@4N':>7}{'+4N/+N':>8}"
        f"{'t@N s':>7}{'t@4N s':>8}   target (+4N/+N)"
    )
    ok_flat = True
    for label, mode, extra in rows:
        r1 = _run(mode, {**a, **extra, "n_prompts": n})
        r4 = _run(mode, {**a, **extra, "n_prompts": 4 * n})
        d1 = r1["call_peak_mb"] - r1["rss_before_mb"]
        d4 = r4["call_peak_mb"] - r4["rss_before_mb"]
        flat = d4 / max(d1, 1.0)
        ok_flat &= flat <= FLAT_TARGET
        print(
            f"{label:{w}}{r1['rss_mb']:7.0f}{r4['rss_mb']:8.0f}{r4['rss_mb'] / r1['rss_mb']:6.2f}"
            f"{d1:7.0f}{d4:7.0f}{flat:8.2f}{r1['work_s']:7.1f}{r4['work_s']:8.1f}   "
            f"<= {FLAT_TARGET} {_verdict(flat <= FLAT_TARGET)}",
            flush=True,
        )
    print(
        "(RSS = the process's peak, loading included; + = the call's own peak minus the RSS "
        "just before it (peak reset by clear_refs), MB; t = the call's wall time)"
    )
    print(
        "peak reset via /proc/self/clear_refs: "
        + ("yes" if r1.get("reset") else "NO (+ is above the loading peak; may read 0)")
    )
    del ok_flat  # a missed target is reported, not a failure; only the checks fail the run
    return ok_export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and reps, smaller tiny")
    ap.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, spec = args.child
        out = CHILDREN[mode](json.loads(spec))
        print("BENCH_RESULT " + json.dumps(out), flush=True)
        return 0

    size = "quick" if args.quick else "full"
    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {size} sizes; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; {_load()}",
        flush=True,
    )
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for model in models:
            ok &= bench_model(model, size, Path(tmp))
    print(f"\n# done {time.strftime('%H:%M:%S')}; {_load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
