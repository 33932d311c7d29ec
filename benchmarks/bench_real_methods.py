"""Every scorer's time on SmolLM2-135M-Instruct, as a ratio to plain forwards of both models.

    python benchmarks/bench_real_methods.py [--n 16] [--batch-size 8]

The pair is the real model against a copy with every block tensor nudged (sigma 0.01), so
every unit differs. Baselines, measured in the same run: one padded, batched HF forward of
both models over
the prompts (``fwd``) and the same plus ``loss.backward()`` on the target (``fwd+bwd``).
``activation_patch`` scores the top 32 heads by attribution (``candidates=``), which is how it
is meant to be used at this size; its ratio includes that attribution pass. Every scorer runs
with its default options (``learned_mask``: its default minibatch steps). Scorers that also
score single weights (``weight_level``) get a second row with ``units="weight"``; weight-only
ones (``magnitude``, ``dare``) only that row. ``--methods`` picks a subset.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tl_transplant import ModelPair, Task, available_methods, score
from tl_transplant.models.real import fetch_real_model
from tl_transplant.scoring import get_scorer

WORDS = "the cat sat on a mat while seven birds flew over green hills toward the old town".split()


def _prompts(n: int) -> list[dict[str, str]]:
    return [{"prompt": " ".join(WORDS[i % 7: i % 7 + 8]), "answer": " " + WORDS[(i + 9) % 17]}
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    d = fetch_real_model("smollm2-135m-instruct")
    pair = ModelPair.load(d, d)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, t in pair.source.params.items():
            if ".layers." in n:
                t.add_(0.01 * torch.randn(t.shape, generator=gen))
    pair.source.refresh_mirrors()
    task = Task.from_records(_prompts(args.n), name="bench", metric="next_token_acc")
    tok = pair.target.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bs = args.batch_size
    batches = [tok(task.prompts[i: i + bs], return_tensors="pt", padding=True)
               for i in range(0, len(task), bs)]

    def fwd(backward: bool) -> float:
        t0 = time.perf_counter()
        for b in batches:
            for side in pair.sides():
                with torch.set_grad_enabled(backward and side is pair.target):
                    out = side.hf(b.input_ids, attention_mask=b.attention_mask).logits
                if backward and side is pair.target:
                    out[:, -1].logsumexp(-1).sum().backward()
        return time.perf_counter() - t0

    base = {"fwd": fwd(False), "fwd+bwd": fwd(True)}
    for p in pair.target.hf.parameters():
        p.grad = None
    print(f"SmolLM2 pair, {args.n} prompts, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"  baseline fwd {base['fwd']:.1f} s, fwd+bwd {base['fwd+bwd']:.1f} s")
    wanted = [m for m in args.methods.split(",") if m] or sorted(available_methods())
    for m in wanted:
        cls = get_scorer(m)
        grains = ([None] if cls.unit_level else []) + (["weight"] if cls.weight_level else [])
        for grain in grains:
            kw: dict = {}
            if m == "activation_patch":
                kw = {"units": "head", "candidates": {"method": "attribution", "top": 32}}
            if grain is not None:
                kw = {"units": grain}
            t0 = time.perf_counter()
            score(pair, task, m, batch_size=args.batch_size, progress=False, **kw)
            dt = time.perf_counter() - t0
            label = m if grain is None else f"{m} (weights)"
            print(f"  {label:28s} {dt:7.1f} s  {dt / base['fwd']:6.2f}x fwd  "
                  f"{dt / base['fwd+bwd']:6.2f}x fwd+bwd")


if __name__ == "__main__":
    main()
