"""The metric registry: every built-in metric scores exactly as before the registry.

``tests/data/metric_reference.json`` holds per-example scores (float64, as hex) of every
built-in metric on tiny models, recorded by :func:`reference_runs` from the code before the
registry existed (commit f3bad39, ``python tests/test_metrics.py --record``). Where this
machine computes the tiny models' logits bit for bit as the recording machine did (a logits
fingerprint per family says so), the scores must be bit-identical; elsewhere float32
arithmetic may differ in the last bits, so they must agree to float32 precision.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tl_transplant import ModelPair
from tl_transplant.evaluation.evaluator import evaluate
from tl_transplant.evaluation.generic import generic_retention
from tl_transplant.tasks.task import Task, builtin_task
from tl_transplant.testing import perturbed_copy, tiny_model, word_tokenizer

REFERENCE = Path(__file__).resolve().parent / "data" / "metric_reference.json"
#: llama prepends BOS by default, gpt_neox does not: both rules are covered.
FAMILIES = ("llama", "gpt_neox")
FINGERPRINT_IDS = [[1, 5, 9, 13, 40, 7, 88], [1, 60, 61, 62, 63, 4, 4]]


def _pair(family: str, tok: Any) -> ModelPair:
    target = tiny_model(family, seed=0)
    return ModelPair.load((perturbed_copy(target, scale=0.05, seed=1), tok), (target, tok))


def fingerprint(pair: ModelPair) -> str:
    """SHA-256 of the target's float32 logits on fixed ids: equal iff the arithmetic is."""
    with torch.inference_mode():
        logits = pair.target.bridge(torch.tensor(FINGERPRINT_IDS)).float().contiguous()
    return hashlib.sha256(logits.numpy().tobytes()).hexdigest()


def _greedy(pair: ModelPair, prompt: str, n: int) -> list[str]:
    """The target's greedy continuation of ``[BOS] prompt``: one prompt, no padding."""
    tok = pair.target.tokenizer
    ids = ([tok.bos_token_id] if pair.target.prepend_bos else []) + list(
        tok(prompt, add_special_tokens=False)["input_ids"])
    out: list[str] = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(pair.target.bridge(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(str(tok.convert_ids_to_tokens(nxt)))
    return out


def _half_right(pair: ModelPair, task: Task, n: int) -> Task:
    """``task`` with every other answer replaced by the target's greedy ``n`` words (so the
    target scores 1 there and the accuracies vary)."""
    answers = [" " + " ".join(_greedy(pair, p, n)) if i % 2 == 0 else a
               for i, (p, a) in enumerate(zip(task.prompts, task.answers))]
    wrong = None if task.wrong_answers is None else [
        [w for w in ws if w.split()[0] != a.split()[0]] or [" w91" if a != " w91" else " w90"]
        for ws, a in zip(task.wrong_answers, answers)]
    return task.replace(answers=answers, wrong_answers=wrong)


def reference_tasks(pair: ModelPair) -> list[Task]:
    """A few tasks per metric (multi-token answers, several extractors, ragged lengths);
    half the answers are the target's own greedy words, so accuracies are not all 0."""
    tasks = [_half_right(pair, builtin_task("successor", n=10, seed=0), 1),
             _half_right(pair, builtin_task("lookup", n=9, seed=1), 1),
             _half_right(pair, builtin_task("induction", n=10, seed=2, n_answer=2,
                                            metric="answer_logprob"), 2),
             _half_right(pair, builtin_task("lookup", n=9, seed=3, metric="logit_diff"), 1),
             _half_right(pair, builtin_task("successor", n=8, seed=4, n_answer=2,
                                            max_new_tokens=3, metric="exact_match"), 3),
             _half_right(pair, builtin_task("first", n=8, seed=5, metric="exact_match"),
                         1).replace(extract="first_word", max_new_tokens=2)]
    base = _half_right(pair, builtin_task("induction", n=9, seed=6, length=5), 1)
    rng = np.random.default_rng(7)
    choices = []
    for a, (w,) in zip(base.answers, base.wrong_answers or []):
        extra = f" w{int(rng.integers(60, 92))}"
        opts = list(dict.fromkeys([a, w, extra]))
        choices.append([opts[int(j)] for j in rng.permutation(len(opts))])
    tasks.append(base.replace(name="induction_mc", metric="mc_logprob", choices=choices))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # word vocabulary: task contexts only, with a note
        tasks.append(generic_retention(pair, tasks[1], n_text=0, n_task=8))
    return tasks


def reference_runs(tok: Any) -> dict[str, Any]:
    """Per-example scores (hex), generations and meta of every (family, task, side, batch)."""
    out: dict[str, Any] = {"fingerprints": {}, "runs": {}}
    for family in FAMILIES:
        pair = _pair(family, tok)
        out["fingerprints"][family] = fingerprint(pair)
        for task in reference_tasks(pair):
            for side in ("source", "target"):
                for bs in (3, 16):
                    r = evaluate(pair, task, side=side, batch_size=bs, progress=False)
                    key = f"{family}/{task.name}/{task.metric}/{side}/bs{bs}"
                    out["runs"][key] = {
                        "scores": [float(v).hex() for v in r.scores],
                        "dtype": str(r.scores.dtype),
                        "metric": r.metric,
                        "prepend_bos": r.prepend_bos,
                        "generations": r.generations,
                        "predictions": r.predictions,
                        "meta": r.meta,
                        "answers": task.answers,
                    }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_runs(word_tokenizer(tmp_path_factory.mktemp("metric_tok")))


def test_every_builtin_metric_scores_as_recorded(runs: dict[str, Any]) -> None:
    ref = json.loads(REFERENCE.read_text())
    assert set(runs["runs"]) == set(ref["runs"])
    metrics = {k.split("/")[2] for k in ref["runs"]}
    assert metrics == {"next_token_acc", "answer_logprob", "logit_diff", "exact_match",
                       "mc_logprob", "next_token_agreement"}
    for key, want in ref["runs"].items():
        got = runs["runs"][key]
        family = key.split("/")[0]
        exact = runs["fingerprints"][family] == ref["fingerprints"][family]
        w = np.array([float.fromhex(x) for x in want["scores"]])
        g = np.array([float.fromhex(x) for x in got["scores"]])
        assert got["dtype"] == want["dtype"] == "float64", key
        if exact:
            assert got["scores"] == want["scores"], key
            assert got["generations"] == want["generations"], key
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=key)
        assert got["predictions"] is None or len(got["predictions"]) == len(w), key
        same = ("metric", "prepend_bos", "meta", "answers")
        assert {k: got[k] for k in same} == {k: want[k] for k in same}, key
    # The recorded numbers say something: not all equal, accuracies are 0/1 and vary.
    acc = [float.fromhex(x) for k, v in ref["runs"].items() if "/next_token_acc/" in k
           for x in v["scores"]]
    assert set(acc) == {0.0, 1.0}


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = reference_runs(word_tokenizer(d))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}: {len(data['runs'])} runs")
