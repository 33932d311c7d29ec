"""Benchmark: out-of-core ``apply`` against in-memory load + apply_transplant + export_hf.

Builds a Llama-architecture pair from a config (random weights, ~490 MB each
in float32 by default), saves both sharded into a temporary directory, then
runs each path in its own subprocess and reads that process's peak RSS
(``ru_maxrss``) and wall time:

* in-memory: ``ModelPair.load`` + ``apply_transplant`` + ``export_hf`` (this
  also writes the manifest, as a real run would);
* out-of-core: ``apply_manifest_out_of_core`` with that manifest.

It checks the two outputs are bit-identical, prints both paths side by side
with ratios (targets: RSS < 25 %, time <= 1.5x) and removes the temporary
files (``--keep`` keeps them). A child that only imports the package gives the
interpreter + torch floor that every path pays.

    OMP_NUM_THREADS=1 python benchmarks/bench_out_of_core.py
    python benchmarks/bench_out_of_core.py --layers 4 --repeat 2

The page cache is warm for both paths (the checkpoints were just written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RSS_TARGET = 0.25
TIME_TARGET = 1.5

_CHILD_PRELUDE = """
import json, resource, sys, time
t0 = time.perf_counter()
"""
_CHILD_REPORT = """
print("BENCH_RESULT " + json.dumps({
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "import_s": t_import - t0,
    "work_s": time.perf_counter() - t_import,
    **extra,
}))
"""

BUILD = """
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from tl_transplant.testing import word_tokenizer
t_import = time.perf_counter()
a = json.loads(sys.argv[1])
cfg = LlamaConfig(hidden_size=a["hidden"], intermediate_size=a["inter"],
                  num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                  num_key_value_heads=a["kv"], vocab_size=a["vocab"],
                  max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
tok = word_tokenizer(a["root"] + "/tok")
n = sum(p.numel() * p.element_size() for p in model.parameters())
model.save_pretrained(a["root"] + "/target", max_shard_size=a["shard"])
tok.save_pretrained(a["root"] + "/target")
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
model.save_pretrained(a["root"] + "/source", max_shard_size=a["shard"])
tok.save_pretrained(a["root"] + "/source")
extra = {"weight_bytes": n}
"""

IN_MEMORY = """
from tl_transplant import ModelPair, apply_transplant, export_hf
t_import = time.perf_counter()
a = json.loads(sys.argv[1])
pair = ModelPair.load(a["root"] + "/source", a["root"] + "/target")
m = apply_transplant(pair, a["units"], a["alpha"])
export_hf(pair, a["out"], m, overwrite=True)
extra = {"n_params_moved": m.n_params_moved}
"""

OUT_OF_CORE = """
from tl_transplant.io.out_of_core import apply_manifest_out_of_core
t_import = time.perf_counter()
a = json.loads(sys.argv[1])
apply_manifest_out_of_core(a["root"] + "/source", a["root"] + "/target", a["manifest"], a["out"],
                           overwrite=True, strict=True)
extra = {}
"""

IMPORT_ONLY = """
import tl_transplant.io.out_of_core
t_import = time.perf_counter()
extra = {}
"""

VERIFY = """
from pathlib import Path
import torch
from safetensors import safe_open
t_import = time.perf_counter()
a = json.loads(sys.argv[1])
def where(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out
wa, wb = where(a["a"]), where(a["b"])
assert set(wa) == set(wb), sorted(set(wa) ^ set(wb))[:5]
bad = []
for k in wa:
    with safe_open(str(wa[k]), "pt") as h:
        x = h.get_tensor(k)
    with safe_open(str(wb[k]), "pt") as h:
        y = h.get_tensor(k)
    if x.dtype != y.dtype or not torch.equal(x.reshape(-1).view(torch.uint8),
                                             y.reshape(-1).view(torch.uint8)):
        bad.append(k)
extra = {"n_tensors": len(wa), "n_different": len(bad), "different": bad[:5]}
"""


def _run(code: str, args: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_PRELUDE + code + _CHILD_REPORT, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark child failed (exit {proc.returncode})")
    res = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    res["process_s"] = wall
    return res


def _units(layers: int, heads: int, inter: int) -> list[str]:
    """A scoring-sized selection: a few heads and ~1% of neurons per layer, two whole linears."""
    units = []
    for layer in range(layers):
        units += [f"L{layer}.H{(3 * layer + k) % heads}" for k in range(2)]
        units += [f"L{layer}.N{(97 * k + layer) % inter}" for k in range(inter // 100)]
    units += [f"L{layers - 1}.mlp.down_proj", "L0.attn.o_proj"]
    return units


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--shard", default="100MB", help="max_shard_size of the saved checkpoints")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path (best time kept)")
    ap.add_argument("--workdir", default=None, help="where to put the temporary checkpoints")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="tl_transplant_bench_", dir=args.workdir))
    try:
        spec = dict(
            hidden=args.hidden,
            inter=args.inter,
            layers=args.layers,
            heads=args.heads,
            kv=args.kv,
            vocab=args.vocab,
            shard=args.shard,
            root=str(root),
        )
        print(f"building a Llama pair in {root} ...", flush=True)
        built = _run(BUILD, spec)
        wmb = built["weight_bytes"] / 2**20
        n_shards = len(list((root / "target").glob("*.safetensors")))
        print(
            f"  weights {wmb:.0f} MB per model in {n_shards} shards "
            f"(built in {built['process_s']:.0f} s)"
        )
        units = _units(args.layers, args.heads, args.inter)
        floor = _run(IMPORT_ONLY, {})
        mem_runs, ooc_runs = [], []
        for i in range(args.repeat):
            mem_runs.append(
                _run(
                    IN_MEMORY,
                    {
                        "root": str(root),
                        "units": units,
                        "alpha": args.alpha,
                        "out": str(root / "mem"),
                    },
                )
            )
            print(f"  in-memory run {i + 1}: {mem_runs[-1]['process_s']:.1f} s", flush=True)
            ooc_runs.append(
                _run(
                    OUT_OF_CORE,
                    {
                        "root": str(root),
                        "manifest": str(root / "mem" / "transplant_manifest.json"),
                        "out": str(root / "ooc"),
                    },
                )
            )
            print(f"  out-of-core run {i + 1}: {ooc_runs[-1]['process_s']:.1f} s", flush=True)
        check = _run(VERIFY, {"a": str(root / "mem"), "b": str(root / "ooc")})

        def best(runs: list[dict[str, Any]], key: str) -> float:
            return min(r[key] for r in runs)

        mem = {k: best(mem_runs, k) for k in ("rss_mb", "work_s", "process_s", "import_s")}
        ooc = {k: best(ooc_runs, k) for k in ("rss_mb", "work_s", "process_s", "import_s")}
        rss_ratio = ooc["rss_mb"] / mem["rss_mb"]
        above = (ooc["rss_mb"] - floor["rss_mb"]) / max(1e-9, mem["rss_mb"] - floor["rss_mb"])
        t_ratio = ooc["process_s"] / mem["process_s"]
        w_ratio = ooc["work_s"] / mem["work_s"]
        print()
        print(
            f"model: Llama, {args.layers} layers, d={args.hidden}, d_mlp={args.inter}, "
            f"heads={args.heads}/{args.kv}, vocab={args.vocab}: {wmb:.0f} MB float32 per model, "
            f"{n_shards} shards; {len(units)} units "
            f"({mem_runs[0]['n_params_moved'] / 1e6:.1f} M weights moved), alpha={args.alpha}"
        )
        print(f"{'':28}{'in-memory':>12}{'out-of-core':>14}{'ratio':>9}   target")
        print(
            f"{'peak RSS (MB)':28}{mem['rss_mb']:12.0f}{ooc['rss_mb']:14.0f}{rss_ratio:9.3f}"
            f"   < {RSS_TARGET} {'ok' if rss_ratio < RSS_TARGET else 'MISSED'}"
        )
        print(
            f"{'peak RSS above import floor':28}{mem['rss_mb'] - floor['rss_mb']:12.0f}"
            f"{ooc['rss_mb'] - floor['rss_mb']:14.0f}{above:9.3f}   "
            f"(floor: {floor['rss_mb']:.0f} MB = python + torch)"
        )
        print(
            f"{'wall time, process (s)':28}{mem['process_s']:12.2f}{ooc['process_s']:14.2f}"
            f"{t_ratio:9.3f}   <= {TIME_TARGET} {'ok' if t_ratio <= TIME_TARGET else 'MISSED'}"
        )
        print(
            f"{'wall time, work only (s)':28}{mem['work_s']:12.2f}{ooc['work_s']:14.2f}"
            f"{w_ratio:9.3f}   (excludes imports)"
        )
        print(f"{'output size (MB)':28}{_dir_mb(root / 'mem'):12.0f}{_dir_mb(root / 'ooc'):14.0f}")
        print(
            f"bit-identical outputs: {check['n_different'] == 0} "
            f"({check['n_tensors']} tensors, {check['n_different']} differ)"
        )
        return 0 if check["n_different"] == 0 else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
