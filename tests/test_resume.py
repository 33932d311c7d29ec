"""Runs that resume (issue 22 item 2): an interrupted run keeps its finished scores beside
``--out``; ``--resume`` reuses them and gives the output of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tl_transplant.cli import main
from tl_transplant.edit.weights import WeightMask
from tl_transplant.errors import OutputError
from tl_transplant.pipeline import stages
from tl_transplant.pipeline.resume import RunKey, RunStore, partial_dir, run_key, same
from tl_transplant.pipeline.runner import run
from tl_transplant.scoring.scores import Scores
from tl_transplant.scoring.weight_scores import WeightScores
from tl_transplant.sweeps import stages as sweep_stages
from tl_transplant.testing import (
    tiny_run_dir,
)

# Every file of a run's output but the figure: equal bytes between an uninterrupted run
# and an interrupted-then-resumed one (results.json holds no timestamps or durations); the
# manifest and the score files are equal but for their "created" times.
COMPARED = ("results.json", "sweep.json", "sweep.csv", "config.json")
SCORE_FILES = ("activation_diff", "attribution", "attribution@weight", "weight_diff")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    return tiny_run_dir(d)


def _cfg(d: Path, **over: Any) -> dict[str, Any]:
    task = {"prepend_bos": True, "metric": "answer_logprob"}
    cfg: dict[str, Any] = {
        "source": str(d / "source"), "target": str(d / "target"),
        "task": {"path": str(d / "task.jsonl"), **task},
        "control_tasks": [{"path": str(d / "control.jsonl"), **task}],
        # two data-based scorers (kept), the second also at the weight grain; one weight-only
        "selection": {"methods": ["activation_diff", "attribution", "weight_diff@unit"],
                      "units": ["head", "neuron", "weight"], "controls": ["random"]},
        "sweep": {"budget": [0.02, 0.05], "alpha": [1.0]},
        "seed": 0, "export": False,
    }
    cfg.update(over)
    return cfg


_SCORE_ONE = stages._score_one


class Calls:
    """Wraps ``stages._score_one``: records the labels scored, raises at ``fail_at``."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.labels: list[str] = []
        self.fail_at = fail_at
        self.real = _SCORE_ONE

    def __call__(self, pair: Any, dev: Any, r: Any, cfg: Any, **kw: Any) -> Any:
        self.labels.append(r.label)
        if r.label == self.fail_at:
            raise RuntimeError(f"injected failure in {r.label}")
        return self.real(pair, dev, r, cfg, **kw)


def _run(cfg: dict[str, Any], out: Path, lines: list[str] | None = None, **kw: Any) -> Any:
    log = (lambda *a: lines.append(" ".join(map(str, a)))) if lines is not None else (
        lambda *_: None)
    return run(cfg, out, progress=False, report=False, log=log, **kw)


@pytest.fixture(scope="module")
def baseline(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "out"
    _run(_cfg(workdir), out)
    assert not partial_dir(out).exists()  # a finished run leaves no staging area
    return out


def _same_output(a: Path, b: Path) -> None:
    for name in COMPARED:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ma, mb = (json.loads((d / "transplant_manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for t in m["transplants"]:
            assert t.pop("created")
    assert ma == mb
    for label in SCORE_FILES:
        sa, sb = (json.loads((d / f"scores_{label}.json").read_text()) for d in (a, b))
        assert sa["meta"].pop("created") and sb["meta"].pop("created")
        assert sa == sb, label
    for w in a.glob("weights-*.safetensors"):  # the chosen weight mask, if one was chosen
        assert w.read_bytes() == (b / w.name).read_bytes()


@pytest.mark.filterwarnings("ignore")
def test_exception_then_resume_equals_uninterrupted(workdir: Path, baseline: Path,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    calls = Calls(fail_at="attribution")
    monkeypatch.setattr(stages, "_score_one", calls)
    failed: list[str] = []
    with pytest.raises(RuntimeError, match="injected"):
        _run(_cfg(workdir), out, failed)
    assert calls.labels == ["activation_diff", "attribution"]
    assert "kept the finished stages (scores of activation_diff) in" in failed[-1]
    assert "--resume" in failed[-1]
    assert not out.exists()  # the output stays clean, as before
    kept = sorted(p.name for p in (partial_dir(out) / "scores").iterdir())
    assert kept == ["activation_diff.safetensors"]

    calls = Calls()
    monkeypatch.setattr(stages, "_score_one", calls)
    lines: list[str] = []
    _run(_cfg(workdir), out, lines, resume=True)
    assert "activation_diff" not in calls.labels and "attribution" in calls.labels
    assert any(line.startswith("reused scores of activation_diff") for line in lines)
    assert not partial_dir(out).exists()
    _same_output(baseline, out)


_EVALUATE = sweep_stages.Models.evaluate


class Evals:
    """Wraps the sweep's ``Models.evaluate``: counts the calls, raises at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.n, self.fail_at = 0, fail_at

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Evals:
        real = _EVALUATE

        def evaluate(models: Any, side: Any, t: Any) -> Any:
            self.n += 1
            if self.n == self.fail_at:
                raise KeyboardInterrupt  # as Ctrl-C
            return real(models, side, t)

        monkeypatch.setattr(sweep_stages.Models, "evaluate", evaluate)
        return self


@pytest.mark.filterwarnings("ignore")
def test_interrupted_sweep_resumes_its_dev_evaluations(workdir: Path, baseline: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    full = Evals().install(monkeypatch)
    _run(_cfg(workdir), tmp_path / "full")
    Evals(fail_at=12).install(monkeypatch)  # in the dev sweep, after a few configs
    failed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(workdir), out, failed)
    kept = len(list((partial_dir(out) / "dev").glob("*.safetensors")))
    assert kept >= 2 and f"{kept} dev evaluations" in failed[-1]

    scorers = Calls()
    monkeypatch.setattr(stages, "_score_one", scorers)
    again = Evals().install(monkeypatch)
    lines: list[str] = []
    _run(_cfg(workdir), out, lines, resume=True)
    assert not {"activation_diff", "attribution", "attribution@weight"} & set(scorers.labels)
    assert f"reused {kept} dev evaluations of the sweep" in " ".join(lines)
    # each kept configuration saved its task evaluation and one per control task
    assert again.n == full.n - 2 * kept
    _same_output(baseline, out)


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
from tl_transplant.pipeline import stages
from tl_transplant.sweeps import stages as sweep_stages
def wait_for_kill():
    Path(sys.argv[2]).write_text("now")  # the point at which the test kills us
    time.sleep(600)
real = stages._score_one
def slow(pair, dev, r, cfg, **kw):
    if r.label == sys.argv[1]:
        wait_for_kill()
    return real(pair, dev, r, cfg, **kw)
stages._score_one = slow
real_eval, n = sweep_stages.Models.evaluate, [0]
def slow_eval(models, side, t):
    n[0] += 1
    if sys.argv[1] == f"evaluation {n[0]}":
        wait_for_kill()
    return real_eval(models, side, t)
sweep_stages.Models.evaluate = slow_eval
from tl_transplant.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("sig", "at"), [(signal.SIGKILL, "attribution@weight"),
                                         (signal.SIGTERM, "attribution"),
                                         (signal.SIGKILL, "evaluation 12")])
def test_real_kill_then_resume_equals_uninterrupted(workdir: Path, baseline: Path,
                                                    tmp_path: Path, sig: int, at: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(workdir)))
    out, flag = tmp_path / "out", tmp_path / "flag"
    script = tmp_path / "kill_me.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), at, str(flag), "run", str(cfg_path), "--out", str(out),
         "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and not out.exists()
    want = {"attribution@weight": ["activation_diff", "attribution"],
            "attribution": ["activation_diff"]}.get(at, ["activation_diff", "attribution",
                                                         "attribution@weight"])
    kept = sorted(p.stem for p in (partial_dir(out) / "scores").glob("*.safetensors"))
    assert kept == want

    calls = Calls()
    monkeypatch.setattr(stages, "_score_one", calls)
    lines: list[str] = []
    _run(str(cfg_path), out, lines, resume=True)
    assert not set(want) & set(calls.labels)
    assert [ln.split()[3] for ln in lines if ln.startswith("reused scores of")] == want
    if at.startswith("evaluation"):  # killed in the dev sweep: its finished evaluations too
        assert re.search(r"reused \d+ dev evaluations? of the sweep", " ".join(lines))
    else:
        assert at in calls.labels
    _same_output(baseline, out)


@pytest.mark.filterwarnings("ignore")
def test_changed_config_reuses_nothing(workdir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(stages, "_score_one", Calls(fail_at="attribution"))
    with pytest.raises(RuntimeError):
        _run(_cfg(workdir), out)
    calls = Calls()
    monkeypatch.setattr(stages, "_score_one", calls)
    lines: list[str] = []
    changed = _cfg(workdir, sweep={"budget": [0.02, 0.05], "alpha": [0.5, 1.0]})
    _run(changed, out, lines, resume=True)
    assert calls.labels[0] == "activation_diff"  # scored again
    assert not any(line.startswith("reused") for line in lines)
    assert any("config differs" in line and "reusing nothing" in line for line in lines)
    assert not partial_dir(out).exists()


@pytest.mark.filterwarnings("ignore")
def test_staging_area_needs_resume_or_overwrite(workdir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(stages, "_score_one", Calls(fail_at="attribution"))
    with pytest.raises(RuntimeError):
        _run(_cfg(workdir), out)
    monkeypatch.setattr(stages, "_score_one", Calls())
    with pytest.raises(OutputError, match=r"--resume .*--overwrite") as e:
        _run(_cfg(workdir), out)
    assert "activation_diff" in str(e.value)
    assert (partial_dir(out) / "scores" / "activation_diff.safetensors").is_file()  # untouched
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(workdir)))
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert not out.exists()
    calls = Calls()
    monkeypatch.setattr(stages, "_score_one", calls)
    lines: list[str] = []
    _run(_cfg(workdir), out, lines, overwrite=True)  # discards the stages, starts again
    assert calls.labels[0] == "activation_diff"
    assert any(line.startswith("discarding") for line in lines)
    assert not partial_dir(out).exists()


@pytest.mark.filterwarnings("ignore")
def test_early_failure_leaves_no_staging_area(workdir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(stages, "_score_one", Calls(fail_at="activation_diff"))
    with pytest.raises(RuntimeError):
        _run(_cfg(workdir), out)
    assert not partial_dir(out).exists() and not out.exists()
    (partial_dir(out) / "scores").mkdir(parents=True)  # an empty area is no obstacle
    monkeypatch.setattr(stages, "_score_one", Calls())
    _run(_cfg(workdir), out)
    assert (out / "results.json").is_file() and not partial_dir(out).exists()


def test_store_round_trips_losslessly(tmp_path: Path) -> None:
    key = RunKey({"config": "x"})
    store = RunStore.open(tmp_path / "out", key, resume=False, overwrite=False)
    nan = math.nan
    s = Scores(["L0.H0", "L0.H1", "L1.N3"], [1.5, nan, -math.inf], method="m",
               consistency=[0.1, 0.2, nan], columns={"extra": torch.tensor([1.0, 2.0, 3.0])},
               meta={"tuple": (1, 2.5), "nan": nan, "t": torch.tensor([1, 2]), "n": None,
                     "nested": {"list": [1, "a"]}}, suggested=["L0.H0"])
    assert store.put("m", s)
    back = store.get("m")
    assert isinstance(back, Scores) and same(back.meta, s.meta)
    assert same(back.values, s.values) and same(back.consistency, s.consistency)
    assert back.suggested == s.suggested and same(back.columns, s.columns)
    assert not same(back.meta, {**s.meta, "tuple": [1, 2.5]})  # a tuple is not a list

    sug = WeightMask({"w": [0, 3]}, {"w": (2, 3)})
    ws = WeightScores({"w": torch.tensor([[0.5, nan, 1.0], [2.0, 0.0, -1.0]])}, method="a",
                      meta={"alpha_scale": "inverse_fraction", "k": (1,)}, suggested=sug)
    assert store.put("a@weight", ws)
    wb = store.get("a@weight")
    assert isinstance(wb, WeightScores) and wb.suggested is not None
    assert wb.suggested.sha256 == sug.sha256 and same(wb.values, ws.values)
    assert wb.alpha_scale == "inverse_fraction" and same(wb.meta, ws.meta)

    odd = Scores(["L0.H0"], [1.0], method="o", meta={"obj": object()})
    lines: list[str] = []
    store.log = lambda *a: lines.append(" ".join(map(str, a)))
    assert not store.put("o", odd) and store.get("o") is None
    assert "not kept" in lines[0]


def test_key_follows_models_and_tasks(workdir: Path, tmp_path: Path) -> None:
    from tl_transplant.pipeline.config import load_config

    cfg = load_config(_cfg(workdir))
    inputs = [workdir / "task.jsonl", workdir / "control.jsonl"]
    k = run_key(cfg, inputs)
    assert run_key(cfg, inputs) == k
    copy = tmp_path / "task.jsonl"
    copy.write_text((workdir / "task.jsonl").read_text() + "\n")
    assert k.differs(run_key(cfg, [copy, workdir / "control.jsonl"]).parts) == ["inputs"]
    other = load_config(_cfg(workdir, target=str(workdir / "source")))
    assert k.differs(run_key(other, inputs).parts) == ["config", "target"]


@pytest.mark.filterwarnings("ignore")
def test_long_stages_show_remaining_time(workdir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The scoring and sweep bars (tqdm with a total) show ``elapsed<remaining``."""
    cfg = _cfg(workdir, selection={"methods": ["activation_diff"], "units": ["head", "neuron"],
                                   "controls": []})
    run(cfg, tmp_path / "out", progress=True, report=False, log=lambda *_: None)
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    for desc in ("activation_diff [task:dev]", "sweep task"):
        bars = [s for s in segments if s.startswith(desc)]
        assert bars and all(re.search(r"\[\d\d:\d\d<(\?|\d\d:\d\d)", s) for s in bars), desc
    assert any(re.search(r"^sweep task: .*<\d\d:\d\d", s) for s in segments)


@pytest.mark.filterwarnings("ignore")
def test_learned_mask_scores_are_kept_and_reused(workdir: Path, tmp_path: Path) -> None:
    """learned_mask's values and its ``gate`` column share memory (safetensors refuses that
    as given): they are kept all the same, and a resumed run reuses them."""
    cfg = _cfg(workdir, selection={"methods": ["learned_mask"], "units": ["head", "neuron"],
                                   "controls": ["random"],
                                   "options": {"learned_mask": {"steps": 2, "minibatch": 4}}})
    out = tmp_path / "out"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "_score_one", Calls(fail_at="random"))
        with pytest.raises(RuntimeError, match="injected"):
            _run(cfg, out, lines)
    assert not any("not kept" in ln for ln in lines), lines
    again: list[str] = []
    _run(cfg, out, again, resume=True)
    assert any("reused scores of learned_mask" in ln for ln in again), again
