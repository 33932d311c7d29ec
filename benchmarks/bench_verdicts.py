"""The method x budget comparison on a zoo pair, as a reviewer reads it (issue 18, item 7).

    OMP_NUM_THREADS=2 python benchmarks/bench_verdicts.py PAIR [--out DIR] [--budgets ...]
        [--alphas 1.0] [--max-drop 0.02] [--methods ...] [--controls ...] [--option M.K=V ...]

Runs ``tl_transplant.run`` (the product path: scoring on dev, the sweep on dev, every
(method, budget) cell at its dev-best alpha on test with paired CIs against controls filled
to the cell's own parameter count) on a zoo pair (``cross_generation``, ``smollm2_rtn4``,
``smollm2_ft_tens``, ...), and prints, measured in this run:

* the cost of each scorer as a ratio to one ``attribution`` pass (wall seconds between the
  run's own log lines, so taken side by side in one process);
* the table method x budget: test gap recovery [95% CI] and the worst test retention drop
  (points), alpha chosen on dev per cell;
* two dev-chosen verdicts: the best *weight-level* cell at <= 0.01% of block parameters and
  the best cell of any grain at <= 1%, chosen on dev (highest dev metric among cells whose
  dev retention drop is within ``--max-drop``; ties: fewer weights), each with its test
  recovery, retention drop and the paired CI of (it - control) for every parameter-matched
  control (dense at the same dev retention cost).

Everything is also in ``DIR/results.json`` (``comparison``) and ``DIR/report.html``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

DEFAULT_BUDGETS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05)
DEFAULT_METHODS = ("attribution", "learned_mask", "weight_diff@unit", "random",
                   "magnitude", "dare", "random@weight", "dense")
DEFAULT_CONTROLS = ("random", "random@weight", "magnitude", "dare", "dense")


def pair_config(pair: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run config for a zoo pair: its capability task and retention tasks, given splits."""
    from tl_transplant import zoo

    src, tgt = zoo.pair_dirs(pair, build_missing=True)
    paths = zoo.task_paths(pair)
    bos = True
    if zoo.is_real(pair):
        from tl_transplant.zoo.real import PREPEND_BOS

        bos = PREPEND_BOS
    task = {"path": str(paths["task"].dev), "test_path": str(paths["task"].test),
            "metric": "next_token_acc", "prepend_bos": bos, "name": f"{pair}:capability"}
    controls = [{"path": str(sp.dev), "test_path": str(sp.test), "metric": "next_token_acc",
                 "prepend_bos": bos, "name": f"{pair}:{kind}"}
                for kind, sp in paths.items() if kind != "task"]
    options: dict[str, dict[str, Any]] = {}
    for item in args.option:
        key, _, val = item.partition("=")
        m, _, k = key.partition(".")
        options.setdefault(m, {})[k] = json.loads(val)
    return {
        "source": str(src), "target": str(tgt), "task": task, "control_tasks": controls,
        "selection": {"methods": list(args.methods), "units": ["head", "neuron", "weight"],
                      "controls": list(args.controls), "options": options},
        "sweep": {"budget": list(args.budgets), "alpha": list(args.alphas),
                  "max_retention_drop": args.max_drop, "compare": True},
        "seed": 0, "export": False,
    }


def _pct(f: float) -> str:
    return f"{100 * f:.3g}%"


def _ci(v: float | None, ci: list[float] | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def choose(cells: list[dict[str, Any]], *, max_pct: float, grain: str | None,
           max_drop: float) -> dict[str, Any] | None:
    """The dev choice among cells within ``max_pct`` of block params (and ``grain``)."""
    ok = [c for c in cells if (c.get("pct_params") or 0.0) <= max_pct + 1e-12
          and (grain is None or c.get("grain") == grain) and c.get("method") != "dense"
          and not c.get("extrapolates") and (c.get("dev_max_drop") or 0.0) <= max_drop + 1e-12]
    if not ok:
        return None
    return min(ok, key=lambda c: (-round(c["dev_metric"], 12), c.get("n_params") or 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pair")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    ap.add_argument("--max-drop", type=float, default=0.02)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--controls", nargs="+", default=list(DEFAULT_CONTROLS))
    ap.add_argument("--option", action="append", default=[],
                    help="scorer option METHOD.KEY=JSON, e.g. learned_mask.steps=40")
    args = ap.parse_args()

    from tl_transplant import run

    out = Path(args.out or f"bench_out/verdicts_{args.pair}")
    stamps: list[tuple[float, str]] = []

    def log(msg: str) -> None:
        stamps.append((time.perf_counter(), str(msg)))
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.perf_counter()
    res = run(pair_config(args.pair, args), out, overwrite=True, progress=False, log=log)
    wall = time.perf_counter() - t0
    r = res.results.to_dict()  # results.json as plain data

    # Scoring cost: the time between "scoring X" and the next log line.
    cost: dict[str, float] = {}
    for (t, msg), (t2, _) in zip(stamps, stamps[1:]):
        if msg.startswith("scoring "):
            cost[msg.split()[1]] = t2 - t
    print(f"\n## {args.pair}  (run wall {wall:.0f} s)\n")
    base = r["baselines"]
    print(f"source dev/test {base['source']['dev']:.3f}/{base['source']['test']:.3f}, "
          f"target {base['target']['dev']:.3f}/{base['target']['test']:.3f}")
    if "attribution" in cost:
        a = cost["attribution"]
        print("\nscoring cost (s, x attribution): " + ", ".join(
            f"{m} {s:.1f} ({s / a:.2g}x)" for m, s in cost.items()))

    cells = (r.get("comparison") or {}).get("cells", [])
    budgets = sorted({c["budget"] for c in cells if isinstance(c.get("budget"), float)})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    print("\n| method | " + " | ".join(_pct(b) for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for m in methods:
        row = []
        for b in budgets:
            c = next((c for c in cells if c["method"] == m and c.get("budget") == b), None)
            if c is None:
                row.append("")
                continue
            drop = c.get("retention_drop")
            mark = "" if c.get("feasible") else " ✗"
            row.append(f"{_ci(c.get('test_recovery'), c.get('test_recovery_ci'))} · drop "
                       f"{100 * (drop or 0.0):.1f}{mark}")
        print(f"| `{m}` | " + " | ".join(row) + " |")
    dense = next((c for c in cells if c["method"] == "dense"), None)
    if dense is not None:
        print(f"\n`dense` (every block weight) at dev-best alpha {dense['alpha']:g}: test recovery "
              f"{_ci(dense.get('test_recovery'), dense.get('test_recovery_ci'))}, drop "
              f"{100 * (dense.get('retention_drop') or 0):.1f} points")

    for title, pct, grain in (("weight-level, <= 0.01%", 0.0001, "weight"),
                              ("any grain, <= 1%", 0.01, None)):
        c = choose(cells, max_pct=pct, grain=grain, max_drop=args.max_drop)
        print(f"\n**dev choice, {title}:** ", end="")
        if c is None:
            print("no feasible cell")
            continue
        print(f"`{c['method']}` {c['size']} ({_pct(c['pct_params'])} of block params, "
              f"alpha {c['alpha']:g}): test recovery "
              f"{_ci(c.get('test_recovery'), c.get('test_recovery_ci'))}, retention drop "
              f"{100 * (c.get('retention_drop') or 0):.1f} points")
        for name, v in (c.get("vs") or {}).items():
            print(f"  - minus `{name}` ({_pct(v.get('pct_params') or 0)}"
                  f"{', alpha ' + format(v['alpha'], 'g') if v.get('alpha') is not None else ''})"
                  f": {_ci(v.get('diff'), v.get('ci'))}")
    print(f"\nrun output: {out}/ (results.json, comparison.csv, report.html)")


if __name__ == "__main__":
    main()
