"""The metric registry: built-in metrics score exactly as before it; a metric added from
outside the package in one file (docs/examples/my_metric.py) works everywhere.

``tests/data/metric_reference.json`` holds per-example scores (float64, as hex) of every
built-in metric on tiny models, recorded by :func:`reference_runs` from the code before the
registry existed (commit f3bad39, ``python tests/test_metrics.py --record``). Where this
machine computes the tiny models' logits bit for bit as the recording machine did (a logits
fingerprint per family says so), the scores must be bit-identical; elsewhere float32
arithmetic may differ in the last bits, so they must agree to float32 precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tl_transplant import ModelPair, run
from tl_transplant.evaluation import stats
from tl_transplant.evaluation.evaluator import evaluate, transplant_metrics
from tl_transplant.evaluation.generic import generic_retention
from tl_transplant.evaluation.stats import tir
from tl_transplant.pipeline.config import load_config
from tl_transplant.scoring.data import Context
from tl_transplant.tasks import metrics
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.metrics import (
    ACCEPTABLE_FIELDS,
    METRIC_REGISTRY,
    NEEDABLE_FIELDS,
    Batch,
    GenerationMetric,
    LogitMetric,
    MetricError,
    accuracy_metrics,
    available_metrics,
    get_metric,
    is_accuracy,
    register_metric,
)
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import answer_logprobs
from tl_transplant.testing import perturbed_copy, save_tiny, tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "metric_reference.json"
EXAMPLE = ROOT / "docs" / "examples" / "my_metric.py"
DOC = ROOT / "docs" / "adding_a_metric.md"
BUILTIN = ("next_token_acc", "answer_logprob", "logit_diff", "exact_match",
           "next_token_agreement", "mc_logprob", "acc", "acc_norm", "math_verify")
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


# ---- the registry ---------------------------------------------------------------------------


@pytest.fixture()
def clean_registry():
    """Leave the registry (and imported example/plugin modules) as they were."""
    saved, mods = dict(METRIC_REGISTRY), set(sys.modules)
    yield
    METRIC_REGISTRY.clear()
    METRIC_REGISTRY.update(saved)
    for m in set(sys.modules) - mods:
        if m.startswith(("my_metric_example", "metric_plugin")):
            del sys.modules[m]


def test_the_registry_holds_every_rule_of_the_builtins() -> None:
    assert available_metrics()[: len(BUILTIN)] == list(BUILTIN)
    assert accuracy_metrics() == ("next_token_acc", "exact_match", "next_token_agreement",
                                  "mc_logprob", "acc", "acc_norm", "math_verify")
    assert stats.ACCURACY_METRICS == metrics.ACCURACY_METRICS == accuracy_metrics()
    assert metrics.METRICS == tuple(available_metrics())
    for name in BUILTIN:
        m = get_metric(name)
        assert m.name == name and m.generative == (name in ("exact_match", "math_verify"))
        assert isinstance(m, GenerationMetric if m.generative else LogitMetric)
        assert is_accuracy(name) == m.accuracy
        assert (tir(0.5, 0.25, metric=name, warn=False) == 2.0) == m.accuracy
    assert get_metric("logit_diff").needs == ("wrong_answers",)
    assert get_metric("mc_logprob").needs == ("choices",)
    assert get_metric("exact_match").accepts == ("max_new_tokens", "extract")
    # The scorers' default differentiable metric is the answer log-prob, from the registry.
    assert get_metric("answer_logprob").differentiable() is answer_logprobs
    assert [n for n in BUILTIN if get_metric(n).differentiable() is not None] == [
        "answer_logprob"]
    assert Context(pair=None, batch_size=1, progress=False).metric_fn() is answer_logprobs
    # Field names a metric may need or read are Task fields.
    task_fields = {f.name for f in dataclasses.fields(Task)}
    assert set(NEEDABLE_FIELDS) | set(ACCEPTABLE_FIELDS) <= task_fields
    with pytest.raises(MetricError, match="unknown metric 'bleu'; valid: next_token_acc, "):
        get_metric("bleu")
    assert not is_accuracy("bleu") and tir(0.5, 0.25, metric="bleu", warn=False) is None


def _doc_table() -> dict[str, list[str]]:
    section = DOC.read_text().split("## The built-in metrics")[1].split("\n## ")[0]
    rows = [r.strip("|").split("|") for r in section.splitlines() if r.startswith("| `")]
    return {c[0].strip(" `"): [x.strip() for x in c[1:]] for c in rows}


def test_the_doc_table_is_the_registry() -> None:
    table = _doc_table()
    assert list(table) == list(BUILTIN)
    for name, (kind, acc, needs, reads) in table.items():
        m = get_metric(name)
        assert kind == ("generation" if m.generative else "logits"), name
        assert acc == ("yes" if m.accuracy else "no"), name
        assert needs.replace("`", "").split(", ") == list(m.needs) or not (needs or m.needs)
        assert reads.replace("`", "").split(", ") == list(m.accepts) or not (reads or m.accepts)


def test_registration_is_checked(clean_registry) -> None:
    def score(self: Any, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return torch.zeros(len(batch.idx), dtype=torch.float64)

    cases: list[tuple[Any, str]] = [
        (type("NoName", (LogitMetric,), {"score_batch": score}), "needs a non-empty `name`"),
        (type("Dup", (LogitMetric,), {"name": "answer_logprob", "score_batch": score}),
         "two metrics are named 'answer_logprob'"),
        (type("BadNeeds", (LogitMetric,), {"name": "x1", "needs": ("labels",),
                                           "score_batch": score}),
         r"needs \['labels'\] are not Task fields"),
        (type("NoScore", (LogitMetric,), {"name": "x2"}), "must implement score_batch"),
        (type("NoGen", (GenerationMetric,), {"name": "x3"}), "must implement score_generations"),
        (object(), "must subclass LogitMetric or GenerationMetric"),
    ]
    for cls, message in cases:
        with pytest.raises(MetricError, match=message):
            register_metric(cls)
    assert available_metrics() == list(BUILTIN)  # nothing half-registered
    same = type(get_metric("answer_logprob"))
    assert register_metric(same) is same and get_metric("answer_logprob").name == "answer_logprob"


# ---- a metric from outside the package, in one file -------------------------------------


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("my_metric_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_doc_shows_the_example_file_verbatim() -> None:
    m = re.search(r"<!-- example:begin docs/examples/my_metric.py -->\n```python\n(.*?)```\n"
                  r"<!-- example:end -->", DOC.read_text(), re.S)
    assert m, "docs/adding_a_metric.md lost its example markers"
    assert m.group(1) == EXAMPLE.read_text()


@pytest.fixture(scope="module")
def example_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPair, Path]:
    """A tiny llama pair in memory and on disk (for the YAML run)."""
    d = tmp_path_factory.mktemp("metric_example")
    tok = word_tokenizer(d / "tok")
    target = tiny_model("llama", seed=0)
    source = perturbed_copy(target, scale=0.3, seed=1)
    save_tiny(source, tok, d / "source")
    save_tiny(target, tok, d / "target")
    return ModelPair.load((source, tok), (target, tok)), d


def _top3(pair: ModelPair, side: str, task: Task) -> list[float]:
    """Independent check: one prompt at a time, no padding, through the bridge."""
    s = getattr(pair, side)
    out = []
    for p, a in zip(task.prompts, task.answers):
        ids = [s.tokenizer.bos_token_id, *s.tokenizer(p, add_special_tokens=False)["input_ids"]]
        first = s.tokenizer(a, add_special_tokens=False)["input_ids"][0]
        with torch.inference_mode():
            top = s.bridge(torch.tensor([ids]))[0, -1].float().topk(3).indices.tolist()
        out.append(float(first in top))
    return out


def test_example_metric_is_used_by_evaluate_stats_and_a_yaml_run(
        example_pair, clean_registry, tmp_path) -> None:
    pair, d = example_pair
    assert "top3_acc" not in available_metrics()
    with pytest.raises(ValueError, match="unknown metric 'top3_acc'"):
        Task("t", ["w1"], [" w2"], metric="top3_acc")
    load_example()
    assert "top3_acc" in available_metrics() and is_accuracy("top3_acc")
    # half the answers are the target's top-1, so the scores are not all equal
    task = _half_right(pair, builtin_task("lookup", n=12, seed=8, prepend_bos=True), 1).replace(
        metric="top3_acc")
    res = {side: evaluate(pair, task, side=side, batch_size=5, progress=False)
           for side in ("source", "target")}
    for side, r in res.items():
        assert r.metric == "top3_acc" and r.scores.tolist() == _top3(pair, side, task)
        acc = evaluate(pair, task.replace(metric="next_token_acc"), side=side, progress=False)
        assert (r.scores >= acc.scores).all()  # the top-1 is in the top 3
    assert 0 < res["target"].mean < 1
    m = transplant_metrics(res["target"], res["source"], warn=False)
    assert m.tir == pytest.approx(res["source"].mean / res["target"].mean)  # an accuracy

    # A run from YAML: `metric: top3_acc` for the task and the control task.
    for name, t in zip(("task", "control"), task.split(0.5, seed=0)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(t.prompts, t.answers)))
    (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
        source: {d / "source"}
        target: {d / "target"}
        task: {{path: {tmp_path / "task.jsonl"}, metric: top3_acc, prepend_bos: true}}
        control_tasks:
          - {{path: {tmp_path / "control.jsonl"}, metric: top3_acc, prepend_bos: true}}
        selection: {{methods: [weight_diff], units: [head], controls: []}}
        sweep: {{k: [1, 2], alpha: [1.0]}}
        export: false
        """))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 dev examples: selection and recovery warnings
        out = run(tmp_path / "run.yaml", tmp_path / "out", progress=False, report=False,
                  log=lambda *_: None).results
    test = Task.from_dataset(tmp_path / "task.jsonl", metric="top3_acc", prepend_bos=True
                             ).split(0.5, seed=0)[1]
    ctl = Task.from_dataset(tmp_path / "control.jsonl", metric="top3_acc", prepend_bos=True
                            ).split(0.5, seed=0)[1]
    assert out["baselines"]["target"]["test"] == np.mean(_top3(pair, "target", test))
    assert out["baselines"]["source"]["test"] == np.mean(_top3(pair, "source", test))
    assert out["retention"][0]["before"] == np.mean(_top3(pair, "target", ctl))
    t, x = out["baselines"]["target"]["test"], out["test"]["transplanted"]
    assert t > 0 and out["test"]["tir"] == pytest.approx(x / t)  # TIR: top3_acc is an accuracy


def test_an_installed_metric_plugin_loads_lazily(clean_registry, tmp_path, monkeypatch) -> None:
    """The entry point group ``tl_transplant.metrics``: how a new process (the CLI) finds a
    metric. The example file is the plugin module."""
    (tmp_path / "metric_plugin_top3.py").write_text(EXAMPLE.read_text())
    (tmp_path / "metric_plugin_broken.py").write_text("import a_module_that_does_not_exist\n")
    (tmp_path / "metric_plugin_empty.py").write_text("X = 1\n")
    info = tmp_path / "metric_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: metric-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [tl_transplant.metrics]
        top3_acc = metric_plugin_top3
        broken_metric = metric_plugin_broken
        empty_metric = metric_plugin_empty
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    names = available_metrics()
    assert names[: len(BUILTIN)] == list(BUILTIN)
    assert {"top3_acc", "broken_metric", "empty_metric"} <= set(names)
    assert "metric_plugin_top3" not in sys.modules and "top3_acc" not in METRIC_REGISTRY  # lazy
    assert not is_accuracy("top3_acc")  # not loaded yet: nothing is known about it
    cfg = load_config({"source": "s", "target": "t",
                       "task": {"path": "x.jsonl", "metric": "top3_acc"}})
    assert cfg.task.metric == "top3_acc"
    t = Task("t", ["w1 w2"], [" w3"], metric="top3_acc")  # loads the plugin
    assert "metric_plugin_top3" in sys.modules and is_accuracy(t.metric)
    with pytest.raises(MetricError, match=r"metric plugin 'broken_metric' \(entry point "
                                          r"'metric_plugin_broken'\) failed to load: "
                                          "ModuleNotFoundError"):
        get_metric("broken_metric")
    with pytest.raises(MetricError, match="registered no metric named 'empty_metric'"):
        get_metric("empty_metric")
    with pytest.raises(MetricError, match="registered no metric named 'empty_metric'"):
        Task("t", ["w1"], [" w2"], metric="empty_metric")  # the plugin's error, not "unknown"
