"""lm-eval's evaluation against ours on the same prompts, on a real zoo pair (issue 20).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_eval_cost.py [--pair smollm2_rtn4] [--repeat 5]

For each task of the pair (its capability and retention JSONL files) it writes a local
lm-eval task YAML (loglikelihood of the answer, ``acc``; ``tl_transplant.harness.data.local_files``
reads the JSONL) into a temporary folder, then times on the target, side by side in this
process (median of ``--repeat`` after one warm-up, batch 16): our evaluator on the JSONL with
``next_token_acc`` (no BOS, as lm-eval's HFLM adds none for SmolLM2), lm-eval's ``HFLM`` on
the in-memory model (``engine="lm_eval"``) and lm-eval through our bridge
(``engine="lm_eval_bridge"``). It prints each mean, the cost ratio to ours, and whether the
per-example scores agree (they do for one-token answers; lm-eval's ``acc`` asks for every
answer token to be greedy, ``next_token_acc`` for the first only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

YAML = """task: {name}
custom_dataset: !function tl_transplant.harness.data.local_files
dataset_kwargs:
  data_files:
    train: {dev}
    test: {test}
output_type: loglikelihood
training_split: train
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="smollm2_rtn4")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import os

    from tl_transplant import ModelPair, zoo
    from tl_transplant.evaluation.evaluator import evaluate
    from tl_transplant.harness import load_task
    from tl_transplant.tasks.task import Task

    src, tgt = zoo.pair_dirs(args.pair)
    pair = ModelPair.load(src, tgt)
    paths = zoo.task_paths(args.pair)
    print(f"{args.pair}: target, batch 16, median of {args.repeat}, load "
          f"{os.getloadavg()[0]:.1f}, threads {os.environ.get('OMP_NUM_THREADS', 'all')}")
    with tempfile.TemporaryDirectory() as tmp:
        for key, sp in paths.items():
            name = f"bench_{args.pair}_{key}"
            folder = Path(tmp, key)  # one folder per task: lm-eval indexes a folder once
            folder.mkdir()
            (folder / f"{name}.yaml").write_text(YAML.format(name=name, dev=sp.dev, test=sp.test))
            view = load_task(name, include_path=str(folder), include_defaults=False).test.as_task(
                pair.target.tokenizer)
            task = Task.from_dataset(str(sp.test), name=f"{key}:test", metric="next_token_acc",
                                     prepend_bos=False)
            runs = {
                "ours (JSONL, next_token_acc)":
                    lambda t=task: evaluate(pair.target, t, batch_size=16, progress=False),
                "lm_eval HFLM": lambda v=view: evaluate(pair.target, v, engine="lm_eval",
                                                   batch_size=16),
                "lm_eval through the bridge": lambda v=view: evaluate(
                    pair.target, v, engine="lm_eval_bridge", batch_size=16),
            }
            res, times = {}, {}
            for label, f in runs.items():
                f()
                ts = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    res[label] = f()
                    ts.append(time.perf_counter() - t0)
                times[label] = statistics.median(ts)
            base = times["ours (JSONL, next_token_acc)"]
            for label in runs:
                print(f"  {key:22s} {label:30s} mean {res[label].mean:.3f}  "
                      f"{1000 * times[label]:6.0f} ms  ratio {times[label] / base:.2f}")
            a = res["ours (JSONL, next_token_acc)"].scores
            b = res["lm_eval HFLM"].scores
            print(f"  {key:22s} per-example equal: {bool(np.array_equal(a, b))} "
                  f"({int((a != b).sum())} of {len(a)} differ)")


if __name__ == "__main__":
    main()
