"""The memory plan against measured peak RSS, stage by stage.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_plan.py            # tiny demo pair
    OMP_NUM_THREADS=1 python benchmarks/bench_memory_plan.py --pair smollm2_rtn4 \
        --methods attribution --limit 16
    python benchmarks/bench_memory_plan.py --config my_run.yaml

Runs the stages of ``tl_transplant.run`` one after the other in this process (load, each
scorer, the sweep, the export) and, around each, resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM``: the measured peak of that stage,
whole process included. Prints the plan's estimate beside it, their ratio, and the whole
run's peak (Linux only).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024**2


def _status(key: str) -> int:
    txt = Path("/proc/self/status").read_text()
    m = re.search(key + r":\s+(\d+)", txt)
    return int(m.group(1)) * 1024 if m else 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config(args: argparse.Namespace) -> dict[str, Any]:
    from tl_transplant.pipeline.config import load_config
    from tl_transplant.pipeline.runner import demo_config

    cfg = (load_config(args.config).model_dump() if args.config
           else demo_config(args.pair, export=True))
    if args.methods:
        cfg["selection"]["methods"] = args.methods.split(",")
        cfg["selection"]["controls"] = ["random"]
        cfg["selection"]["options"] = {}
        cfg["sweep"]["budget"] = cfg["sweep"].get("budget") or [0.01, 0.05]
        cfg["sweep"]["max_retention_drop"] = None  # always choose, so the export runs
    if args.limit:
        cfg["task"]["limit"] = args.limit
        for c in cfg["control_tasks"]:
            c["limit"] = args.limit
    if args.dtype:
        cfg["dtype"] = args.dtype
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    return cfg


Rows = list[tuple[str, int, int | None, float]]


def measure_run(cfg: Any, out: Path | None = None, *, quiet: bool = False,
                log: Any = None, keep: dict[str, Any] | None = None) -> tuple[Any, Rows]:
    """Run ``cfg``'s stages in this process; (plan, [(stage, peak RSS, planned, seconds)]).
    ``keep`` (a dict) receives the scores (``scored``) and the sweep result (``sweep``)."""
    from tl_transplant.pipeline import stages as st
    from tl_transplant.pipeline.plan import plan_run

    plan = plan_run(cfg)
    if not quiet:
        print(plan.summary())
    est = {s.name: s.total_bytes for s in plan.stages}
    if not _reset_peak():
        raise SystemExit("cannot reset the peak RSS mark here (/proc/self/clear_refs)")
    rows: Rows = []

    def measure(name: str, planned: int | None, fn: Any) -> Any:
        _reset_peak()
        t0 = time.perf_counter()
        result = fn()
        rows.append((name, _status("VmHWM"), planned, time.perf_counter() - t0))
        return result

    log = log or (lambda *a, **k: None)
    out = out or Path(tempfile.mkdtemp(prefix="bench_mem_"))
    out.mkdir(parents=True, exist_ok=True)
    inputs = measure("load", est.get("load"), lambda: st.load_inputs(cfg, log=log))
    methods: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    runs = cfg.selection.runs("methods")
    labels = {r.label for r in runs}
    for r in runs + [c for c in cfg.selection.runs("controls") if c.label not in labels]:
        target = methods if r.label in labels else controls
        target[r.label] = measure(
            f"score {r.label}", est.get(f"score {r.label}"),
            lambda r=r: st._score_one(inputs.pair, inputs.dev, r, cfg, progress=False,
                                      extra={}))
    scored = st.Scored(methods=methods, controls=controls)
    res = measure("evaluate (sweep)", est.get("evaluate (sweep)"),
                  lambda: st.sweep_on_dev(inputs, scored, cfg, progress=False, log=log))
    if keep is not None:
        keep.update(scored=scored, sweep=res, pair=inputs.pair)
    manifest = st.apply_choice(inputs, res, out, log=log)
    if cfg.export:
        measure("export", est.get("export"),
                lambda: st.export_choice(inputs, manifest, cfg, out, log=log))
    return plan, rows


def print_rows(plan: Any, rows: Rows) -> None:
    print(f"{'stage':<26}{'measured':>12}{'planned':>12}{'plan/meas':>11}{'seconds':>9}")
    for name, got, want, secs in rows:
        ratio = f"{want / got:.2f}" if want else "-"
        planned = f"{want / MiB:.0f} MiB" if want else "-"
        print(f"{name:<26}{got / MiB:>8.0f} MiB{planned:>12}{ratio:>11}{secs:>9.1f}")
    peak = max(r[1] for r in rows)
    print(f"{'whole run':<26}{peak / MiB:>8.0f} MiB{plan.peak_bytes / MiB:>8.0f} MiB"
          f"{plan.peak_bytes / peak:>11.2f}{sum(r[3] for r in rows):>9.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="cross_generation")
    ap.add_argument("--config", default=None)
    ap.add_argument("--methods", default=None, help="comma list (default: the demo's)")
    ap.add_argument("--limit", type=int, default=None, help="items per task file")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)

    base = _status("VmRSS")
    import tl_transplant  # noqa: F401
    from tl_transplant.pipeline.config import load_config

    cfg = load_config(_config(args))
    plan, rows = measure_run(cfg)
    print(f"\nRSS before import {base / MiB:.0f} MiB; models "
          f"{sum(m.n_params for m in plan.models) / 1e6:.0f}M params")
    print_rows(plan, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
