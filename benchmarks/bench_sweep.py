"""Benchmark: a K x alpha sweep with the reversible transplant against deepcopy-per-configuration.

``--model tiny`` (default) builds a Llama-architecture pair from a config
(random weights; the source is the target plus Gaussian noise) and a built-in
word task (``induction``, scored by ``answer_logprob`` so that every
configuration gives a distinct number) split into dev/test. ``--model smollm2``
loads the real zoo pair ``smollm2_rtn4`` (SmolLM2-135M-Instruct vs its 4-bit
RTN copy, built once into the zoo cache) and its ``add_units`` dev/test
prompts (``next_token_acc``). Both use a seeded random ranking of heads and
neurons; the sweep has S = len(ks) x len(alphas) configurations. Two
subprocesses, so that each peak RSS (``ru_maxrss``) is clean:

* reversible: ``sweep(pair, task, scores, ks, alphas)`` (timed; it also
  evaluates source and target on dev, 2 evals, and source, target and the
  chosen configuration on test, 3 evals of the same size), bracketed by S
  plain evals of dev just before and just after (their mean is the S x one
  eval that the sweep is divided by, so a load change cannot skew that ratio);
  its peak RSS is read right after. Then, for each configuration, interleaved so that a busy
  machine slows every way alike: one plain evaluation of dev on the target;
  ``transplant(...)`` construction (plan) + apply + revert; ``with
  transplant(...): evaluate``; and the naive way (below), in the same process
  for time only;
* naive: for each configuration ``copy.deepcopy`` of the target (HF model +
  bridge, as ``pair.target`` holds them), blend the same units into the copy
  (``transplant(...).apply()`` on a pair with the copy, never reverted),
  evaluate, drop the copy (``gc.collect()`` between configurations, untimed:
  the naive way at its leanest); for peak RSS.

The peak RSS of each child once the pair is built and one eval has run is
the floor (python + torch + both models). Each time is the best of its runs
(``passes`` rounds, ``reps`` apply+revert per round). Printed: sizes, a
per-configuration table, and the ratios side by side: sweep / (S x one
eval), apply+revert / one eval, naive vs reversible for time and peak RSS.
It checks that both ways and ``sweep`` give the same dev metric for every
configuration and that the sweep leaves the target bit-exact (exit 1 if not).

    OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py            # ~2 min on one core
    OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py --quick    # smaller, ~30 s
    OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py --model smollm2 [--quick]   # S = 4

Children use ``OMP_NUM_THREADS=1`` unless it is set. Times are wall-clock;
on a shared machine compare the ratios, which come from times taken close
together.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Measure this checkout's tl_transplant (children run this file; its folder is sys.path[0]).
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "full": dict(
        hidden=512,
        layers=8,
        heads=8,
        kv=4,
        inter=1408,
        n=128,
        ks=[8, 32, 128, 512],
        reps=2,
        passes=2,
    ),
    "quick": dict(
        hidden=256, layers=4, heads=8, kv=4, inter=704, n=64, ks=[8, 64], reps=2, passes=1
    ),
}
#: SmolLM2 (``smollm2_rtn4``): dev/test prompts taken from the pair's add_units splits (40 each).
REAL_SIZES = {
    "full": dict(n_dev=40, n_test=40, ks=[64, 1024], reps=2, passes=1),
    "quick": dict(n_dev=16, n_test=16, ks=[64, 1024], reps=1, passes=1),
}
REAL_PAIR = "smollm2_rtn4"
ALPHAS = [0.5, 1.0]
#: Targets: apply+revert <= 0.1 x one eval (mean over configurations); sweep() <= 1.1 x its
#: protocol's cost, (S + 5) evals + (S + 1) apply+reverts.
AR_TARGET, SWEEP_TARGET = 0.1, 1.1


# ---- child side -----------------------------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_pair(a: dict[str, Any]) -> Any:
    """The benchmark pair: ``a["model"] == "smollm2"``: the real zoo pair; else a tiny llama."""
    import tempfile

    from tl_transplant import ModelPair
    from tl_transplant.testing import perturbed_copy, tiny_model, word_tokenizer

    if a.get("model", "tiny") == "smollm2":
        from tl_transplant import zoo

        return zoo.load_pair(REAL_PAIR)
    tok_dir = tempfile.mkdtemp(prefix="tl_transplant_bench_tok_")
    atexit.register(shutil.rmtree, tok_dir, ignore_errors=True)
    tok = word_tokenizer(tok_dir)
    target = tiny_model(
        "llama",
        seed=0,
        hidden_size=a["hidden"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv"],
        intermediate_size=a["inter"],
        max_position_embeddings=128,
    )
    source = perturbed_copy(target, scale=0.02, seed=1)
    return ModelPair.load((source, tok), (target, tok))


def real_prompts(n: int) -> Any:
    """The first ``n`` add_units prompts of ``smollm2_rtn4`` (dev, then test; 80 in all)."""
    from tl_transplant import zoo
    from tl_transplant.tasks.task import Task

    sp = zoo.load_tasks(REAL_PAIR)["task"]
    prompts, answers = [*sp.dev.prompts, *sp.test.prompts], [*sp.dev.answers, *sp.test.answers]
    if n > len(prompts):
        raise SystemExit(f"{REAL_PAIR} has {len(prompts)} add_units prompts; asked for {n}")
    return Task(f"{REAL_PAIR}:add_units", prompts[:n], answers[:n], metric=sp.dev.metric,
                prepend_bos=sp.dev.prepend_bos)


def _setup(a: dict[str, Any]) -> dict[str, Any]:
    """Build the pair, task splits and the ranking (identical in every child)."""
    import numpy as np

    from tl_transplant.tasks.builtin import builtin_task

    pair = load_pair(a)
    if a.get("model", "tiny") == "smollm2":
        from tl_transplant import zoo

        sp = zoo.load_tasks(REAL_PAIR)["task"]
        dev = sp.dev.subset(range(a["n_dev"]))
        test = sp.test.subset(range(a["n_test"]))
        task = None
    else:
        task = builtin_task("induction", n=a["n"], seed=0, metric="answer_logprob",
                            prepend_bos=True)
        dev, test = task.split(0.5, 0)
    pool = pair.units(["head", "neuron"])
    order = np.random.default_rng(0).permutation(len(pool))
    ranking = [pool[i] for i in order[: max(a["ks"])]]
    configs = [(k, alpha) for k in a["ks"] for alpha in ALPHAS]
    return dict(pair=pair, task=task, dev=dev, test=test, ranking=ranking, configs=configs)


def _digest(side: Any) -> str:
    import hashlib

    from tl_transplant.edit.edits import tensor_sha256

    h = hashlib.sha256()
    for k in sorted(side.params):
        h.update(f"{k}:{tensor_sha256(side.params[k])}".encode())
    for k, v in sorted(side.bridge.state_dict().items()):
        h.update(f"{k}:{tensor_sha256(v)}".encode())
    return h.hexdigest()


def _naive_config(pair: Any, dev: Any, units: list[Any], alpha: float) -> tuple[float, ...]:
    """Deepcopy the target, blend the units into the copy, evaluate: (copy s, edit s, eval s, m)."""
    import copy

    from tl_transplant import ModelPair
    from tl_transplant.edit.edits import transplant
    from tl_transplant.evaluation.evaluator import evaluate

    t0 = time.perf_counter()
    side = copy.deepcopy(pair.target)
    t1 = time.perf_counter()
    transplant(ModelPair(pair.source, side), units, alpha).apply()  # never reverted
    t2 = time.perf_counter()
    mean = evaluate(side, dev, progress=False).mean
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, mean


def child_reversible(a: dict[str, Any]) -> dict[str, Any]:
    """Sweeps (then RSS is read), then every configuration each way, interleaved, for time."""
    import gc
    import warnings

    from tl_transplant.edit.edits import transplant
    from tl_transplant.evaluation.evaluator import evaluate
    from tl_transplant.sweeps.protocol import RankedUnits, sweep

    s = _setup(a)
    pair, dev, ranking = s["pair"], s["dev"], s["ranking"]
    evaluate(pair.target, dev, progress=False)  # warm-up
    rss_floor = _rss_mb()
    digest = _digest(pair.target)
    t_sweep, t_block = [], []
    n_configs = len(s["configs"])

    def eval_block() -> float:
        """S plain evals of dev on the target: the denominator of sweep / (S x one eval)."""
        t = time.perf_counter()
        for _ in range(n_configs):
            evaluate(pair.target, dev, progress=False)
        return time.perf_counter() - t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(a["passes"]):
            before = eval_block()
            t = time.perf_counter()
            res = sweep(
                pair,
                (s["dev"], s["test"]),
                RankedUnits(ranking, method="random"),
                ks=a["ks"],
                alphas=ALPHAS,
                control_tasks=(),  # the protocol timed here has no control task
                progress=False,
                report_each_method=False,
            )
            t_sweep.append(time.perf_counter() - t)
            t_block.append((before + eval_block()) / 2)  # S evals just before and just after
    restored = _digest(pair.target) == digest
    rss = _rss_mb()  # everything after this (deepcopies) is not part of the reversible way

    # Each quantity: the best (least disturbed) of its runs; all passes interleave the ways.
    rows = [
        {"k": k, "alpha": alpha, "sweep_metric": r.metric, "naive": math.inf}
        for (k, alpha), r in zip(s["configs"], res.rows)
    ]
    for _ in range(a["passes"]):
        for row in rows:
            units, alpha = ranking[: row["k"]], row["alpha"]
            t = time.perf_counter()
            evaluate(pair.target, dev, progress=False)
            row["eval"] = min(row.get("eval", math.inf), time.perf_counter() - t)
            for _ in range(a["reps"]):
                t0 = time.perf_counter()
                tr = transplant(pair, units, alpha)
                t1 = time.perf_counter()
                tr.apply()
                t2 = time.perf_counter()
                tr.restore()
                t3 = time.perf_counter()
                for key, dt in (("plan", t1 - t0), ("apply", t2 - t1), ("restore", t3 - t2)):
                    row[key] = min(row.get(key, math.inf), dt)
            t = time.perf_counter()
            with transplant(pair, units, alpha):
                row["metric"] = evaluate(pair.target, dev, progress=False).mean
            row["rev"] = min(row.get("rev", math.inf), time.perf_counter() - t)
            t_copy, t_edit, t_ev, row["naive_metric"] = _naive_config(pair, dev, units, alpha)
            gc.collect()
            if t_copy + t_edit + t_ev < row["naive"]:
                row.update(copy=t_copy, edit=t_edit, naive_eval=t_ev, naive=t_copy + t_edit + t_ev)
            row.update(
                n_tensors=len(tr.plan.masks),
                n_weights=tr.plan.n_params,
                tensor_elems=sum(math.prod(sh) for sh in tr.plan.shapes.values()),
            )
    for row in rows:
        row["diff_naive"] = abs(row["metric"] - row.pop("naive_metric"))
        row["diff_sweep"] = abs(row["metric"] - row.pop("sweep_metric"))
    return {
        "rss_floor_mb": rss_floor,
        "rss_mb": rss,
        "t_sweep": min(t_sweep),
        "sweep_ratio": min(x / y for x, y in zip(t_sweep, t_block)),
        "t_block": min(t_block),
        "restored": restored,
        "rows": rows,
    }


def child_naive(a: dict[str, Any]) -> dict[str, Any]:
    """The naive way over all configurations, for its peak RSS."""
    import gc

    from tl_transplant.evaluation.evaluator import evaluate

    s = _setup(a)
    pair, dev, ranking = s["pair"], s["dev"], s["ranking"]
    evaluate(pair.target, dev, progress=False)  # warm-up
    rss_floor = _rss_mb()
    for k, alpha in s["configs"]:
        _naive_config(pair, dev, ranking[:k], alpha)
        gc.collect()
    side = pair.target
    return {
        "rss_floor_mb": rss_floor,
        "rss_mb": _rss_mb(),
        "model": describe(pair, a),
        "task": f"{s['dev'].name.split(':dev')[0]} ({s['dev'].metric})",
        "n_params": side.identity["n_params"],
        "weight_mb": sum(v.numel() * v.element_size() for v in side.params.values()) / 2**20,
        "n_units": len(pair.units(["head", "neuron"])),
        "n_dev": len(s["dev"]),
        "n_test": len(s["test"]),
    }


CHILDREN = {"reversible": child_reversible, "naive": child_naive}


def describe(pair: Any, a: dict[str, Any]) -> str:
    """One line naming the model: where it comes from and its shape."""
    c = pair.target.config
    what = (
        f"zoo pair {REAL_PAIR} (SmolLM2-135M-Instruct float32 vs 4-bit RTN)"
        if a.get("model", "tiny") == "smollm2"
        else "Llama from config (random weights)"
    )
    n = pair.target.identity["n_params"]
    mb = sum(v.numel() * v.element_size() for v in pair.target.params.values()) / 2**20
    return (
        f"{what}, {c.num_hidden_layers} layers, d={c.hidden_size}, d_mlp={c.intermediate_size}, "
        f"heads={c.num_attention_heads}/{c.num_key_value_heads} kv, vocab {c.vocab_size}: "
        f"{n / 1e6:.1f} M params, {mb:.0f} MB per model"
    )


# ---- parent side ----------------------------------------------------------------------


def _run(mode: str, a: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, task and sweep")
    ap.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help=f"tiny: a llama from config; smollm2: the zoo pair {REAL_PAIR}",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, spec = args.child
        out = CHILDREN[mode](json.loads(spec))
        print("BENCH_RESULT " + json.dumps(out), flush=True)
        return 0

    size = "quick" if args.quick else "full"
    a = {**(REAL_SIZES if args.model == "smollm2" else SIZES)[size], "model": args.model}
    S = len(a["ks"]) * len(ALPHAS)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; --model {args.model} ({size} sizes); "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    print("running 2 subprocesses ...", flush=True)
    rev = _run("reversible", a)
    print(f"  reversible (+ interleaved timing) {rev['process_s']:5.1f} s", flush=True)
    nai = _run("naive", a)
    print(f"  naive                             {nai['process_s']:5.1f} s", flush=True)

    rows = rev["rows"]

    def tot(key: str) -> float:
        return sum(r[key] for r in rows)

    ev = tot("eval") / S
    print()
    print(f"model: {nai['model']}")
    print(
        f"task: {nai['task']}, dev n={nai['n_dev']}, test n={nai['n_test']}, "
        f"batch 16; ranking: random over {nai['n_units']} heads+neurons"
    )
    print(
        f"sweep: S={S} configurations, K in {a['ks']} x alpha in {ALPHAS}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
    )
    print()
    print(
        f"per configuration, interleaved in one process (ms, best of {a['passes']} rounds; "
        f"apply+revert best of {a['passes'] * a['reps']}; plan = transplant() constructor)"
    )
    print(
        f"{'K':>4}{'alpha':>6}{'tensors':>8}{'moved':>8}{'in-tens.':>10}{'eval':>7}"
        f"{'plan':>6}{'apply':>7}{'revert':>7}{'a+r':>6}{'/eval':>7}{'rev':>7}{'naive':>7}"
        f"{'copy':>6}{'n/rev':>7}"
    )
    fracs = []
    for r in rows:
        ar = r["plan"] + r["apply"] + r["restore"]
        fracs.append(ar / r["eval"])
        print(
            f"{r['k']:4d}{r['alpha']:6.1f}{r['n_tensors']:8d}{r['n_weights']:8d}"
            f"{r['tensor_elems']:10d}{r['eval'] * 1e3:7.0f}{r['plan'] * 1e3:6.0f}"
            f"{r['apply'] * 1e3:7.0f}{r['restore'] * 1e3:7.0f}{ar * 1e3:6.0f}"
            f"{ar / r['eval']:7.3f}{r['rev'] * 1e3:7.0f}{r['naive'] * 1e3:7.0f}"
            f"{r['copy'] * 1e3:6.0f}{r['naive'] / r['rev']:7.2f}"
        )
    print(
        "(moved = weights blended; in-tensors = elements of the tensors they live in (apply "
        "and revert index the moved ones only); rev = with transplant(...): eval; "
        "naive = deepcopy + edit + eval)"
    )
    print()
    ar_mean = sum(fracs) / len(fracs)
    rss_f = min(rev["rss_floor_mb"], nai["rss_floor_mb"])
    above_r, above_n = rev["rss_mb"] - rss_f, nai["rss_mb"] - rss_f
    w = 46
    print(f"{'':{w}}{'reversible':>11}{'naive':>9}{'naive/rev':>11}")
    print(f"{'one eval of dev on the target (ms, mean)':{w}}{ev * 1e3:11.0f}")
    print(f"{'apply+revert / one eval (mean over configs)':{w}}{ar_mean:11.3f}")
    print(f"{'deepcopy of the target / one eval':{w}}{'':>11}{tot('copy') / tot('eval'):9.3f}")
    print(
        f"{'loop of S configs / (S x one eval)':{w}}{tot('rev') / tot('eval'):11.3f}"
        f"{tot('naive') / tot('eval'):9.3f}{tot('naive') / tot('rev'):11.2f}"
    )
    print(
        f"{'sweep() call / (S x one eval)':{w}}{rev['sweep_ratio']:11.3f}"
        f"{'':>9}{'':>11}   from the parts: {(S + 5 + (S + 1) * ar_mean) / S:.3f} "
        f"(S + 5 evals, S + 1 apply+reverts)"
    )
    print(
        f"{'peak RSS (MB)':{w}}{rev['rss_mb']:11.0f}{nai['rss_mb']:9.0f}"
        f"{nai['rss_mb'] / rev['rss_mb']:11.2f}   floor (pair + 1 eval) {rss_f:.0f} MB"
    )
    print(
        f"{'peak RSS above floor (MB)':{w}}{above_r:11.0f}{above_n:9.0f}"
        f"{above_n / max(above_r, 1.0):11.2f}   one target copy = {nai['weight_mb']:.0f} MB"
    )
    parts = (S + 5 + (S + 1) * ar_mean) / S
    worst = max(range(len(rows)), key=lambda i: fracs[i])
    print(
        f"targets: apply+revert / eval <= {AR_TARGET} (mean): "
        f"{'ok' if ar_mean <= AR_TARGET else 'MISSED'} ({ar_mean:.3f}; worst K={rows[worst]['k']} "
        f"alpha={rows[worst]['alpha']}: {fracs[worst]:.3f} "
        f"{'ok' if fracs[worst] <= AR_TARGET else 'MISSED'}); sweep() <= {SWEEP_TARGET} x parts: "
        f"{'ok' if rev['sweep_ratio'] <= SWEEP_TARGET * parts else 'MISSED'} "
        f"({rev['sweep_ratio'] / parts:.2f} x)"
    )
    print()
    d_naive = max(r["diff_naive"] for r in rows)
    d_sweep = max(r["diff_sweep"] for r in rows)
    print(
        f"checks: same dev metric both ways (max |diff| {d_naive:.1e}) and as sweep() "
        f"(max |diff| {d_sweep:.1e}); target bit-exact after the sweep: {rev['restored']}"
    )
    print(f"# done {time.strftime('%H:%M:%S')}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if rev["restored"] and d_naive < 1e-6 and d_sweep < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
