"""Check that the demo's outputs did not change: ``results.json``, ``sweep.json``,
``sweep.csv``, ``comparison.csv`` and the printed table, against a git revision or a
saved output (issue 19: "behaviour stays the same; the demo's results.json stays
identical apart from timestamps").

Too slow for the test suite (about a minute per pair on 2 CPU cores, twice):

    .venv/bin/python scripts/check_demo_golden.py --ref h-refactor
    .venv/bin/python scripts/check_demo_golden.py --baseline /tmp/golden   # DIR/<pair>/

``--ref REV`` runs the demo at that revision (a temporary ``git worktree``, imported
through ``PYTHONPATH`` with this venv) and at the working tree, on the same machine, so
float results do not depend on the CPU. ``--save DIR`` keeps the working tree's outputs
as ``DIR/<pair>/`` (a baseline for a later ``--baseline DIR``). Keys named in
:data:`TIMESTAMPS` are dropped before comparing JSON; exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAIRS = ("cross_generation", "base_instruct")
FILES = ("results.json", "sweep.json", "sweep.csv", "comparison.csv", "table.txt")
#: JSON keys that hold a time, not a result.
TIMESTAMPS = frozenset({"created", "written", "timestamp"})

_DEMO = (
    "import sys, tl_transplant\n"
    "from pathlib import Path\n"
    "from tl_transplant.cli import main\n"
    "assert Path(tl_transplant.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()),"
    " tl_transplant.__file__\n"
    "sys.exit(main(['demo', '--pair', sys.argv[2], '--out', sys.argv[3], '--no-export',"
    " '--quiet']))\n"
)


def run_demo(src: Path, pair: str, out: Path) -> None:
    """The demo of the package under ``src`` into ``out`` (+ ``table.txt``: what it printed)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _DEMO, str(src), pair, str(out)], env=env,
                          capture_output=True, text=True, cwd=src)
    if proc.returncode != 0:
        raise SystemExit(f"demo {pair} at {src} failed ({proc.returncode}):\n{proc.stderr}")
    # the table, without the line naming the output directory
    lines = [ln for ln in proc.stdout.splitlines()
             if not ln.startswith(("wrote ", "tl-transplant"))]
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    # The embedded pairs and tasks live inside the package: name its root the same way.
    for name in FILES:
        f = out / name
        if f.exists():
            f.write_text(f.read_text().replace(str(src.resolve()), "<package root>"))


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMESTAMPS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _text(path: Path) -> list[str]:
    if not path.exists():
        return ["<missing>"]
    if path.suffix == ".json":
        return json.dumps(_strip(json.loads(path.read_text())), indent=1).splitlines()
    return path.read_text().splitlines()


def compare(old: Path, new: Path) -> list[str]:
    """Differences (unified diff lines, at most 40 per file) between two demo outputs."""
    out: list[str] = []
    for name in FILES:
        a, b = _text(old / name), _text(new / name)
        if a != b:
            diff = list(difflib.unified_diff(a, b, f"old/{name}", f"new/{name}", lineterm="", n=1))
            out += diff[:40] + ([f"... {len(diff) - 40} more diff lines"] if len(diff) > 40 else [])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--ref", help="git revision whose demo outputs are the golden ones")
    g.add_argument("--baseline", type=Path, help="saved outputs: BASELINE/<pair>/")
    ap.add_argument("--pair", nargs="+", default=list(PAIRS), choices=PAIRS)
    ap.add_argument("--save", type=Path, help="keep the working tree's outputs as SAVE/<pair>/")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tlt-golden-"))
    worktree = tmp / "ref"
    failed = False
    try:
        if args.ref:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(worktree), args.ref], check=True)
        for pair in args.pair:
            new = tmp / "new" / pair
            run_demo(REPO, pair, new)
            if args.ref:
                old = tmp / "old" / pair
                run_demo(worktree, pair, old)
            else:
                old = args.baseline / pair
            if args.save:
                shutil.copytree(new, args.save / pair, dirs_exist_ok=True)
            diff = compare(old, new)
            failed |= bool(diff)
            print(f"{pair}: " + ("identical (" + ", ".join(FILES) + ")" if not diff
                                 else "DIFFERENT"))
            for line in diff:
                print("  " + line)
    finally:
        if args.ref and worktree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(worktree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
