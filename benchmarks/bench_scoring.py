"""Benchmark scoring: time vs plain HF forward(/backward), and peak RSS at N and 4N prompts.

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py [--n 64] [--d-model 256] ...

Builds a small offline llama-family pair (GQA), then runs every measurement in a
fresh subprocess (clean RSS, no shared warm state) and prints one table:

* ``time``: ``score(...)`` wall time divided by the baseline over the same
  prompts and batches: a plain (un-bridged, un-hooked) HF forward of both
  models for the activation scorers; for ``attribution``, a plain HF forward of
  the source plus forward + ``loss.backward()`` of the target (loss = summed
  answer log-prob; weight gradients included, as in an ordinary training step).
  Baseline and scoring runs are interleaved, ``--reps`` times; the median ratio
  is reported (and the min, since the machine may be shared).
* ``rss``: peak resident memory of a process that loads the pair and scores N
  (then, in another process, 4N) prompts.

Targets (issue 3): time ratio <= 1.15, flat memory.
"""

from __future__ import annotations

import argparse
import json
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


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from tl_transplant import ModelPair
    from tl_transplant.scoring import score
    from tl_transplant.tasks import Task

    method, units, opts, base_kind = CASES[args.case]
    prompts, answers = make_prompts(args.n, args.prompt_len)
    task = Task("bench", prompts, answers, metric="answer_logprob")
    pair = ModelPair.load(args.source, args.target)

    def run_score() -> None:
        score(pair, task, method, units, batch_size=args.batch_size, progress=False, **opts)

    if args.mode == "rss":
        run_score()
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    from transformers import AutoModelForCausalLM

    from tl_transplant.tokens import answer_logprobs, encode

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

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    baseline()
    run_score()  # warm-up
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
    }


def spawn(args: argparse.Namespace, case: str, mode: str, n: int, src: Path, tgt: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--mode", mode, "--n", str(n),
           "--source", str(src), "--target", str(tgt), "--batch-size", str(args.batch_size),
           "--prompt-len", str(args.prompt_len), "--reps", str(args.reps),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {case}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="prompts (RSS is also measured at 4N)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    cases = [c for c in args.cases.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        src, tgt = build_pair(Path(tmp), args.d_model, args.layers)
        print(f"pair: llama d_model={args.d_model} layers={args.layers} "
              f"mlp={4 * args.d_model}; prompts ~{args.prompt_len} tokens; batch {args.batch_size};"
              f" N={args.n}; threads={args.threads}; reps={args.reps}")
        print(f"{'case':44s} {'baseline':>9s} {'score':>8s} {'ratio(med)':>10s} "
              f"{'ratio(min)':>10s} {'RSS@N MB':>9s} {'RSS@4N MB':>9s} {'4N/N':>6s}")
        for case in cases:
            t = spawn(args, case, "time", args.n, src, tgt)
            r1 = spawn(args, case, "rss", args.n, src, tgt)["peak_rss_mb"]
            r4 = spawn(args, case, "rss", 4 * args.n, src, tgt)["peak_rss_mb"]
            base = "fwd+bwd" if CASES[case][3] == "fwd_bwd" else "fwd"
            print(f"{case + ' vs ' + base:44s} {t['baseline_s']:8.3f}s {t['score_s']:7.3f}s "
                  f"{t['ratio_median']:10.3f} {t['ratio_min']:10.3f} {r1:9.1f} {r4:9.1f} "
                  f"{r4 / r1:6.3f}", flush=True)
        print("targets: ratio <= 1.15; memory flat (4N/N ~ 1.0)")


if __name__ == "__main__":
    main()
