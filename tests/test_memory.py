"""Memory: the plan before loading (headers only, refusal with fixes, CLI), and evaluation
that keeps no full-vocabulary tensor from one batch to the next."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_transplant.evaluation import runner as eval_runner
from tl_transplant.evaluation.evaluator import evaluate
from tl_transplant.pipeline.config import load_config
from tl_transplant.pipeline.plan import (
    ENV_LIMIT,
    MemoryPlanError,
    model_facts,
    parse_bytes,
    plan_run,
)
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import answer_logprobs, encode
from tl_transplant.testing import save_tiny, tiny_model, word_tokenizer

PROMPTS = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w7 w8", "w9 w10 w11 w12", "w3", "w20 w21 w22"] * 3
ANSWERS = [" w4 w5", " w7", " w9", " w13 w14 w15", " w3", " w23"] * 3


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mem")
    tok = word_tokenizer(d / "tok")
    t = tiny_model("llama", seed=0)
    save_tiny(t, tok, d / "target")
    save_tiny(tiny_model("llama", seed=1), tok, d / "source")
    with (d / "task.jsonl").open("w") as f:
        for p, a in zip(PROMPTS, ANSWERS):
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return d


def _cfg(d: Path, **over: object) -> dict:
    cfg = {"source": str(d / "source"), "target": str(d / "target"),
           "task": {"path": str(d / "task.jsonl"), "prepend_bos": True,
                    "metric": "answer_logprob"},
           "selection": {"methods": ["attribution", "learned_mask"],
                         "units": ["head", "neuron", "weight"], "controls": ["random"],
                         "options": {"learned_mask": {"steps": 2}}},
           "sweep": {"budget": [0.01, 0.05], "alpha": [1.0]}, "retention": "none"}
    cfg.update(over)
    return cfg


# ---- the plan ----------------------------------------------------------------------------


def test_facts_from_headers_only(pair_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the plan read a weight")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    f = model_facts(str(pair_dir / "target"), "target", None)
    model = tiny_model("llama", seed=0)
    assert f.n_params == sum(p.numel() for p in model.state_dict().values()
                             if p.dtype.is_floating_point) or f.n_params == sum(
        p.numel() for p in model.parameters())
    assert f.stored_dtype == f.run_dtype == "float32" and f.bytes == 4 * f.n_params
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if ".layers." in n and p.ndim == 2)
    assert f.block_params == blocks
    assert (f.n_layers, f.d_model, f.vocab) == (2, model.config.hidden_size, 96)
    half = model_facts(str(pair_dir / "target"), "target", "bfloat16")
    assert half.bytes * 2 == f.bytes and half.run_dtype == "bfloat16"


def test_plan_stages_scale_with_batch_dtype_and_candidates(pair_dir: Path) -> None:
    p = plan_run(load_config(_cfg(pair_dir)))
    d = p.to_dict()
    names = set(d["stages"])
    assert {"load", "score attribution", "score attribution@weight", "score learned_mask",
            "score learned_mask@weight", "score random", "evaluate (sweep)", "export"} <= names
    assert d["peak_bytes"] == max(s["bytes"] for s in d["stages"].values())
    assert d["peak_bytes"] > d["runtime_bytes"] + d["models_bytes"]
    small = plan_run(load_config(_cfg(pair_dir, batch_size=2))).to_dict()["stages"]
    big = plan_run(load_config(_cfg(pair_dir, batch_size=8))).to_dict()["stages"]
    for st in ("evaluate (sweep)", "score attribution"):
        assert big[st]["extra_bytes"] > small[st]["extra_bytes"], st
    half = plan_run(load_config(_cfg(pair_dir, dtype="bfloat16")))
    assert half.models_bytes < p.models_bytes
    # a cast at load reads one side's stored float32 tensors while the bfloat16 copy grows
    load = half.to_dict()["stages"]["load"]["extra_bytes"]
    assert load == max(m.stored_bytes for m in half.models) == 2 * half.models[1].bytes
    more = _cfg(pair_dir)
    more["selection"]["options"]["learned_mask"]["candidates"] = 0.5  # type: ignore[index]
    lm = plan_run(load_config(more)).to_dict()["stages"]["score learned_mask@weight"]
    assert lm["extra_bytes"] > d["stages"]["score learned_mask@weight"]["extra_bytes"]
    few = _cfg(pair_dir)
    few["selection"]["options"]["learned_mask"]["unit_candidates"] = 0.05  # type: ignore[index]
    lmu = plan_run(load_config(few)).to_dict()["stages"]["score learned_mask"]
    assert lmu["extra_bytes"] < d["stages"]["score learned_mask"]["extra_bytes"]
    assert "top attribution" in lmu["detail"]
    assert "peak" in p.summary() and "runtime" in p.summary()


def test_refuses_what_does_not_fit_naming_the_fixes(
    pair_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tl_transplant import run

    cfg = load_config(_cfg(pair_dir))
    p = plan_run(cfg)
    p.check(available=p.peak_bytes)  # fits exactly: no error
    with pytest.raises(MemoryPlanError) as e:
        p.check(available=p.peak_bytes // 2)
    msg = str(e.value)
    for fix in ("batch_size", "bfloat16", "device_map"):
        assert fix in msg, msg
    assert isinstance(e.value, MemoryError)
    # run() stops before loading anything when the limit says so, and leaves no output
    monkeypatch.setenv(ENV_LIMIT, "100MB")
    logged: list[str] = []
    with pytest.raises(MemoryPlanError, match="will not fit"):
        run(_cfg(pair_dir), tmp_path / "out", progress=False, log=logged.append)
    assert not (tmp_path / "out").exists()
    assert any("memory plan" in str(x) for x in logged)
    assert parse_bytes("1.5GiB") == int(1.5 * 1024**3) and parse_bytes("512MB") == 512 * 1024**2
    with pytest.raises(MemoryPlanError):
        parse_bytes("lots")


def test_cli_plan_json(pair_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from tl_transplant.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_cfg(pair_dir)))
    assert main(["plan", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc["peak_bytes"], int) and doc["peak_bytes"] > 0
    assert doc["stages"]["load"]["bytes"] <= doc["peak_bytes"]
    assert main(["plan", str(path)]) == 0
    assert "peak" in capsys.readouterr().out


# ---- evaluation keeps no full-vocabulary tensor across batches ----------------------------


def _live_vocab_tensors(vocab: int) -> int:
    """Live 3-d tensors whose last dim is the vocabulary (logits or anything like them)."""
    gc.collect()
    n = 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.ndim == 3 and o.shape[-1] == vocab:
                n += 1
        except Exception:  # noqa: BLE001, S112 - objects mid-teardown
            continue
    return n


@pytest.mark.parametrize("metric", ["answer_logprob", "next_token_acc"])
def test_no_batch_logits_survive_into_the_next_batch(
    engineered_pair, monkeypatch: pytest.MonkeyPatch, metric: str
) -> None:
    pair, _ = engineered_pair
    vocab = int(pair.target.bridge.cfg.d_vocab)
    task = Task("t", PROMPTS, [a.split()[0] if metric == "next_token_acc" else a
                               for a in ANSWERS], metric=metric, prepend_bos=True)
    before = _live_vocab_tensors(vocab)
    seen: list[int] = []
    orig = eval_runner.Runner.logits

    def spy(self, ids, intervention=None):  # type: ignore[no-untyped-def]
        seen.append(_live_vocab_tensors(vocab) - before)
        return orig(self, ids, intervention)

    monkeypatch.setattr(eval_runner.Runner, "logits", spy)
    r = evaluate(pair.target, task, batch_size=4, progress=False)
    assert len(seen) >= 4 and np.isfinite(r.scores).all()
    assert seen == [0] * len(seen), f"vocab-sized tensors alive at each forward: {seen}"
    assert _live_vocab_tensors(vocab) == before


def test_answer_logprobs_reduces_to_answer_positions() -> None:
    """Equal to the full log-softmax over every position (the former rule), gradients too."""
    tok_dir = None  # the word tokenizer is not needed: a hand-made encoding
    del tok_dir
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=torch.float64, requires_grad=True)
    from tl_transplant.tasks.tokens import Encoded

    ids = torch.randint(4, 50, (3, 7), generator=g)
    enc = Encoded(ids, torch.tensor([2, 4, 1]), torch.tensor([3, 1, 6]), 0)
    got = answer_logprobs(logits, enc)
    full = torch.log_softmax(logits, -1)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    want = (full.gather(-1, nxt[..., None]).squeeze(-1) * enc.answer_mask()).sum(-1)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    ga, = torch.autograd.grad(got.sum(), logits)
    gb, = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)
    # half-precision logits are upcast to float32 before the log-softmax
    assert answer_logprobs(logits.detach().to(torch.bfloat16), enc).dtype == torch.float32


def test_encode_still_scores_a_real_batch(pair_dir: Path) -> None:
    tok = word_tokenizer(pair_dir / "tok2")
    enc = encode(tok, PROMPTS[:4], ANSWERS[:4], prepend_bos=True)
    logits = torch.zeros(4, enc.input_ids.shape[1], 96)
    lp = answer_logprobs(logits, enc)
    # uniform logits: each answer token costs log(96)
    assert torch.allclose(lp, -enc.answer_len.double().float() * float(np.log(96)))


def test_cuda_plan_splits_host_and_device(pair_dir: Path) -> None:
    """A CUDA run (config validated elsewhere; built here without a GPU): the stage bytes are
    device memory, peak_bytes the host's, the check is against the GPU's free memory."""
    cpu = plan_run(load_config(_cfg(pair_dir)))
    cfg = load_config(_cfg(pair_dir)).model_copy(update={"device": "cuda"})
    gpu = plan_run(cfg)
    assert cpu.device_peak_bytes is None and cpu.limiting_bytes == cpu.peak_bytes
    assert gpu.device_peak_bytes == gpu.peak.total_bytes - gpu.runtime_bytes
    assert gpu.to_dict()["device_peak_bytes"] == gpu.device_peak_bytes
    with pytest.raises(MemoryPlanError, match="GPU memory"):
        gpu.check(available=gpu.device_peak_bytes - 1)
    gpu.check(available=gpu.device_peak_bytes)


def test_a_plan_that_cannot_be_made_never_stops_the_run(
    pair_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tl_transplant.pipeline import plan as plan_mod

    def broken(cfg: object) -> None:
        raise RuntimeError("no headers today")

    monkeypatch.setattr(plan_mod, "plan_run", broken)
    logged: list[str] = []
    assert plan_mod.check_memory_plan(load_config(_cfg(pair_dir)), logged.append) is None
    assert logged and "memory plan skipped" in logged[0] and "no headers today" in logged[0]
