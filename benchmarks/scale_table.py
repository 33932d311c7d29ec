"""The scaling table from ``bench_scale.py`` results: peak RSS and time per stage against
parameter count, for several sizes side by side.

    python benchmarks/scale_table.py /tmp/scale_smollm2 /tmp/scale_gemma3 /tmp/scale11

Reads each folder's ``result_<dtype>.json`` (written by ``bench_scale.py``) and prints, per
dtype, a markdown table: per stage and size, ``peak RSS / the two models' bytes · seconds
per billion parameters`` (per billion parameters x thousand dev tokens for the stages that
read prompts), and the time's spread across sizes (largest / smallest normalised time; 1.0
is exactly linear). The goals of issue 21: peak RSS <= 2.3x the models for attribution and
evaluation, <= 3x for learned_mask (marked), time per stage linear within 1.5x.
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


#: Stages that read no prompts: their time is normalised by parameters alone.
NO_DATA = ("load", "score weight_diff", "score random", "export")
#: Stages under this many seconds at every size are too short to judge a spread.
MIN_SECONDS = 1.0
TIME_GOAL = 1.5


def table(rs: list[dict[str, Any]]) -> str:
    """One dtype's markdown table: per stage and size, ``peak RSS / models`` and the time
    normalised by parameters (x thousand dev tokens for stages that read prompts)."""
    names = [f"{r['preset']} ({r['n_params'] / 1e9:.2f}B)" for r in rs]
    stages = list(dict.fromkeys(row["stage"] for r in rs for row in r["rows"]))
    lines = ["| stage | " + " | ".join(names) + " | time spread |",
             "|" + "---|" * (2 + len(rs))]
    for st in stages:
        cells, per, secs = [], [], []
        for r in rs:
            row = next((x for x in r["rows"] if x["stage"] == st), None)
            if row is None:
                cells.append("–")
                continue
            ratio = row["peak"] / r["models_bytes"]
            goal = GOALS.get(st)
            mark = "" if goal is None else (" ✓" if ratio <= goal else " ✗")
            norm = r["n_params"] / 1e9 * (1.0 if st in NO_DATA else r["dev_ktokens"])
            per.append(row["seconds"] / norm)
            secs.append(row["seconds"])
            cells.append(f"{ratio:.2f}{mark} · {per[-1]:.1f}")
        if len(per) > 1 and min(secs) >= MIN_SECONDS:
            sp = max(per) / min(per)
            spread = f"{sp:.2f}" + (" ✓" if sp <= TIME_GOAL else " ✗")
        else:
            spread = "–"
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {spread} |")
    whole = [max(x["peak"] for x in r["rows"]) / r["models_bytes"] for r in rs]
    total = [sum(x["seconds"] for x in r["rows"]) for r in rs]
    lines.append("| whole run | " + " | ".join(f"{w:.2f} · {t:.0f} s" for w, t in
                                               zip(whole, total)) + " | |")
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
