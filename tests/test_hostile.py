"""Hostile input (issue 12): nothing lost, no tracebacks.

One regression test per item of the issue, a Hypothesis fuzz test over unit
strings and CLI argument lists, and a kill test (SIGKILL / SIGTERM / SIGINT
during an export in a subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tl_transplant import cli
from tl_transplant.arch.units import UnitError, parse_kinds_or_units, parse_units
from tl_transplant.edit.edits import TransplantError, apply_transplant, plan_transplant, transplant
from tl_transplant.edit.manifest import MANIFEST_NAME, ManifestError, read_manifest
from tl_transplant.errors import ModelLoadError, NonFiniteWeightsError
from tl_transplant.io.export import ExportError, export_hf, prepare_out_dir
from tl_transplant.io.out_of_core import OutOfCoreError, apply_manifest_out_of_core
from tl_transplant.models.pair import ModelPair
from tl_transplant.models.side import ModelSide
from tl_transplant.testing import restore_target, same_state, snapshot_side

ZOO = Path(__file__).resolve().parents[1] / "tl_transplant" / "zoo" / "pairs" / "cross_generation"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


# ---- fixtures: one tiny pair per session (copies of the zoo pair), reset between tests -----


@pytest.fixture(scope="session")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return (Path(shutil.copytree(ZOO / "gen2", root / "source")),
            Path(shutil.copytree(ZOO / "gen1", root / "target")))


@pytest.fixture(scope="session")
def _pair(dirs: tuple[Path, Path]) -> tuple[ModelPair, dict[str, torch.Tensor]]:
    pair = ModelPair.load(str(dirs[0]), str(dirs[1]))
    return pair, snapshot_side(pair.target)


@pytest.fixture
def pair(_pair: tuple[ModelPair, dict[str, torch.Tensor]]) -> ModelPair:
    """The session pair with the target's original weights and no transplant records."""
    return restore_target(*_pair)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI; returns (exit status, stderr). argparse exits count as their status."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail the test: proves a refusal comes before loading."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelPair, "load", boom)


Q0 = "model.layers.0.self_attn.q_proj.weight"


# ---- 1. transplant contexts ---------------------------------------------------------------


def test_apply_transplant_inside_context_is_refused(pair: ModelPair) -> None:
    before = snapshot_side(pair.target)
    with transplant(pair, "L0.H0", 0.5):
        with pytest.raises(TransplantError, match="inside an active transplant"):
            apply_transplant(pair, "L1.H1", 1.0)
    assert same_state(snapshot_side(pair.target), before) and not pair.applied


def test_non_lifo_restore_is_refused_and_lifo_is_exact(pair: ModelPair) -> None:
    before = snapshot_side(pair.target)
    t1 = transplant(pair, ["L0.H0", "L0.N3"], 0.5).apply()
    t2 = transplant(pair, ["L0.H0", "L1.H2"], 1.0).apply()  # overlaps t1
    with pytest.raises(TransplantError, match="reverse order"):
        t1.restore()
    t2.restore()
    t1.restore()
    assert same_state(snapshot_side(pair.target), before) and not pair.active


# ---- 5. the same units twice --------------------------------------------------------------


def test_twice_on_same_units_warns_and_records(pair: ModelPair, tmp_path: Path) -> None:
    t0 = pair.target.params[Q0].detach().clone()
    s = pair.source.params[Q0].detach()
    apply_transplant(pair, "L0.H0", 0.5)
    with pytest.warns(UserWarning, match="compound"):
        m2 = apply_transplant(pair, "L0.H0", 0.5)
    assert m2.extra["compounds_with"] == [
        {"transplant": 0, "units": ["L0.H0", "L0.KV0"], "alpha": 0.5}
    ]
    dh = pair.layout.dims.dh
    want = t0[:dh] + 0.75 * (s[:dh] - t0[:dh])  # two alpha=0.5 blends compound to 0.75
    assert torch.allclose(pair.target.params[Q0][:dh], want, atol=1e-6)
    doc = json.loads((export_hf(pair, tmp_path / "o") / MANIFEST_NAME).read_text())
    assert len(doc["transplants"]) == 2
    assert doc["transplants"][1]["extra"]["compounds_with"][0]["transplant"] == 0


# ---- 2. an output that is, or contains, an input -------------------------------------------


def test_export_refuses_out_that_is_or_contains_an_input(
    pair: ModelPair, dirs: tuple[Path, Path]
) -> None:
    src, tgt = dirs
    files = sorted(p.name for p in tgt.iterdir())
    for out in (tgt, src, tgt.parent):
        with pytest.raises(ExportError, match="input"):
            export_hf(pair, out, overwrite=True)
    assert sorted(p.name for p in tgt.iterdir()) == files and (src / "model.safetensors").is_file()


def _run_dir(tmp_path: Path, dirs: tuple[Path, Path]) -> Path:
    """A folder holding a valid run config and its task files."""
    d = tmp_path / "proj"
    d.mkdir()
    from tl_transplant import zoo

    paths = zoo.task_paths("cross_generation")
    shutil.copy(paths["task"].dev, d / "dev.jsonl")
    shutil.copy(paths["task"].test, d / "test.jsonl")
    cfg = {"source": str(dirs[0]), "target": str(dirs[1]),
           "task": {"path": "dev.jsonl", "test_path": "test.jsonl", "prepend_bos": True},
           "selection": {"methods": ["weight_diff"], "units": ["head"]},
           "sweep": {"k": [1], "alpha": [1.0]}}
    (d / "config.yaml").write_text(json.dumps(cfg))
    return d


def test_run_refuses_out_holding_config_and_tasks(
    tmp_path: Path, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = _run_dir(tmp_path, dirs)
    _no_load(monkeypatch)
    for out in (d, tmp_path):
        rc, err = _main(["run", str(d / "config.yaml"), "--out", str(out), "--overwrite"],
                        capsys)
        assert rc == 2 and "error:" in err and "input" in err, err
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "dev.jsonl", "test.jsonl"]


# ---- 3. demo --out a user directory --------------------------------------------------------


def test_demo_refuses_a_user_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tl_transplant.pipeline.runner as pipeline

    calls: list[Path] = []

    class Res:
        def table(self) -> str:
            return "table"

    def fake_run(cfg: Any, out: Any, **kw: Any) -> Res:
        assert kw["overwrite"] is True
        Path(out).mkdir(parents=True, exist_ok=True)
        calls.append(Path(out))
        return Res()

    monkeypatch.setattr(pipeline, "run", fake_run)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    rc, err = _main(["demo", "--out", str(user), "--quiet"], capsys)
    assert rc == 2 and "not a previous demo output" in err and "--overwrite" in err
    assert (user / "thesis.tex").read_text() == "years of work" and not calls
    rc, _ = _main(["demo", "--out", str(user), "--quiet", "--overwrite"], capsys)
    assert rc == 0 and calls == [user] and (user / cli.DEMO_MARKER).is_file()
    rc, _ = _main(["demo", "--out", str(user), "--quiet"], capsys)  # its own output: fine
    assert rc == 0 and len(calls) == 2


def test_demo_lists_only_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--no-export`` must not claim a model/ directory (it used to)."""
    import tl_transplant.pipeline.runner as pipeline

    seen: dict[str, Any] = {}

    class Res:
        def table(self) -> str:
            return "table"

    def fake_run(cfg: Any, out: Any, **kw: Any) -> Res:
        seen["export"] = cfg["export"]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text("{}")
        if cfg["export"]:
            (Path(out) / "model").mkdir()
        return Res()

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert cli.main(["demo", "--out", str(tmp_path / "a"), "--quiet", "--no-export"]) == 0
    out = capsys.readouterr().out
    assert seen["export"] is False and "results.json" in out and "model/" not in out, out
    assert cli.main(["demo", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert seen["export"] is True and "model/" in out and "embedded tiny pair" in out, out


# ---- 4. out-of-core apply: alpha and hashes ------------------------------------------------


@pytest.fixture
def exported(pair: ModelPair, tmp_path: Path) -> Path:
    apply_transplant(pair, ["L0.H1", "L1.N5"], 0.5)
    return export_hf(pair, tmp_path / "mem")


def _doc(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("alpha", [5.0, -0.5])
def test_apply_refuses_alpha_outside_unit_interval(
    exported: Path, dirs: tuple[Path, Path], tmp_path: Path, alpha: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = _doc(exported)
    doc["transplants"][0]["alpha"] = alpha
    doc["transplants"][0]["tensors"] = []  # no hashes to compare: the alpha alone decides
    man = tmp_path / "m.json"
    man.write_text(json.dumps(doc))
    with pytest.raises(OutOfCoreError, match="allow_extrapolation"):
        apply_manifest_out_of_core(dirs[0], dirs[1], man, tmp_path / "o")
    argv = ["apply", "--source", str(dirs[0]), "--target", str(dirs[1]), "--manifest", str(man),
            "--out", str(tmp_path / "o")]
    rc, err = _main(argv, capsys)
    assert rc == 2 and "--allow-extrapolation" in err and not (tmp_path / "o").exists()
    rc, _ = _main([*argv, "--allow-extrapolation"], capsys)
    assert rc == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_apply_hash_mismatch_is_an_error_by_default(
    exported: Path, dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc(exported)
    doc["transplants"][0]["tensors"][0]["sha256"] = "0" * 64  # tampered
    man = tmp_path / "m.json"
    man.write_text(json.dumps(doc))
    argv = ["apply", "--source", str(dirs[0]), "--target", str(dirs[1]), "--manifest", str(man),
            "--out", str(tmp_path / "o")]
    rc, err = _main(argv, capsys)
    assert rc == 2 and "--allow-hash-mismatch" in err and not (tmp_path / "o").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _ = _main([*argv, "--allow-hash-mismatch"], capsys)
    assert rc == 0 and (tmp_path / "o").is_dir()
    rc, _ = _main([*argv[:-1], str(tmp_path / "o2")], capsys)  # the untampered one still works
    assert rc == 2  # (same tampered manifest, default strict)


def test_apply_refuses_out_containing_an_input(
    exported: Path, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["apply", "--source", str(dirs[0]), "--target", str(dirs[1]), "--manifest",
            str(exported), "--out", str(dirs[1].parent), "--overwrite"]
    rc, err = _main(argv, capsys)
    assert rc == 2 and "contains" in err and (dirs[1] / "model.safetensors").is_file()


# ---- 6. stale temporary siblings -----------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{os.getpid()}-4567abcd"
    other = tmp_path / f".other.tmp-{_dead_pid()}-89abcdef"
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    with pytest.warns(UserWarning, match="removed stale temporary directory"):
        _, tmp = prepare_out_dir(out, False)
    assert not dead.exists() and live.exists() and other.exists()
    assert f"-{os.getpid()}-" in tmp.name
    shutil.rmtree(tmp)


def test_cli_says_it_removed_a_stale_temp(
    pair: ModelPair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ModelPair, "load", lambda *a, **k: pair)
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    dead.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # what Python's default showwarning does (pytest replaces it to record warnings)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        rc, err = _main(["export", "--source", "s", "--target", "t", "--units", "L0.H0",
                         "--out", str(tmp_path / "out")], capsys)
    assert rc == 0 and not dead.exists()
    assert f"tl-transplant export: warning: removed stale temporary directory {dead}" in err


# ---- tracebacks -> one-line errors ---------------------------------------------------------


def test_corrupt_safetensors_is_a_clean_error(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = Path(shutil.copytree(dirs[1], tmp_path / "bad"))
    data = (dirs[1] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        ModelSide.load(str(bad))
    rc, err = _main(["export", "--source", str(dirs[0]), "--target", str(bad), "--units",
                     "L0.H0", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "error:" in err


def test_out_below_a_file_or_unwritable(
    pair: ModelPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_hf(pair, tmp_path / "f" / "out")

    def denied(self: Path, *a: Any, **k: Any) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ExportError, match="Permission denied.*writable"):
        export_hf(pair, tmp_path / "ro" / "out")


# ---- the user-error boundary: ours -> one line, anything else -> a bug report --------------


def test_boundary_our_errors_are_one_line_anything_else_is_a_bug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly tl_transplant's errors (TLTransplantError) are user errors. A KeyError,
    ValueError or OSError from anywhere else is a bug: its traceback and a request for a
    report, status 1; never a one-line "missing key"."""

    def ours(args: Any) -> int:
        raise ModelLoadError("source: no model at 'x'; check the path\n(more detail)")

    monkeypatch.setattr(cli, "cmd_pairs", ours)
    rc, err = _main(["pairs"], capsys)
    assert (rc, err) == (2, "tl-transplant pairs: error: source: no model at 'x'; check the path\n")
    for exc in (KeyError("layers"), ValueError("bad shape"), OSError(5, "I/O error", "x")):

        def bug(args: Any, exc: Exception = exc) -> int:
            raise exc

        monkeypatch.setattr(cli, "cmd_pairs", bug)
        rc, err = _main(["pairs"], capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and lines[0] == "Traceback (most recent call last):", err
        assert lines[-2].startswith(type(exc).__name__) and "missing key" not in err
        assert lines[-1] == (f"tl-transplant pairs: internal error ({type(exc).__name__}): "
                             f"{cli.BUG_LINE}")


def test_third_party_user_errors_become_ours_where_raised(
    pair: ModelPair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreadable path, a corrupt file, a folder under a file: converted to our errors
    where they are raised (not matched by name in the CLI), so the CLI prints one line."""
    from tl_transplant.errors import InputError, OutputError
    from tl_transplant.scoring import ScoringError
    from tl_transplant.scoring.scores import Scores
    from tl_transplant.scoring.weight_scores import WeightScores

    monkeypatch.setattr(ModelPair, "load", lambda *a, **k: pair)
    base = ["score", "--source", "s", "--target", "t", "--method", "weight_diff", "--quiet"]
    rc, err = _main([*base, "--task", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "s.json")], capsys)  # FileNotFoundError
    assert rc == 2 and err.count("\n") == 1 and "none.jsonl" in err, err
    (tmp_path / "f").write_text("x")
    task = ZOO.parents[1] / "tasks" / "cross_generation_task_dev.jsonl"
    rc, err = _main([*base, "--task", str(task), "--out", str(tmp_path / "f" / "s.json")],
                    capsys)  # NotADirectoryError / FileExistsError
    assert rc == 2 and err.count("\n") == 1 and "choose a path you can write to" in err, err
    assert issubclass(InputError, ValueError) and issubclass(OutputError, OSError)
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # safetensors' SafetensorError
    with pytest.raises(ScoringError, match="corrupt or truncated"):
        WeightScores.load(bad)
    (tmp_path / "s.json").write_text("{")  # json's JSONDecodeError
    with pytest.raises(ScoringError, match="cannot read scores"):
        Scores.load(tmp_path / "s.json")
    with pytest.raises(ScoringError, match="cannot read scores"):
        Scores.load(tmp_path / "missing.json")  # FileNotFoundError


def test_ctrl_c_during_export(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, pair: ModelPair,
) -> None:
    import tl_transplant.io.export as export

    monkeypatch.setattr(ModelPair, "load", lambda *a, **k: pair)

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_safetensors", interrupted)
    rc, err = _main(["export", "--source", str(dirs[0]), "--target", str(dirs[1]), "--units",
                     "L0.H0", "--out", str(tmp_path / "o")], capsys)
    assert rc == 130 and "interrupted; nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_score_units_blames_the_bad_item(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_load(monkeypatch)
    rc, err = _main(["score", "--source", "s", "--target", "t", "--task", "x.jsonl", "--units",
                     "heads,bogus", "--out", str(tmp_path / "s.json")], capsys)
    assert rc == 2 and "'bogus'" in err and "'heads'" not in err


def test_score_options_checked_before_any_model_loads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_load(monkeypatch)
    base = ["score", "--source", "s", "--target", "t", "--task", "x.jsonl",
            "--out", str(tmp_path / "s.json"), "--method", "attribution_ig"]
    rc, err = _main([*base, "--option", "stepz=3"], capsys)
    assert rc == 2 and "does not take option(s) 'stepz'" in err and "steps" in err, err
    rc, err = _main([*base, "--option", "steps=0"], capsys)
    assert rc == 2 and "option steps=0 is invalid" in err, err
    rc, err = _main([*base, "--option", "steps"], capsys)
    assert rc == 2 and "KEY=VALUE" in err, err
    assert list(tmp_path.iterdir()) == []


def test_score_negative_top_refused_before_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_load(monkeypatch)
    rc, err = _main(["score", "--source", "s", "--target", "t", "--task", "x.jsonl", "--top",
                     "-5", "--out", str(tmp_path / "s.json")], capsys)
    assert rc == 2 and "--top" in err and list(tmp_path.iterdir()) == []


def test_export_bad_shard_size(pair: ModelPair, tmp_path: Path) -> None:
    for bad in ("lots", 0, -3, True, 1.5):
        with pytest.raises(ExportError, match="max_shard_size"):
            export_hf(pair, tmp_path / "o", max_shard_size=bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    assert (export_hf(pair, tmp_path / "o", max_shard_size="200KB") / "model.safetensors.index.json"
            ).is_file()


# ---- refused before any model loads --------------------------------------------------------


def test_empty_unit_list_refused(
    pair: ModelPair, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for empty in ([], "", " , "):
        with pytest.raises(TransplantError, match="no units"):
            plan_transplant(pair, empty)
    with pytest.raises(ManifestError, match="names no units"):
        read_manifest({"format": "tl_transplant.edit.manifest/1", "units": [], "alpha": 1.0})
    _no_load(monkeypatch)
    rc, err = _main(["export", "--source", "s", "--target", "t", "--units", ",", "--out",
                     str(tmp_path / "o")], capsys)
    assert rc == 2 and "--units is empty" in err and not (tmp_path / "o").exists()


def test_manifest_without_units_refused_by_apply(
    exported: Path, dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc(exported)
    doc["transplants"][0]["units"] = []
    doc["transplants"][0]["kv_added"] = []
    (tmp_path / "m.json").write_text(json.dumps(doc))
    rc, err = _main(["apply", "--source", str(dirs[0]), "--target", str(dirs[1]), "--manifest",
                     str(tmp_path / "m.json"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "names no units" in err and not (tmp_path / "o").exists()


# ---- consistency ---------------------------------------------------------------------------


def test_in_memory_loader_refuses_pickles_unless_asked(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    pk = tmp_path / "pk"
    pk.mkdir()
    for f in dirs[1].iterdir():
        if f.suffix == ".json":
            shutil.copy(f, pk / f.name)
    torch.save(load_file(str(dirs[1] / "model.safetensors")), pk / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle=True.*--allow-pickle"):
        ModelSide.load(str(pk), use_safetensors=True)
    with pytest.warns(UserWarning, match="pickles"):
        side = ModelSide.load(str(pk), allow_pickle=True)
    assert side.params[Q0].shape[0] > 0


def test_nan_in_embeddings_refused_with_the_cli_flag(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = Path(shutil.copytree(dirs[1], tmp_path / "nan"))
    state = load_file(str(nan / "model.safetensors"))
    state["model.embed_tokens.weight"][3, 5] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match="embed_tokens.*--no-check-finite"):
        ModelSide.load(str(nan))
    assert ModelSide.load(str(nan), check_finite=False).params
    argv = ["export", "--source", str(dirs[0]), "--target", str(nan), "--units", "L0.H0"]
    rc, err = _main([*argv, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--no-check-finite" in err
    rc, err = _main([*argv, "--out", str(tmp_path / "o"), "--no-check-finite"], capsys)
    assert rc == 0, err


def test_cli_has_the_flags_its_errors_suggest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    pair: ModelPair,
) -> None:
    seen: dict[str, Any] = {}

    def load(*a: Any, **k: Any) -> ModelPair:
        seen.update(k)
        return pair

    monkeypatch.setattr(ModelPair, "load", load)
    rc, err = _main(["export", "--source", "s", "--target", "t", "--units", "L0.H0", "--alpha",
                     "1.5", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--allow-extrapolation" in err and not seen
    rc, err = _main(["export", "--source", "s", "--target", "t", "--units", "L0.H0", "--alpha",
                     "1.5", "--allow-extrapolation", "--no-check-tokenizer", "--no-check-finite",
                     "--allow-pickle", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert seen["check_tokenizer"] is False and seen["check_finite"] is False
    assert seen["allow_pickle"] is True
    for sub in ("run", "score", "export"):
        help_text = cli.build_parser()._subparsers._group_actions[0].choices[sub].format_help()
        assert "--no-check-tokenizer" in help_text and "--no-check-finite" in help_text


# ---- fuzz: unit strings and CLI argument lists ---------------------------------------------

_TOKENS = st.sampled_from(["L0.H0", "L1.N3", "L0.KV1", "L2.mlp.down_proj", "L0.attn.q_proj",
                           "L99.H0", "L0.H99", "L0.N9999", "L0.KV7", "L0.mlp.nope", "heads",
                           "head", "neuron", "kv", "linear", "bogus", "", " ", "L-1.H0", "L0.H",
                           "l0.h0", "L0.H0.", "L0..H0", "L0.H00", "\x00", "é", "L1e3.H0"])
_UNIT_TEXT = st.one_of(st.lists(_TOKENS, max_size=5).map(",".join), st.text(max_size=30))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_UNIT_TEXT)
def test_fuzz_unit_strings(_pair: tuple[ModelPair, Any], text: str) -> None:
    pair = _pair[0]
    for parse in (parse_units, parse_kinds_or_units):
        try:
            parse(text)
        except UnitError as e:
            assert str(e)
    try:
        plan_transplant(pair, text)
    except (UnitError, TransplantError) as e:
        assert str(e).strip()


_FLAG_VALUES = st.sampled_from(["--units", "--alpha", "--top", "--batch-size", "--device",
                                "--kv", "--method", "--metric", "--prepend-bos",
                                "--overwrite", "--allow-extrapolation", "--quiet", "--bogus"])
_VALUES = st.one_of(_TOKENS, st.sampled_from(["-5", "0", "1", "nan", "inf", "1e309", "0.5",
                                               "gpu", "cuda:7", "cpu", "group", "none", "true",
                                               "--", "-"]), st.text(max_size=8))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cmd=st.sampled_from(["score", "export", "apply", "run", "demo", "pairs", "nope"]),
       rest=st.lists(st.tuples(_FLAG_VALUES, _VALUES), max_size=4))
def test_fuzz_cli_arguments(
    cmd: str, rest: list[tuple[str, str]], _pair: tuple[ModelPair, Any], dirs: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pair, snap = _pair
    out = tmp_path_factory.mktemp("fuzz") / "o"
    base = {"score": ["--task", str(dirs[0] / "nope.jsonl")],
            "export": ["--units", "L0.H0"],
            "apply": ["--manifest", str(out.parent / "none.json")],
            "run": [str(out.parent / "none.yaml")],
            "demo": ["--pair", "nope"]}.get(cmd, [])
    models = ["--source", str(dirs[0]), "--target", str(dirs[1])] if cmd in (
        "score", "export", "apply") else []
    argv = [cmd, *models, *base, *(x for pair_ in rest for x in pair_)]
    if "--out" not in argv and cmd != "pairs":
        argv += ["--out", str(out)]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(out.parent)  # a stray relative path lands in the fuzz folder
    orig = ModelPair.load
    ModelPair.load = classmethod(lambda cls, *a, **k: pair)  # type: ignore[method-assign]
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(argv)
            except SystemExit as e:
                rc = int(e.code or 0)
    finally:
        ModelPair.load = orig  # type: ignore[method-assign]
        os.chdir(cwd)
        restore_target(pair, snap)
    text = err.getvalue()
    assert "Traceback" not in text
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        assert "error:" in text or "usage:" in text, (argv, text)


# ---- kill test: a real export in a subprocess ----------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama of ~130 MB (fp32): its export takes long enough to interrupt mid-write."""
    from tl_transplant.testing import save_tiny, tiny_model, word_tokenizer

    root = tmp_path_factory.mktemp("big")
    model = tiny_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    return save_tiny(model, word_tokenizer(root / "tok"), root / "model")


# The child's tensor writes wait 10 s first, so a signal sent once the temporary directory
# exists lands mid-write even on a loaded machine (a bare 130 MB write can finish before the
# signal does; the signal interrupts the wait, so the tests do not take 10 s more).
_SLOW_WRITES = (
    # a shell that starts the suite in the background makes its children ignore SIGINT;
    # give the child a terminal's Ctrl-C, as a user at a prompt has
    "import signal\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "import sys, time, safetensors.torch as st\n"
    "save = st.save_file\n"
    "def slow(*a, **k):\n"
    "    time.sleep(10)\n"
    "    return save(*a, **k)\n"
    "st.save_file = slow\n"
    "from tl_transplant.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _start_export(big: Path, out: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", _SLOW_WRITES, "export", "--source", str(big),
            "--target", str(big), "--units", "L0.H0", "--out", str(out)]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_tmp(proc: subprocess.Popen[str], out: Path, timeout: float = 240) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmps = [p for p in out.parent.glob(f".{out.name}.tmp-*")]
        if tmps:
            return tmps[0]
        if proc.poll() is not None:
            raise AssertionError(f"export ended before it could be interrupted: "
                                 f"{proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the export never started writing")


@pytest.mark.slow
def test_kill_during_export_then_next_export_cleans_up(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_export(big, out)
    tmp = _wait_for_tmp(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and tmp.exists()  # SIGKILL cannot be caught: the temp stays
    side = ModelSide.load(str(big))
    with pytest.warns(UserWarning, match=f"removed stale temporary directory .*{tmp.name}"):
        export_hf(side, out)
    assert not tmp.exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "rc", "says"), [(signal.SIGTERM, 143, "terminated"),
                                                 (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_during_export_clean_up(
    big: Path, tmp_path: Path, sig: int, rc: int, says: str
) -> None:
    out = tmp_path / "out"
    proc = _start_export(big, out)
    _wait_for_tmp(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert f"{says}; nothing written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_apply_and_ctrl_c_during_run_leave_nothing(
    exported: Path, dirs: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process: the CLI turns SIGTERM into an exception, so each command's cleanup runs."""
    import tl_transplant.io.out_of_core as ooc

    def terminated(*a: Any, **k: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the CLI's handler
        time.sleep(1)
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr(ooc, "write_safetensors_shards", terminated)
    work = tmp_path / "w"
    work.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    rc, err = _main(["apply", "--source", str(dirs[0]), "--target", str(dirs[1]), "--manifest",
                     str(exported), "--out", str(work / "o")], capsys)
    assert rc == 143 and "terminated; nothing written" in err and list(work.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was put back

    d = _run_dir(tmp_path, dirs)

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelPair, "load", interrupted)
    rc, err = _main(["run", str(d / "config.yaml"), "--out", str(work / "r")], capsys)
    assert rc == 130 and "interrupted; nothing written" in err and list(work.iterdir()) == []
