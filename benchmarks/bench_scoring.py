"""Benchmark scoring: time vs plain HF forward(/backward), and peak RSS at N and 4N prompts.

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py [--quick] [--suites tiny,patch,smollm2]

Three suites, each measurement in a fresh subprocess (clean RSS, no shared warm
state), one table per suite (see benchmarks/README.md for the latest numbers):

* ``tiny``: a small offline llama-family pair (GQA, ``--d-model``/``--layers``),
  the activation scorers vs plain HF forwards, plus peak RSS (below);
* ``patch``: ``activation_patch`` over every head, KV group, neuron and linear
  of the zoo's ``cross_generation`` pair (the tiny held-out shape) vs
  ``attribution`` over the same units, prompts and batches (target <= 20x);
* ``smollm2``: SmolLM2-135M-Instruct (``fetch_real_model``, cached) against a
  perturbed copy of itself, ``attribution`` and ``activation_diff`` on
  ``--real-n`` prompts vs plain HF forward(+backward) of both models
  (target <= 1.3x).

``--quick`` shrinks every suite (fewer prompts and reps, no 4N RSS run) so the
whole benchmark takes a minute or two. In the ``tiny`` suite:

* ``time``: ``score(...)`` wall time divided by the baseline over the same
  prompts and batches: a plain (un-bridged, un-hooked) HF forward of both
  models for the activation scorers; for ``attribution``, a plain HF forward of
  the source plus forward + ``loss.backward()`` of the target (loss = summed
  answer log-prob; weight gradients included, as in an ordinary training step).
  Baseline and scoring runs are interleaved, ``--reps`` times; the median ratio
  is reported (and the min, since the machine may be shared).
* ``rss``: peak resident memory of a process that loads the pair and scores N
  (then, in another process, 4N) prompts.

Targets: tiny ratio <= 1.15 and flat memory (issue 3); patch <= 20x (issue 13);
smollm2 <= 1.3x (issue 11).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASES = {
    # name: (method, units, options, baseline)
    "activation_diff": ("activation_diff", ("head", "neuron"), {}, "fwd"),
    "activation_diff[all kinds; positions=all]": (
        "activation_diff", ("head", "kv_head", "neuron", "linear"), {"positions": "all"}, "fwd"),
    "paper_l1": ("paper_l1", "linear", {}, "fwd"),
    "attribution": ("attribution", ("head", "kv_head", "neuron"), {}, "fwd_bwd"),
}
#: activation_patch vs attribution on the zoo's cross_generation pair (baseline "attribution").
PATCH_CASES = {
    "activation_patch[all kinds]": (
        "activation_patch", ("head", "kv_head", "neuron", "linear"), {}, "attribution"),
}
#: SmolLM2 vs a perturbed copy of itself.
REAL_CASES = {
    "smollm2 attribution": ("attribution", ("head", "kv_head", "neuron"), {}, "fwd_bwd"),
    "smollm2 activation_diff": ("activation_diff", ("head", "neuron"), {}, "fwd"),
}
ALL_CASES = {**CASES, **PATCH_CASES, **REAL_CASES}


def make_prompts(n: int, length: int, seed: int = 0) -> tuple[list[str], list[str]]:
    import random

    rng = random.Random(seed)
    prompts = [" ".join(f"w{rng.randrange(90)}" for _ in range(length + rng.randrange(-4, 5)))
               for _ in range(n)]
    answers = [" ".join(f"w{rng.randrange(90)}" for _ in range(2)) for _ in range(n)]
    return prompts, answers


def build_pair(root: Path, d_model: int, layers: int) -> tuple[Path, Path]:
    from tl_transplant.testing import perturbed_copy, save_tiny, tiny_model, word_tokenizer

    tok = word_tokenizer(root / "tok")
    heads = max(2, d_model // 32)
    tgt = tiny_model("llama", seed=0, hidden_size=d_model, num_hidden_layers=layers,
                     intermediate_size=4 * d_model, num_attention_heads=heads,
                     num_key_value_heads=heads // 2, max_position_embeddings=256)
    src = perturbed_copy(tgt, scale=0.02, seed=1)
    return save_tiny(src, tok, root / "source"), save_tiny(tgt, tok, root / "target")


def build_real_pair(root: Path, scale: float = 0.01) -> tuple[Path, Path]:
    """SmolLM2 (target) and a copy with every tensor nudged (source), as HF directories."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tl_transplant.models.real import fetch_real_model
    from tl_transplant.testing import perturbed_copy, save_tiny

    tgt = Path(fetch_real_model("smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(tgt)
    src = save_tiny(perturbed_copy(model, scale=scale, seed=1), AutoTokenizer.from_pretrained(tgt),
                    root / "smollm2_perturbed")
    return src, tgt


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from tl_transplant import ModelPair
    from tl_transplant.scoring import score
    from tl_transplant.tasks.task import Task

    method, units, opts, base_kind = ALL_CASES[args.case]
    if args.case in PATCH_CASES:
        from tl_transplant import zoo

        task = zoo.load_tasks("cross_generation")["task"].dev
        if args.n < len(task):
            task = Task(task.name, task.prompts[: args.n], task.answers[: args.n],
                        metric="answer_logprob", prepend_bos=True)
        pair = zoo.load_pair("cross_generation")
        prompts, answers = list(task.prompts), list(task.answers)
    else:
        prompts, answers = make_prompts(args.n, args.prompt_len)
        task = Task("bench", prompts, answers, metric="answer_logprob")
        pair = ModelPair.load(args.source, args.target)

    def run_score() -> None:
        score(pair, task, method, units, batch_size=args.batch_size, progress=False, **opts)

    if args.mode == "rss":
        run_score()
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    if base_kind == "attribution":
        def baseline() -> None:
            score(pair, task, "attribution", units, batch_size=args.batch_size, progress=False)

        return _timings(args, baseline, run_score, n_units=len(pair.units(units)))

    from transformers import AutoModelForCausalLM

    from tl_transplant.tasks.tokens import answer_logprobs, encode

    hf_s = AutoModelForCausalLM.from_pretrained(args.source, attn_implementation="eager").eval()
    hf_t = AutoModelForCausalLM.from_pretrained(args.target, attn_implementation="eager").eval()
    tok = pair.target.tokenizer
    bos = pair.target.prepend_bos
    with_answers = base_kind == "fwd_bwd" or opts.get("positions") in ("answer", "all")
    batches = [
        encode(tok, prompts[i : i + args.batch_size],
               answers[i : i + args.batch_size] if with_answers else None, prepend_bos=bos)
        for i in range(0, len(prompts), args.batch_size)
    ]

    def baseline() -> None:
        for enc in batches:
            with torch.no_grad():
                hf_s(enc.input_ids)
            if base_kind == "fwd":
                with torch.no_grad():
                    hf_t(enc.input_ids)
            else:
                logits = hf_t(enc.input_ids).logits
                answer_logprobs(logits, enc).sum().backward()
                hf_t.zero_grad(set_to_none=True)

    return _timings(args, baseline, run_score)


def _timings(args: argparse.Namespace, baseline, run_score, **extra) -> dict:  # type: ignore[no-untyped-def]
    """Warm both up, then interleave ``--reps`` timed runs; ratios are score / baseline."""

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if not (args.no_warmup or args.case in REAL_CASES):  # real: too slow to run twice
        baseline()
        run_score()
    base, scor = [], []
    for _ in range(args.reps):
        base.append(timed(baseline))
        scor.append(timed(run_score))
    ratios = [s / b for s, b in zip(scor, base)]
    return {
        "baseline_s": statistics.median(base),
        "score_s": statistics.median(scor),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        **extra,
    }


def spawn(args: argparse.Namespace, case: str, mode: str, n: int, src: Path | None,
          tgt: Path | None, *, prompt_len: int | None = None, reps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--mode", mode, "--n", str(n),
           "--source", str(src), "--target", str(tgt), "--batch-size", str(args.batch_size),
           "--prompt-len", str(prompt_len or args.prompt_len),
           "--reps", str(reps or args.reps), "--threads", str(args.threads)]
    if args.no_warmup:
        cmd.append("--no-warmup")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {case}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, t: dict, extra: str = "") -> str:
    return (f"{name:44s} {t['baseline_s']:8.3f}s {t['score_s']:7.3f}s "
            f"{t['ratio_median']:10.3f} {t['ratio_min']:10.3f}{extra}")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", default="tiny,patch,smollm2", help="comma-separated suites")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (about a minute or two in all)")
    p.add_argument("--n", type=int, default=64, help="prompts (RSS is also measured at 4N)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--real-n", type=int, default=200, help="prompts in the smollm2 suite")
    p.add_argument("--real-prompt-len", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated subset of cases")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.n, args.reps, args.real_n, args.d_model = 16, 1, 16, 128
        args.no_warmup = False

    suites = [x for x in args.suites.split(",") if x]
    cases = [c for c in args.cases.split(",") if c]
    head = (f"{'case':44s} {'baseline':>9s} {'score':>8s} {'ratio(med)':>10s} "
            f"{'ratio(min)':>10s}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}; {_load()}; threads={args.threads}; "
          f"reps={args.reps}; batch {args.batch_size}" + ("; --quick" if args.quick else ""))
    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        if "tiny" in suites:
            src, tgt = build_pair(Path(tmp), args.d_model, args.layers)
            print(f"\n## tiny: llama d_model={args.d_model} layers={args.layers} "
                  f"mlp={4 * args.d_model}; prompts ~{args.prompt_len} tokens; N={args.n}")
            print(head + f" {'RSS@N MB':>9s} {'RSS@4N MB':>9s} {'4N/N':>6s}")
            for case in [c for c in cases if c in CASES]:
                t = spawn(args, case, "time", args.n, src, tgt)
                r1 = spawn(args, case, "rss", args.n, src, tgt)["peak_rss_mb"]
                r4 = math.nan if args.quick else spawn(
                    args, case, "rss", 4 * args.n, src, tgt)["peak_rss_mb"]
                base = "fwd+bwd" if CASES[case][3] == "fwd_bwd" else "fwd"
                print(_row(case + " vs " + base, t,
                           f" {r1:9.1f} {r4:9.1f} {r4 / r1:6.3f}"), flush=True)
            print("targets: ratio <= 1.15; memory flat (4N/N ~ 1.0)")
        if "patch" in suites:
            n = 24 if args.quick else 84
            print(f"\n## patch: zoo cross_generation pair (llama 3 layers, 4 heads / 2 KV, "
                  f"mlp 128); {n} task prompts; {_load()}")
            print(head + f" {'units':>6s}")
            for case in [c for c in cases if c in PATCH_CASES]:
                t = spawn(args, case, "time", n, None, None)
                print(_row(case + " vs attribution", t, f" {t['n_units']:6d}"), flush=True)
            print("target: ratio <= 20")
        if "smollm2" in suites:
            src, tgt = build_real_pair(Path(tmp))
            print(f"\n## smollm2: SmolLM2-135M-Instruct vs a perturbed copy; N={args.real_n}; "
                  f"prompts ~{args.real_prompt_len} words; {_load()}")
            print(head)
            for case in [c for c in cases if c in REAL_CASES]:
                t = spawn(args, case, "time", args.real_n, src, tgt,
                          prompt_len=args.real_prompt_len, reps=1)
                base = "fwd+bwd" if REAL_CASES[case][3] == "fwd_bwd" else "fwd"
                print(_row(case + " vs " + base, t), flush=True)
            print("target: ratio <= 1.3")
        print(f"# done; {_load()}")


if __name__ == "__main__":
    main()
