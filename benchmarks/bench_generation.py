"""Benchmark greedy generation: KV-cached (unwrapped HF tree) vs uncached (bridged reference).

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py [--new 32,128] [--n 4] [--reps 1]

Loads SmolLM2-135M-Instruct (``fetch_real_model``, cached offline) as a
``ModelSide`` (bridged, as every tl_transplant run does) and decodes ``--n``
chat-style prompts of different lengths, left-padded in one batch, with
:func:`tl_transplant.models.decoding.greedy_generate`: ``kv_cache=True`` (what
``evaluate`` now does for ``exact_match``) against ``kv_cache=False`` (the
reference path: every step recomputes the prefix through the bridge). EOS is
disabled so every row decodes exactly ``new`` tokens. The two runs are
interleaved in one process, ``--reps`` times; the table gives the median times
and their ratio, with the load average (the machine may be shared).

Exits 1 if the cached token ids differ from the uncached ones anywhere.
Target (issue 13): >= 5x at 128 new tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers and explain briefly why each of them is prime.",
    "Translate to German: the cat sleeps on the warm windowsill in the afternoon.",
    "Name a colour.",
    "Give a short definition of entropy in physics, in plain words for a student.",
    "What is 17 times 3?",
    "Describe a tree.",
]


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _tiny_dir() -> str:
    """A random 4-layer llama with SmolLM2-135M's per-layer shape, saved to a temp dir."""
    import tempfile

    from tl_transplant.testing import save_tiny, tiny_model, word_tokenizer

    root = tempfile.mkdtemp(prefix="bench_gen_tiny_")
    model = tiny_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    return str(save_tiny(model, word_tokenizer(os.path.join(root, "tok")),
                         os.path.join(root, "model")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", default="32,128", help="comma-separated new-token counts")
    p.add_argument("--n", type=int, default=4, help="prompts, decoded as one left-padded batch")
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions per size")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="fetch_real_model name, a local HF directory, or 'tiny' (a random "
                   "llama with SmolLM2's per-layer shape, 4 layers, word tokenizer)")
    args = p.parse_args()
    import torch
    from transformers import GenerationConfig

    from tl_transplant.models.decoding import greedy_generate
    from tl_transplant.models.real import fetch_real_model
    from tl_transplant.models.side import ModelSide

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        path = _tiny_dir()
    else:
        path = args.model if os.path.isdir(args.model) else fetch_real_model(args.model)
    side = ModelSide.load(path)
    tok = side.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.n)]
    if getattr(tok, "chat_template", None):
        rows = [
            tok.apply_chat_template([{"role": "user", "content": q}],
                                    add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
            for q in prompts
        ]
    else:  # the tiny word tokenizer: prompts of w-words, lengths as the chat prompts'
        rows = [[1] + [4 + (7 * i + j) % 90 for j in range(20 + 3 * i)]
                for i in range(len(prompts))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}; {_load()}; threads={args.threads}; "
          f"model={side.name}; n={args.n} prompts, {min(map(len, rows))}-{width} tokens, "
          f"left-padded; reps={args.reps}")
    print(f"{'new tokens':>10s} {'uncached':>10s} {'cached':>9s} {'speedup':>8s} "
          f"{'identical':>9s}  load average")
    ok = True
    for new in (int(x) for x in args.new.split(",")):
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                               pad_token_id=pad, eos_token_id=None)
        times: dict[bool, list[float]] = {True: [], False: []}
        outs: dict[bool, torch.Tensor] = {}
        with torch.inference_mode():
            greedy_generate(side.hf, ids[:, -4:], mask[:, -4:], GenerationConfig(
                **{**cfg.to_dict(), "max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
            for _ in range(args.reps):
                for cached in (False, True):
                    t0 = time.perf_counter()
                    out, used = greedy_generate(side.hf, ids, mask, cfg, kv_cache=cached)
                    times[cached].append(time.perf_counter() - t0)
                    assert used is cached, "the cached path was not taken"
                    assert out.shape == (len(rows), width + new)
                    if cached in outs and not torch.equal(outs[cached], out):
                        ok = False
                    outs[cached] = out
        same = torch.equal(outs[True], outs[False])
        ok = ok and same
        u, c = statistics.median(times[False]), statistics.median(times[True])
        print(f"{new:10d} {u:9.2f}s {c:8.2f}s {u / c:7.1f}x {str(same):>9s}  "
              f"{_load().split(' ', 2)[2]}", flush=True)
    print(f"# done; {_load()}")
    if not ok:
        print("FAIL: cached token ids differ from the uncached reference", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
