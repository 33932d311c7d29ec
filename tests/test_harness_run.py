"""lm-eval tasks inside tl_transplant: the config's ``lm_eval:`` tasks and control tasks, a
whole run on them, ``evaluate(..., engine=...)``, ``tl-transplant eval``, the metric registry's
lm-eval metrics, and the shipped example of the source paper's protocol.

Offline: the test-only tasks in tests/data/harness and the package's miniature tasks, the
tiny word-level Llama pair.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import tl_transplant
from tl_transplant import ModelPair
from tl_transplant.cli import main as cli_main
from tl_transplant.errors import EvaluationError, TaskError
from tl_transplant.evaluation.evaluator import evaluate
from tl_transplant.harness import INSTALL_HINT, HarnessError, load_task
from tl_transplant.harness.view import HarnessTaskView
from tl_transplant.pipeline.config import ConfigError, LmEvalTaskConfig, TaskConfig, load_config
from tl_transplant.tasks.metrics import get_metric, is_accuracy, math_equivalent
from tl_transplant.tasks.task import Task

INC = Path(__file__).parent / "data" / "harness"
FAST = {"include_path": INC, "include_defaults": False}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def pair(pair_dirs: Any) -> ModelPair:
    return ModelPair.load(*pair_dirs("llama"))


def _mc(**kw: Any) -> dict[str, Any]:
    return {"lm_eval": "tiny_mc", "include_path": str(INC), "include_defaults": False, **kw}


def _cfg(pair_dirs: Any, task: dict[str, Any], controls: list[dict[str, Any]] | None = None,
         **kw: Any) -> dict[str, Any]:
    src, tgt = pair_dirs("llama")
    return {"source": str(src), "target": str(tgt), "task": task,
            "control_tasks": controls or [],
            "selection": {"methods": ["attribution"], "units": ["head", "neuron"],
                          "controls": ["random"]},
            "sweep": {"k": [1, 4], "alpha": [1.0]}, **kw}


# ---- config --------------------------------------------------------------------------------


def test_config_takes_lm_eval_tasks_and_controls(tmp_path: Path, pair_dirs: Any) -> None:
    (tmp_path / "tasks").symlink_to(INC)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_cfg(
        pair_dirs, {"lm_eval": "tiny_mc", "include_path": "tasks", "num_fewshot": 1,
                    "dev": {"split": "validation", "limit": 3}, "test": {"limit": 8}},
        [{"lm_eval": "tiny_mc", "name": "mc_norm", "include_path": ["tasks"],
          "metric": "acc_norm"}, {"path": "x.jsonl"}])))
    cfg = load_config(tmp_path / "run.yaml")
    assert isinstance(cfg.task, LmEvalTaskConfig) and cfg.task.include_path == str(
        tmp_path / "tasks")  # relative to the config file
    spec = cfg.task.spec()
    assert spec.name == "tiny_mc" and spec.num_fewshot == 1 and spec.dev.limit == 3
    assert spec.test.limit == 8 and not spec.allow_test_selection
    c0, c1 = cfg.control_tasks
    assert isinstance(c0, LmEvalTaskConfig) and c0.label == "mc_norm" and c0.metric == "acc_norm"
    assert isinstance(c1, TaskConfig)
    assert load_config(cfg.model_dump()).task == cfg.task  # round trip (config.json)


@pytest.mark.parametrize(("task", "message"), [
    (_mc(dev={"split": "train", "limit": 0}),
     "task: dev.limit must be a positive number of documents, got 0"),
    (_mc(test={"limit": -2}), "test.limit must be a positive number of documents, got -2"),
    (_mc(num_fewshot=True), "num_fewshot must be an integer >= 0"),
    (_mc(dev={"splitt": "train"}), "dev: unknown key.*'splitt'"),
    (_mc(bogus=1), "unknown key.*'bogus'"),
    (_mc(include_path="no/such/dir"), "task.include_path: folder .*no/such/dir.* does not exist"),
    (_mc(name=""), "name must be a non-empty string"),
])
def test_config_errors_name_the_key(pair_dirs: Any, task: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(pair_dirs, task))


def test_control_task_errors_name_their_entry(pair_dirs: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"control_tasks\.0: test\.limit must be a positive"):
        load_config(_cfg(pair_dirs, _mc(), [_mc(test={"limit": 0})]))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed: said before any model
    with pytest.raises(ConfigError, match=r"control_tasks\.0: lm-evaluation-harness is not "
                       r"installed; " + re.escape(INSTALL_HINT)):
        load_config(_cfg(pair_dirs, {"path": "x.jsonl"}, [_mc()]))


# ---- a whole run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(pair_dirs: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = _cfg(pair_dirs, _mc(num_fewshot=1),
               [_mc(name="mc_norm", metric="acc_norm", test={"limit": 6})])
    res = tl_transplant.run(cfg, out, progress=False, log=lambda *a: None)
    return res, out


def test_run_with_lm_eval_task_and_control_writes_lm_evals_json(lm_run: Any) -> None:
    res, out = lm_run
    for f in ("results.json", "report.html", "sweep.csv", "config.json", "model/config.json",
              "transplant_manifest.json"):
        assert (out / f).is_file(), f
    sw = res.sweep
    tgt, src = sw.baselines["test"]["target"], sw.baselines["test"]["source"]
    assert tgt.metric == "acc" and tgt.task == "tiny_mc:test" and tgt.n == 10
    assert tgt.meta["lm_eval"]["metric"] == "acc,none" and tgt.meta["engine"] == "hflm"
    assert res.results.test.tir is not None  # acc is an accuracy: TIR is defined
    best = sw.best
    assert best is not None and best.test is not None
    ret = {r.task: r for r in best.test.retention}
    assert set(ret) == {"mc_norm:test"} and ret["mc_norm:test"].metric == "acc_norm"
    assert ret["mc_norm:test"].n == 6 and ret["mc_norm:test"].relative is not None
    # lm-eval's own JSON: source, target before the edit, transplanted after it; its numbers
    # are the run's (same documents, same engine)
    for who, want in (("source", src), ("target", tgt),
                      ("transplanted", best.test.transplanted)):
        saved = json.loads((out / "lm_eval" / who / "tiny_mc" / "results.json").read_text())
        assert saved["results"]["tiny_mc"]["acc,none"] == pytest.approx(want.mean, abs=0)
        assert saved["n-shot"]["tiny_mc"] == 1
        rows = (out / "lm_eval" / who / "tiny_mc" / "samples_tiny_mc.jsonl").read_text()
        assert [json.loads(r)["acc"] for r in rows.splitlines()] == list(want.scores)
        norm = json.loads((out / "lm_eval" / who / "mc_norm" / "results.json").read_text())
        assert norm["results"]["tiny_mc"]["sample_len"] == 6
    results = json.loads((out / "results.json").read_text())
    assert not any("SELECTION ON TEST" in n for n in results["notes"])


def test_eval_command_on_a_run_equals_the_runs_in_memory_numbers(lm_run: Any,
                                                                  tmp_path: Path) -> None:
    """``tl-transplant eval RUN_DIR``: a plain lm-eval run (simple_evaluate, HFLM) on the run's
    source, target and *exported* model/ equals the in-memory numbers the run wrote."""
    res, out = lm_run
    rc = cli_main(["eval", str(out), "--tasks", "tiny_mc", "--include-path", str(INC),
                   "--no-defaults", "--num-fewshot", "1", "--batch-size", "16",
                   "--out", str(tmp_path / "ev"),
                   "--quiet"])
    assert rc == 0
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(doc["models"]) == {"source", "target", "transplanted"}
    for who in ("source", "target", "transplanted"):
        mine = json.loads((out / "lm_eval" / who / "tiny_mc" / "results.json").read_text())
        plain = json.loads((tmp_path / "ev" / "lm_eval" / who / "results.json").read_text())
        assert plain["results"]["tiny_mc"]["acc,none"] == mine["results"]["tiny_mc"]["acc,none"]
        assert plain["results"]["tiny_mc"]["acc_norm,none"] == \
            mine["results"]["tiny_mc"]["acc_norm,none"]
        a = [json.loads(r) for r in (out / "lm_eval" / who / "tiny_mc" /
                                      "samples_tiny_mc.jsonl").read_text().splitlines()]
        b = [json.loads(r) for r in (tmp_path / "ev" / "lm_eval" / who /
                                      "samples_tiny_mc.jsonl").read_text().splitlines()]
        assert [x["resps"] for x in a] == [x["resps"] for x in b]  # log-likelihoods, bit for bit
    paired = doc["results"]["tiny_mc"]["paired"]["acc,none"]
    m = res.results.test
    assert paired["transplanted"] == pytest.approx(m.transplanted)
    assert paired["tir"] == pytest.approx(m.tir) if m.tir is not None else paired["tir"] is None


def test_eval_command_errors(tmp_path: Path, pair_dirs: Any, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    _, tgt = pair_dirs("llama")
    base = [str(tgt), "--include-path", str(INC), "--no-defaults", "--out", str(tmp_path)]
    assert cli_main(["eval", *base, "--tasks", "tiny_mcc"]) == 2
    assert re.search(r"unknown lm-eval task 'tiny_mcc'.*close matches: tiny_mc",
                     capsys.readouterr().err)
    assert cli_main(["eval", str(tgt), "--tasks", "tiny_mc"]) != 0  # --out required for a model
    assert "--out is required" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert cli_main(["eval", *base, "--tasks", "tiny_mc"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_selection_on_test_is_refused_in_a_run_unless_allowed(pair_dirs: Any,
                                                              tmp_path: Path) -> None:
    on_test = {"lm_eval": "tl_math500_mini", "include_defaults": False,
               "dev": {"split": "test", "limit": 2}, "max_gen_toks": 4, "num_fewshot": 0}
    cfg = _cfg(pair_dirs, on_test, export=False, retention="none")
    cfg["sweep"] = {"k": [1], "alpha": [1.0]}
    with pytest.raises(HarnessError, match="refused.*allow_test_selection"):
        tl_transplant.run(cfg, tmp_path / "a", progress=False, log=lambda *a: None)
    assert not (tmp_path / "a").exists()
    cfg["task"] = {**on_test, "allow_test_selection": True}
    logged: list[str] = []
    res = tl_transplant.run(cfg, tmp_path / "b", progress=False,
                            log=lambda *a: logged.append(" ".join(map(str, a))))
    flag = "SELECTION ON TEST DOCUMENTS"
    assert any(flag in n for n in res.results.notes)
    assert flag in (tmp_path / "b" / "results.json").read_text()
    assert flag in (tmp_path / "b" / "report.html").read_text()
    assert any("allow_test_selection" in line for line in logged)
    assert res.sweep.baselines["test"]["target"].meta["selection_on_test"] is True
    assert res.sweep.baselines["test"]["target"].metric == "exact_match"


# ---- evaluate(..., engine=) ----------------------------------------------------------------


def test_evaluate_engines(pair: ModelPair) -> None:
    ht = load_task("tiny_mc", num_fewshot=1, **FAST)
    view = ht.test.as_task(pair.target.tokenizer)
    assert isinstance(view, HarnessTaskView)
    auto = evaluate(pair.target, view, progress=False)
    hf = evaluate(pair.target, view, engine="lm_eval")
    br = evaluate(pair.target, view, engine="lm_eval_bridge")
    ours = evaluate(pair.target, view, engine="tl_transplant", progress=False)
    assert auto.meta["engine"] == hf.meta["engine"] == "hflm" and br.meta["engine"] == "tl"
    assert auto.metric == "acc" and ours.metric == "mc_logprob" and auto.task == view.name
    assert np.array_equal(auto.scores, hf.scores) and np.array_equal(hf.scores, br.scores)
    np.testing.assert_allclose(hf.meta["lm_eval"]["loglikelihoods"],
                               br.meta["lm_eval"]["loglikelihoods"], atol=1e-5)
    # the registry's acc on the same rows is lm-eval's acc
    acc = evaluate(pair.target, view.replace(metric="acc"), progress=False)
    assert np.array_equal(acc.scores, hf.scores)
    # a subset is a plain Task (tl_transplant's own loop with the view's metric)
    sub = view.subset([0, 1, 2])
    assert type(sub) is Task and evaluate(pair.target, sub, progress=False).metric == "mc_logprob"
    with pytest.raises(EvaluationError, match="evaluates lm-eval tasks.*plain Task"):
        evaluate(pair.target, sub, engine="lm_eval")
    with pytest.raises(EvaluationError, match="engine must be one of"):
        evaluate(pair.target, view, engine="hf")


# ---- the metric registry ---------------------------------------------------------------------


def test_lm_eval_metrics_in_the_registry(pair: ModelPair) -> None:
    assert all(is_accuracy(m) for m in ("acc", "acc_norm", "math_verify", "exact_match"))
    t = Task(name="mc", prompts=["w4 w5", "w6 w7"], answers=["w8", "w9 w10 w11"],
             choices=[["w8", "w8"], ["w9 w10 w11", "w12"]], metric="acc")
    lp = np.array([[-1.0, -1.0], [-6.0, -4.0]])  # example 0: a tie; example 1: 3 chars vs 3x
    rows = get_metric("acc").rows(t, pair.target.tokenizer, False)
    import torch

    flat = torch.tensor([lp[int(e), int(c)] for e, c in zip(
        rows.data["choices"].example, rows.data["choices"].choice)], dtype=torch.float64)
    # acc: ties go to the first choice (correct for example 0); -6 < -4 so example 1 is wrong
    assert get_metric("acc").per_example(flat, rows).tolist() == [1.0, 0.0]  # type: ignore[attr-defined]
    # acc_norm: -6/10 chars > -4/3 chars: example 1 becomes right
    assert get_metric("acc_norm").per_example(flat, rows).tolist() == [1.0, 1.0]  # type: ignore[attr-defined]
    assert get_metric("mc_logprob").per_example(flat, rows).tolist() == [0.0, 0.0]  # type: ignore[attr-defined]
    assert math_equivalent("so it is $\\boxed{\\frac{1}{2}}$.", "0.5")
    assert math_equivalent("The final answer is $50$.", "50")
    assert not math_equivalent("The final answer is $51$.", "50")
    with pytest.raises(TaskError, match="unknown metric"):
        Task(name="x", prompts=["a"], answers=["b"], metric="accc")


# ---- the source paper's protocol (examples/math500_protocol.yaml) --------------------------

#: The miniature local copies shipped with the package, in lm-eval's format.
MINIATURE = {"minerva_math500": "tl_math500_mini", "minerva_math_algebra": "tl_math_mini"}


def test_math500_protocol_example_on_the_miniature_copy() -> None:
    path = EXAMPLES / "math500_protocol.yaml"
    cfg = load_config(path, {"device": "cpu"})  # the example asks for a GPU
    task = cfg.task
    assert isinstance(task, LmEvalTaskConfig)
    spec = task.spec()
    # MATH-500 whole as test, greedy, math_verify, the grid's largest max_new_tokens
    assert spec.name == "minerva_math500" and spec.test.limit is None
    assert spec.metric == "math_verify,none" and spec.max_gen_toks == 512
    assert not spec.allow_test_selection
    # dev: MATH training problems, another task than the test's
    assert spec.dev.task == "minerva_math_algebra" and spec.dev.split == "train"
    assert cfg.sweep.k and cfg.sweep.alpha and cfg.selection.controls == ["random"]
    assert all(isinstance(c, LmEvalTaskConfig) for c in cfg.control_tasks)
    # the same structure on the miniature local copy: loads offline, dev and test are
    # different documents from different splits, greedy with lm-eval's stop sequence
    raw = yaml.safe_load(path.read_text())["task"]
    mini = {**raw, "lm_eval": MINIATURE[raw["lm_eval"]], "include_defaults": False,
            "dev": {**raw["dev"], "task": MINIATURE[raw["dev"]["task"]], "limit": 4}}
    ht = load_task(mini)
    assert ht.test.task_name == "tl_math500_mini" and ht.test.split == "test"
    assert ht.dev.task_name == "tl_math_mini" and ht.dev.split == "train"
    assert len(ht.test) == ht.test.n_available == 5 and len(ht.dev) == 4
    assert not set(ht.dev.contexts) & set(ht.test.contexts)
    assert ht.test.metric == "math_verify" and not ht.selection_on_test
    kw = (ht.test.gen_kwargs or [{}])[0]
    assert kw["max_gen_toks"] == 512 and kw["do_sample"] is False and "Problem:" in kw["until"]
    # choosing on the test problems is refused, as in the example (allow_test_selection: false)
    with pytest.raises(HarnessError, match="refused"):
        load_task({**mini, "dev": {"split": "test", "limit": 2}})
    with pytest.raises(HarnessError, match="refused"):  # MATH's test split holds MATH-500
        load_task({**mini, "dev": {"task": "tl_math_mini", "split": "test"}})
