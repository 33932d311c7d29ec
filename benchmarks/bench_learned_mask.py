"""learned_mask before/after on the real zoo pairs: cost against attribution, and test quality.

    OMP_NUM_THREADS=1 python benchmarks/bench_learned_mask.py --pair smollm2_rtn4 \\
        [--n-dev 96] [--old-quality] [--no-weights] [--json out.json]

One process, one pair (``smollm2_rtn4`` or ``smollm2_ft_tens``, built under
``~/.cache/tl_transplant/zoo``). Prompts: the pair's 40 dev items plus fresh items of the same
generator up to ``--n-dev`` (drawn with the pair's seed past every dev, test and fine-tuning
row, so dev and test stay disjoint); test = the pair's 40 test items; retention = its
capitals and antonyms test items.

**Cost** (side by side in this process, wall and CPU seconds; the CPU time of a one-thread
process is what the machine's load distorts least): one unit-level ``attribution`` pass
(heads + neurons) over the ``--n-dev`` prompts, the *old* configuration (the code of commit
:data:`OLD_REV`, loaded from git, every step a full pass, with the real-pair demo's
``steps=40, lr=0.3, lam_sparse=10``), extrapolated linearly from runs of 1 and
``--old-cost-steps`` steps, and the new default run whole; the weight-level learned_mask
(default) and weight-level attribution too. Each method's peak RSS above what the process
held before it (sampled every 20 ms).

**Quality** (alpha 1, as the README's real-pair protocol): test gap recovery [95% CI] and the
worst retention drop at 1%, 2% and 5% of block parameters (units: heads + neurons, filled by
each ranking's budget rule) and of each suggested set, for the new default trained on the 40
dev items and on ``--n-dev`` items, and with ``--old-quality`` for the old configuration on
the 40 dev items (what the README reported; ~1600 prompt passes, long). Weight level: the
weight learned_mask and weight attribution at 0.01%, 0.1% and 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tl_transplant import Task, evaluate, score, transplant, zoo
from tl_transplant.evaluation.evaluator import retention, transplant_metrics
from tl_transplant.zoo.real import FineTune, spec, task_rows, training_rows

OLD = {"steps": 40, "lr": 0.3, "lam_sparse": 10.0}
UNITS = ("head", "neuron")
#: The commit whose learned_mask is "before" (every step a full pass over every prompt, the
#: relaxed weights rebuilt per batch); loaded from git as the scorer ``learned_mask_old``.
OLD_REV = "3863fd7"


def old_scorer() -> tuple[str, dict[str, Any]]:
    """Register the learned_mask of :data:`OLD_REV` as ``learned_mask_old`` (the code as it
    was), or fall back to today's code with ``minibatch=None`` when git cannot show it."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(
            ["git", "show", f"{OLD_REV}:tl_transplant/scoring/learned_mask.py"], cwd=root,
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        print(f"  (git cannot show {OLD_REV}: 'old' is today's code with minibatch=None)")
        return "learned_mask", {**OLD, "minibatch": None}
    src = src.replace('name = "learned_mask"', 'name = "learned_mask_old"')
    mod = types.ModuleType("learned_mask_old")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{OLD_REV}:learned_mask.py", "exec"), mod.__dict__)
    return "learned_mask_old", dict(OLD)


class PeakRSS:
    """Peak resident memory (GB) of this process while the block runs, sampled in a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0.0
        self.before = 0.0
        self._stop = threading.Event()

    def now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page / 2**30

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = self.now()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())

    @property
    def extra(self) -> float:
        return self.peak - self.before


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """(result, wall s, CPU s, peak RSS above the start in GB)."""
    with PeakRSS() as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return out, wall, cpu, mem.extra


def tasks(name: str, n_dev: int) -> dict[str, Any]:
    """dev40 / devN / test of the capability task, and the retention test tasks."""
    s = spec(name)
    dev, test = task_rows(s.capability, s.n_dev, s.n_test, s.seed)
    held = {p for p, _ in (*dev, *test)}
    if isinstance(s.recipe, FineTune):
        held |= {p for p, _ in training_rows(s, s.recipe.n_train, s.recipe.seed)}
    extra_n = max(0, n_dev - len(dev))
    _, pool = task_rows(s.capability, 0, len(held) + extra_n, s.seed)
    extra = [r for r in pool if r[0] not in held][:extra_n]
    assert len(extra) == extra_n, "not enough fresh items"
    zt = zoo.load_tasks(name)
    assert list(zt["task"].dev.prompts) == [p for p, _ in dev], "zoo dev file != generator"
    assert list(zt["task"].test.prompts) == [p for p, _ in test], "zoo test file != generator"

    def mk(rows: list[tuple[str, str]], label: str) -> Task:
        return Task(f"{name}:{label}", [p for p, _ in rows], [a for _, a in rows],
                    metric="next_token_acc", prepend_bos=True)

    return {"dev40": mk(dev, "dev40"), "devN": mk(dev + extra, f"dev{n_dev}"),
            "test": mk(test, "test"),
            "retention": [sp.test for k, sp in zt.items() if k != "task"]}


class TestEval:
    """Test recovery (paired bootstrap CI) and worst retention drop of a selection at alpha 1."""

    def __init__(self, pair: Any, task: Task, controls: list[Task]) -> None:
        self.pair, self.task, self.controls = pair, task, controls
        self.src = evaluate(pair.source, task, progress=False)
        self.tgt = evaluate(pair.target, task, progress=False)
        self.before = [evaluate(pair.target, c, progress=False) for c in controls]

    def __call__(self, sel: Any) -> dict[str, Any]:
        with transplant(self.pair, sel, 1.0):
            x = evaluate(self.pair.target, self.task, progress=False)
            after = [evaluate(self.pair.target, c, progress=False) for c in self.controls]
        m = transplant_metrics(self.tgt, x, self.src, warn=False)
        drop = max(retention(b, a).drop for b, a in zip(self.before, after))
        return {"recovery": m.recovery, "ci": m.ci.get("recovery"), "drop": drop,
                "metric": m.transplanted}


def fmt(r: dict[str, Any]) -> str:
    ci = r.get("ci")
    c = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    rec = "n/a" if r["recovery"] is None else f"{r['recovery']:.2f}"
    return f"{rec}{c} · drop {100 * r['drop']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", default="smollm2_rtn4")
    ap.add_argument("--n-dev", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--old-cost-steps", type=int, default=3)
    ap.add_argument("--old-quality", action="store_true")
    ap.add_argument("--no-weights", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--new", default="{}", help="JSON options of the 'new' runs (default: the "
                    "scorer's defaults), e.g. for a smoke run")
    args = ap.parse_args()
    new = json.loads(args.new)
    name, bs = args.pair, args.batch_size
    t = tasks(name, args.n_dev)
    pair = zoo.load_pair(name)
    layout = pair.layout
    rec: dict[str, Any] = {"pair": name, "n_dev": args.n_dev, "batch_size": bs, "new": new,
                           "threads": torch.get_num_threads(), "load_start": os.getloadavg(),
                           "cost": {}, "quality": {}}
    print(f"{name}: dev {args.n_dev} prompts (40 zoo dev + {args.n_dev - 40} fresh), test 40, "
          f"batch {bs}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    dev = t["devN"]
    common = dict(batch_size=bs, progress=False)
    old_name, old_opts = old_scorer()
    rec["old"] = {"scorer": old_name, "rev": OLD_REV, "options": old_opts}

    # ---- cost -------------------------------------------------------------------------
    cost = rec["cost"]

    def run_cost(label: str, fn: Callable[[], Any]) -> Any:
        out, wall, cpu, mem = timed(fn)
        cost[label] = {"wall": wall, "cpu": cpu, "rss_extra_gb": mem, "load": os.getloadavg()[0]}
        print(f"  {label:34s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  +rss {mem:.2f} GB  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        return out

    run_cost("attribution", lambda: score(pair, dev, "attribution", UNITS, **common))
    run_cost("old 1 step", lambda: score(pair, dev, old_name, UNITS, **common,
                                         **{**old_opts, "steps": 1}))
    k = args.old_cost_steps
    run_cost(f"old {k} steps", lambda: score(pair, dev, old_name, UNITS, **common,
                                             **{**old_opts, "steps": k}))
    new_n = run_cost("new default", lambda: score(pair, dev, "learned_mask", UNITS, **common,
                                                  **new))
    ws_lm = ws_att = None
    if not args.no_weights:
        ws_att = run_cost("attribution (weights)",
                          lambda: score(pair, dev, "attribution", units="weight", **common))
        ws_lm = run_cost("learned_mask (weights), default",
                         lambda: score(pair, dev, "learned_mask", units="weight", **common,
                                       **new))
    a1, ak = cost["old 1 step"], cost[f"old {k} steps"]
    for clock in ("wall", "cpu"):
        per = (ak[clock] - a1[clock]) / (k - 1)
        cost.setdefault("old 40 steps (extrapolated)", {})[clock] = a1[clock] + 39 * per
    print(f"ratios to one attribution pass ({args.n_dev} prompts):", flush=True)
    for label in ("old 40 steps (extrapolated)", "new default", "attribution (weights)",
                  "learned_mask (weights), default"):
        if label in cost:
            r = {c: cost[label][c] / cost["attribution"][c] for c in ("wall", "cpu")}
            cost[label]["ratio"] = r
            print(f"  {label:34s} {r['wall']:6.1f}x wall  {r['cpu']:6.1f}x cpu", flush=True)

    # ---- quality ----------------------------------------------------------------------
    ev = TestEval(pair, t["test"], t["retention"])
    print(f"test: source {ev.src.mean:.3f}, target {ev.tgt.mean:.3f}", flush=True)
    runs: dict[str, Any] = {f"new default, dev {args.n_dev}": new_n}
    runs["new default, dev 40"] = score(pair, t["dev40"], "learned_mask", UNITS, **common, **new)
    if args.old_quality:
        runs["old (40 full steps), dev 40"] = score(pair, t["dev40"], old_name, UNITS,
                                                    **common, **old_opts)
    q = rec["quality"]
    for label, s in runs.items():
        row: dict[str, Any] = {}
        for f in (0.01, 0.02, 0.05):
            sel = s.within_budget(f, layout)
            row[f"{100 * f:g}%"] = ev(sel)
        sug = s.meta["suggested"]
        if sug:
            row["suggested"] = {**ev(sug), "frac_params": s.meta["suggested_frac_params"]}
        q[label] = row
        print(f"  {label:30s} " + " | ".join(f"{k}: {fmt(v)}" for k, v in row.items())
              + (f" (suggested {100 * s.meta['suggested_frac_params']:.2f}% of params)"
                 if sug else ""), flush=True)
    for label, ws in (("weights: learned_mask", ws_lm), ("weights: attribution", ws_att)):
        if ws is None:
            continue
        row = {}
        for f in (0.0001, 0.001, 0.01):
            row[f"{100 * f:g}%"] = ev(ws.within_budget(f, layout))
        if ws.suggested is not None and ws.suggested.n_params:
            row["suggested"] = {**ev(ws.suggested),
                                "frac_params": ws.suggested.n_params / ws.meta["block_params"]}
        q[label] = row
        print(f"  {label:30s} " + " | ".join(f"{k}: {fmt(v)}" for k, v in row.items()),
              flush=True)
    rec["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rec["load_end"] = os.getloadavg()
    print(f"peak RSS {rec['peak_rss_gb']:.2f} GB, load {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
