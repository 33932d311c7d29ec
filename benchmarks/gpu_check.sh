#!/usr/bin/env bash
# GPU check (issue 21, item 5): PREPARED, NOT YET RUN ON A GPU. Nothing here has been verified
# on CUDA; the first run on a GPU machine is the verification. Budget: <= 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with .venv set up
#
# 1. the real-model tier on cuda, bfloat16 and float32: SmolLM2-135M zoo pair (smollm2_rtn4),
#    attribution (units and single weights) + evaluation, logits compared with the CPU's;
# 2. the 1.1B Llama-shaped pair (benchmarks/bench_scale.py) built on the CPU, run on cuda in
#    both dtypes: per stage host peak RSS, the plan, time, and the device's peak allocation;
# 3. the generation benchmark (benchmarks/bench_generation.py; it runs on the CPU: it has no
#    device option yet, so its line is the CPU baseline to compare with).
# Each step has its own timeout so one hang cannot eat the budget; the tables go to stdout
# and to $OUT (or ./gpu_check_out) as text.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTDIR=${OUT:-gpu_check_out}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  | tee -a "$OUTDIR/gpu.txt"

echo "== 1. real tier on cuda (bfloat16, float32)"
timeout 120 "$PY" - <<'PY' 2>&1 | tee "$OUTDIR/real_cuda.txt"
import time, torch
from tl_transplant import ModelPair, score, zoo
from tl_transplant.evaluation.evaluator import evaluate
tasks = zoo.load_tasks("smollm2_rtn4")
task = tasks["task"].dev
src, tgt = zoo.pair_dirs("smollm2_rtn4")
ref = None
for dtype in ("float32", "bfloat16"):
    for device in ("cpu", "cuda"):
        if device == "cpu" and dtype == "bfloat16":
            continue
        t0 = time.perf_counter()
        pair = ModelPair.load(src, tgt, dtype=dtype, device=device)
        t_load = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter(); s = score(pair, task, "attribution", progress=False)
        t_att = time.perf_counter() - t0
        t0 = time.perf_counter(); w = score(pair, task, "attribution", units="weight", progress=False)
        t_w = time.perf_counter() - t0
        t0 = time.perf_counter(); r = evaluate(pair.target, task, progress=False)
        t_ev = time.perf_counter() - t0
        top = [str(u) for u in s.top(10)]
        if ref is None:
            ref = (top, r.mean)
        agree = len(set(top) & set(ref[0]))
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        print(f"{device:5} {dtype:9} load {t_load:6.1f}s attribution {t_att:6.1f}s "
              f"weights {t_w:6.1f}s eval {t_ev:5.1f}s metric {r.mean:.3f} (cpu fp32 {ref[1]:.3f}) "
              f"top10 overlap with cpu fp32 {agree}/10 device peak {mem:.2f} GiB")
        del pair
PY

echo "== 2. 1.1B pair on cuda (bench_scale)"
timeout 300 "$PY" benchmarks/bench_scale.py --preset 1.1b --device cuda --dtypes bfloat16,float32 \
  --items 32 --steps 8 --root "${SCALE_ROOT:-/tmp/tl_scale_1.1b}" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUTDIR/scale_cuda.txt"

echo "== 3. generation benchmark (CPU baseline; no device option yet)"
timeout 45 "$PY" benchmarks/bench_generation.py --new 32 --n 4 2>&1 | tee "$OUTDIR/generation.txt"
echo "gpu_check done; tables in $OUTDIR/"
