"""Hostile input, second probe (issue 22, item 3): nothing lost, no tracebacks, nothing
silently accepted.

One regression test per probe finding, in the order of the issue: data lost,
tracebacks, silently accepted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_transplant import cli
from tl_transplant.io.export import (
    ExportError,
    commit_out_dir,
    discard_out_dir,
    export_hf,
    prepare_out_dir,
)
from tl_transplant.models.pair import ModelPair
from tl_transplant.tasks.task import Task
from tl_transplant.testing import same_state, snapshot_side

ZOO = Path(__file__).resolve().parents[1] / "tl_transplant" / "zoo" / "pairs" / "cross_generation"


@pytest.fixture(scope="session")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    return (Path(shutil.copytree(ZOO / "gen2", root / "source")),
            Path(shutil.copytree(ZOO / "gen1", root / "target")))


@pytest.fixture(scope="session")
def _pair(dirs: tuple[Path, Path]) -> tuple[ModelPair, dict[str, torch.Tensor]]:
    pair = ModelPair.load(str(dirs[0]), str(dirs[1]))
    return pair, snapshot_side(pair.target)


@pytest.fixture
def pair(_pair: tuple[ModelPair, dict[str, torch.Tensor]]) -> ModelPair:
    """The session pair with the target's original weights and no transplant records."""
    p, snap = _pair
    with torch.no_grad():
        for k, v in p.target.params.items():
            v.data.copy_(snap[f"p:{k}"])
    p.target.refresh_mirrors()
    p.applied.clear()
    p.active.clear()
    assert same_state(snapshot_side(p.target), snap)
    return p


@pytest.fixture(scope="session")
def task() -> Task:
    from tl_transplant import zoo

    return zoo.load_tasks("cross_generation")["task"].dev


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


# ---- data lost -----------------------------------------------------------------------------


def test_two_writers_on_one_new_out_the_second_is_refused(pair: ModelPair, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A second export/run/apply on an output being written fails (it used to replace it)."""
    import tl_transplant.io.export as export

    out = tmp_path / "out"
    inner: list[BaseException] = []
    real = export.write_safetensors

    def second_writer(*a: Any, **k: Any) -> list[str]:
        try:  # the second run starts while the first is writing
            export_hf(pair, out)
        except ExportError as e:
            inner.append(e)
        return real(*a, **k)

    monkeypatch.setattr(export, "write_safetensors", second_writer)
    export_hf(pair, out)
    assert len(inner) == 1 and "is writing" in str(inner[0]) and "--overwrite" in str(inner[0])
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp, no claim left


def test_claim_is_released_on_failure_and_stale_claims_are_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "o"
    _, tmp = prepare_out_dir(out, False)
    with pytest.raises(ExportError, match="is writing"):
        prepare_out_dir(out, True)  # overwrite replaces a finished output, not a live one
    discard_out_dir(tmp, out)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".o.claim").write_text("999999999 .o.tmp-999999999-deadbeef")  # dead writer
    _, tmp = prepare_out_dir(out, False)
    (tmp / "f").write_text("mine")
    out.mkdir()
    (out / "theirs").write_text("someone else's")  # written meanwhile, outside any claim
    with pytest.raises(ExportError, match="--overwrite"):
        commit_out_dir(tmp, out, overwrite=False)
    assert (out / "theirs").read_text() == "someone else's"
    discard_out_dir(tmp, out)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_score_out_refuses_inputs_and_existing_files(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tl_transplant import zoo

    t = tmp_path / "task.jsonl"
    shutil.copy(zoo.task_paths("cross_generation")["task"].dev, t)
    before = t.read_text()
    base = ["score", "--source", str(dirs[0]), "--target", str(dirs[1]), "--task", str(t),
            "--method", "weight_diff", "--units", "head", "--quiet"]

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded")

    with monkeypatch.context() as m:  # every refusal comes before any model loads
        m.setattr(ModelPair, "load", boom)
        cfg = dirs[1] / "config.json"
        for out, says in [(t.with_suffix(".json"), None), (cfg, "input")]:
            if says is None:  # a task given as .json: the task file itself
                shutil.copy(t, out)
                base[base.index(str(t))] = str(out)
                says = "the input"
            rc, err = _main([*base, "--out", str(out), "--overwrite"], capsys)
            assert rc == 2 and says in err and "Traceback" not in err, err
        base[base.index(str(t.with_suffix(".json")))] = str(t)
        res = tmp_path / "results.json"
        res.write_text('{"earlier": "run"}')
        rc, err = _main([*base, "--out", str(res)], capsys)
        assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert t.read_text() == before and res.read_text() == '{"earlier": "run"}'
    assert json.loads(cfg.read_text())["model_type"]
    rc, err = _main([*base, "--out", str(res), "--overwrite"], capsys)
    assert rc == 0, err
    assert json.loads(res.read_text())["method"] == "weight_diff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "task.json",
                                                          "task.jsonl"]


def test_demo_keeps_files_a_user_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tl_transplant.pipeline.runner as pipeline

    class Res:
        def table(self) -> str:
            return "table"

    def fake_run(cfg: Any, out: Any, **kw: Any) -> Res:
        if Path(out).exists():
            shutil.rmtree(out)  # as the real run does: overwrite=True replaces the directory
        Path(out).mkdir(parents=True)
        (Path(out) / "results.json").write_text("{}")
        return Res()

    monkeypatch.setattr(pipeline, "run", fake_run)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0  # its own output: replaced
    (out / "notes.md").write_text("my notes")
    rc, err = _main(["demo", "--out", str(out), "--quiet"], capsys)
    assert rc == 2 and "notes.md" in err and "did not write" in err and "--overwrite" in err
    assert (out / "notes.md").read_text() == "my notes"
    (out / cli.DEMO_MARKER).write_text("written by `tl-transplant demo` (an older version)\n")
    rc, err = _main(["demo", "--out", str(out), "--quiet"], capsys)  # older marker, no list
    assert rc == 2 and "notes.md" in err and (out / "notes.md").is_file()


def test_sweep_save_into_an_earlier_run_does_not_mix_two_runs(
    pair: ModelPair, task: Task, tmp_path: Path
) -> None:
    from tl_transplant.report.html import save_sweep
    from tl_transplant.scoring import score
    from tl_transplant.sweeps.protocol import sweep
    from tl_transplant.sweeps.search import SweepError

    s = score(pair, task, method="weight_diff", units="head")
    res = sweep(pair, task, s, ks=[1], alphas=[1.0], n_boot=20, progress=False,
                retention_kwargs=None, controls=[])
    d = save_sweep(res, tmp_path / "run", title="first")
    (d / "transplant_manifest.json").write_text("{}")  # as a run leaves it
    (d / "notes.md").write_text("mine")
    with pytest.raises(SweepError, match="overwrite=True") as e:
        res.save(d)
    assert "results.json" in str(e.value) and (d / "report.html").is_file()
    res.save(d, overwrite=True)  # the old run's own files go, the user's stay
    assert sorted(p.name for p in d.iterdir()) == ["notes.md", "results.json", "sweep.csv",
                                                   "sweep.png"]
