"""weight_diff's per-unit sums a block of rows at a time against whole-tensor temporaries,
side by side in one process on one loaded pair.

    OMP_NUM_THREADS=2 python benchmarks/bench_weight_diff.py /tmp/tl_scale_1.1b --dtype bfloat16

On a 1.1B model the whole-tensor float64 temporaries (92 MB each for a 2048 x 5632 tensor)
are fresh memory-mapped pages every time (glibc maps blocks over 32 MB) and zeroing them
dominated: weight_diff took 9x per parameter what it took on SmolLM2. The chunked sums
(``weight_diff.PROFILE_CHUNK`` elements at a time) stay in reused heap memory. Prints the
seconds of each way (interleaved, best of ``--reps``), their ratio, and checks both give the
same scores (float64 rounding of the order of addition aside).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a bench_scale.py folder (source/, target/)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)

    from tl_transplant import ModelPair
    from tl_transplant.scoring import score
    from tl_transplant.scoring import weight_diff as wd

    pair = ModelPair.load(str(args.root / "source"), str(args.root / "target"),
                          dtype=args.dtype)
    chunk = wd.PROFILE_CHUNK
    times: dict[str, list[float]] = {"whole tensor": [], "chunked": []}
    out = {}
    for _ in range(args.reps):
        for way, size in (("whole tensor", 1 << 62), ("chunked", chunk)):
            wd.PROFILE_CHUNK = size
            t0 = time.perf_counter()
            out[way] = score(pair, None, "weight_diff", ("head", "neuron"), progress=False)
            times[way].append(time.perf_counter() - t0)
    wd.PROFILE_CHUNK = chunk
    n = sum(p.numel() for p in pair.target.params.values()) / 1e9
    a, b = min(times["whole tensor"]), min(times["chunked"])
    same = torch.allclose(out["whole tensor"].values, out["chunked"].values, rtol=1e-10)
    print(f"{args.root} ({n:.3f}B params, {args.dtype}, {torch.get_num_threads()} threads): "
          f"whole tensor {a:.2f} s, chunked {b:.2f} s, ratio {a / b:.1f}x; same scores: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
