"""The scaling table from ``bench_scale.py`` results: peak RSS and time per stage against
parameter count, for several sizes side by side.

    python benchmarks/scale_table.py /tmp/scale_smollm2 /tmp/scale_gemma3 /tmp/scale11

Reads each folder's ``result_<dtype>.json`` (written by ``bench_scale.py``) and prints, per
dtype, a markdown table: per stage, peak RSS / the two models' bytes at each size, and the
time per stage in seconds per (billion parameters x thousand dev tokens) with its spread
across sizes (largest / smallest: 1.0 is exactly linear in parameters x tokens). The
goals of issue 21: peak RSS <= 2.3x the models for attribution and evaluation, <= 3x for
learned_mask; time per stage linear in parameters within 1.5x.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GOALS = {"score attribution": 2.3, "evaluate (sweep)": 2.3, "score learned_mask": 3.0}
GiB = 1024**3


def load(dirs: list[Path], tag: str = "") -> dict[str, list[dict[str, Any]]]:
    """dtype -> the results of every folder that has one, smallest model first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for d in dirs:
        for f in sorted(d.glob(f"result_*{tag}.json")):
            r = json.loads(f.read_text())
            if tag == "" and r.get("lm_candidates", "auto") != "auto":
                continue
            out.setdefault(r["dtype"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["n_params"])
    return out


def table(rs: list[dict[str, Any]]) -> str:
    """One dtype's markdown table."""
    names = [f"{r['preset']} ({r['n_params'] / 1e9:.3f}B)" for r in rs]
    stages = list(dict.fromkeys(row["stage"] for r in rs for row in r["rows"]))
    head = ("| stage | " + " | ".join(f"peak/models {n}" for n in names) + " | "
            + " | ".join(f"s/(B·kTok) {n}" for n in names) + " | time spread |")
    lines = [head, "|" + "---|" * (2 + 2 * len(rs))]
    for st in stages:
        ratios, per = [], []
        for r in rs:
            row = next((x for x in r["rows"] if x["stage"] == st), None)
            if row is None:
                ratios.append("–")
                per.append(None)
                continue
            ratio = row["peak"] / r["models_bytes"]
            goal = GOALS.get(st)
            mark = "" if goal is None else (" ✓" if ratio <= goal else " ✗")
            ratios.append(f"{ratio:.2f}{mark}")
            per.append(row["seconds"] / (r["n_params"] / 1e9) / r["dev_ktokens"])
        got = [p for p in per if p]
        spread = f"{max(got) / min(got):.2f}" if len(got) > 1 and min(got) > 0 else "–"
        lines.append(f"| {st} | " + " | ".join(ratios) + " | "
                     + " | ".join("–" if p is None else f"{p:.1f}" for p in per)
                     + f" | {spread} |")
    whole = [max(x["peak"] for x in r["rows"]) / r["models_bytes"] for r in rs]
    secs = [sum(x["seconds"] for x in r["rows"]) for r in rs]
    lines.append("| whole run: peak/models, seconds | " + " | ".join(f"{w:.2f}" for w in whole)
                 + " | " + " | ".join(f"{s:.0f} s" for s in secs) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for dtype, rs in load(args.dirs).items():
        print(f"\n### {dtype}\n")
        for r in rs:
            models = r["models_bytes"] / GiB
            print(f"- {r['preset']}: {r['n_params'] / 1e9:.3f}B params a side, models "
                  f"{models:.2f} GiB, {r['dev_items']} dev items ({r['dev_ktokens']:.2f}k "
                  f"tokens), {r['threads']} threads, {r['when']}; planted heads' attribution "
                  f"ranks {r.get('planted_ranks')}, chosen {r.get('chosen')}")
        print()
        print(table(rs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
