"""learned_mask vs attribution on the real zoo pair ``smollm2_rtn4`` (SmolLM2-135M, 4-bit target).

    OMP_NUM_THREADS=1 python benchmarks/bench_learned_mask.py [--n 8] [--batch-size 8] [--steps 20]
        [--lr 0.1] [--lam-sparse 1.0] [--skip-attribution]

Units: every head and neuron (30 layers x 9 heads + 30 x 1536 neurons). Both methods see the
same ``--n`` dev prompts of the pair's capability task (``add_units``). ``attribution`` makes
one pass over them (``n / batch`` batches); ``learned_mask`` runs ``--steps`` optimisation
steps, each a full pass over them. Printed, measured in this run: seconds per batch of each, their
ratio, a plain target forward+backward per batch as the yardstick, the peak RSS after each
method, and what the mask learned (loss at the first and last step, gates > 0.5 and the
fraction of block parameters they move).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from tl_transplant import ModelPair, Task, score, zoo


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lam-sparse", type=float, default=1.0)
    ap.add_argument("--skip-attribution", action="store_true")
    args = ap.parse_args()
    name = "smollm2_rtn4"
    src, tgt = zoo.pair_dirs(name, build_missing=True)
    dev = zoo.task_paths(name, build_missing=True)["task"].dev
    rows = [json.loads(line) for line in dev.read_text().splitlines() if line.strip()]
    task = Task.from_records(rows[: args.n], name="add_units", metric="next_token_acc")
    pair = ModelPair.load(src, tgt)
    bs = args.batch_size
    n_batches = -(-len(task) // bs)
    print(f"{name}: {len(task)} prompts, batch {bs}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}, rss {_rss_gb():.2f} GB after load")

    tok = pair.target.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(task.prompts[:bs], return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        out = pair.target.bridge(enc.input_ids, return_type="logits")
        out[:, -1].logsumexp(-1).sum().backward()
    fb = (time.perf_counter() - t0) / reps
    for p in pair.target.hf.parameters():
        p.grad = None
    print(f"  target bridge fwd+bwd (weight grads) per batch: {fb:.2f} s")

    att = float("nan")
    if not args.skip_attribution:
        t0 = time.perf_counter()
        score(pair, task, "attribution", batch_size=bs, progress=False)
        att = (time.perf_counter() - t0) / n_batches
        print(f"  attribution:  {att:.2f} s/batch ({att / fb:.2f}x fwd+bwd), "
              f"peak rss {_rss_gb():.2f} GB")

    t0 = time.perf_counter()
    s = score(pair, task, "learned_mask", batch_size=bs, progress=False, steps=args.steps,
              lr=args.lr, lam_sparse=args.lam_sparse)
    lm = (time.perf_counter() - t0) / (args.steps * n_batches)
    print(f"  learned_mask: {lm:.2f} s/(step x batch)  ({lm / fb:.2f}x fwd+bwd, {lm / att:.2f}x "
          f"attribution per batch), peak rss {_rss_gb():.2f} GB")
    h = s.meta["loss_history"]
    print(f"  learned_mask loss first/last step {h[0]:.3f} / {h[-1]:.3f}; last terms "
          + ", ".join(f"{k} {v:.4f}" for k, v in s.meta["loss"].items()))
    print(f"  gates > 0.5: {len(s.meta['suggested'])} units, "
          f"{100 * s.meta['suggested_frac_params']:.2f}% of block params; "
          f"expected moved {100 * s.meta['frac_params']:.2f}%; top 5 "
          + ", ".join(f"{u}={v:.2f}" for u, v in zip(map(str, s.top(5)), s.values[
              torch.argsort(s.values, descending=True)[:5]].tolist())))


if __name__ == "__main__":
    main()
