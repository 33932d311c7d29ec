"""Hostile input, second probe (issue 22, item 3): nothing lost, no tracebacks, nothing
silently accepted.

One regression test per probe finding, in the order of the issue: data lost,
tracebacks, silently accepted.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
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
from tl_transplant.testing import restore_target, snapshot_side

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
    return restore_target(*_pair)


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


# ---- tracebacks become our errors ------------------------------------------------------------


def _tiny_gguf(path: Path, *, embed_cols: int) -> Path:
    """A one-layer llama GGUF (8-wide); ``embed_cols != 8`` contradicts its own metadata."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    d, ff, v = 8, 16, 12
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([chr(97 + i) for i in range(v)])
    w.add_token_types([1] * v)
    w.add_token_scores([0.0] * v)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (v, embed_cols), "output_norm.weight": (d,),
              "output.weight": (v, d), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.ffn_gate.weight": (ff, d),
              "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff),
              **{f"blk.0.{n}.weight": (d, d) for n in ("attn_q", "attn_k", "attn_v",
                                                       "attn_output")}}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_whose_shapes_contradict_its_metadata(
    tmp_path: Path, task: Task, capsys: pytest.CaptureFixture[str]
) -> None:
    from tl_transplant.errors import ModelLoadError
    from tl_transplant.models.gguf import load_gguf

    good = _tiny_gguf(tmp_path / "good.gguf", embed_cols=8)
    assert load_gguf(good)[0].config.hidden_size == 8  # the writer itself is sound
    bad = _tiny_gguf(tmp_path / "bad.gguf", embed_cols=11)
    with pytest.raises(ModelLoadError, match="contradict its own metadata.*Re-convert"):
        ModelPair.load(str(bad), str(bad))
    t = tmp_path / "t.jsonl"
    t.write_text("".join(json.dumps(r) + "\n" for r in task.to_records()))
    rc, err = _main(["score", "--source", str(bad), "--target", str(bad), "--task", str(t),
                     "--out", str(tmp_path / "s.json"), "--quiet"], capsys)
    assert rc == 2 and "contradict" in err and "Traceback" not in err, err


def test_attribution_ig_steps_are_capped(
    pair: ModelPair, task: Task, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tl_transplant.scoring import score
    from tl_transplant.scoring.attribution_ig import MAX_STEPS
    from tl_transplant.scoring.registry import ScoringError

    with pytest.raises(ScoringError, match=f"steps=1000000000 is invalid.*at most {MAX_STEPS}"):
        score(pair, task, method="attribution_ig", steps=10**9)
    monkeypatch.setattr(ModelPair, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    rc, err = _main(["score", "--source", "s", "--target", "t", "--task", "x.jsonl",
                     "--method", "attribution_ig", "--option", "steps=1000000000"], capsys)
    assert rc == 2 and f"at most {MAX_STEPS}" in err, err
    assert score(pair, task.subset(range(4)), method="attribution_ig", steps=MAX_STEPS // 500,
                 progress=False).meta["steps"] == 2


def test_yaml_alias_bomb_is_refused_before_it_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tl_transplant.pipeline.config import MAX_YAML_NODES, ConfigError, load_config

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 700
    rc, err = _main(["run", str(bomb), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "aliases" in err and f"{MAX_YAML_NODES:,}" in err, err
    assert not (tmp_path / "o").exists()
    # The formatter never builds the full repr of a huge (shared) value.
    x: list[Any] = ["lol"] * 9
    for _ in range(9):
        x = [x] * 9
    with pytest.raises(ConfigError) as e:
        load_config({"source": "s", "target": "t", "task": {"path": "x.jsonl"},
                     "sweep": {"alpha": x}})
    msg = str(e.value)
    assert "sweep.alpha" in msg and len(msg) < 2000, msg[:300]
    small = tmp_path / "small.yaml"  # aliases within the limit still work
    small.write_text("a: &a [1, 2]\nsource: s\ntarget: t\ntask: {path: x.jsonl}\n"
                     "sweep: {alpha: [0.5, 1.0]}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(small)  # 'a' is not a config key: validation ran on the built document


@pytest.mark.parametrize(("key", "value", "says"), [
    ("target", "x", "target must be an object"),
    ("tensors", "x", "tensors must be a list"),
    ("tensors", [{"name": "model.embed_tokens.weight", "shape": 7}], "shape must be a list"),
    ("tensors", ["x"], r"tensors\[0\] must be an object"),
    ("kv_added", [3], "kv_added must be a list of unit strings"),
    ("n_params_moved", "12", "n_params_moved must be an integer"),
    ("alpah", 0.5, "unknown key"),
])
def test_manifest_records_of_wrong_types(
    pair: ModelPair, dirs: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], key: str, value: Any, says: str,
) -> None:
    from tl_transplant.edit.edits import apply_transplant
    from tl_transplant.edit.manifest import ManifestError, read_manifest

    m = apply_transplant(pair, ["L0.H1"], 0.5)
    rec = {**m.to_dict(), key: value}
    with pytest.raises(ManifestError, match=says):
        read_manifest({"transplants": [rec]})
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"transplants": [rec]}))
    rc, err = _main(["apply", "--source", str(dirs[0]), "--target", str(dirs[1]),
                     "--manifest", str(f), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and says.replace("\\", "") in err and "Traceback" not in err, err


def test_manifest_with_an_unknown_top_level_key_is_refused(pair: ModelPair) -> None:
    from tl_transplant.edit.edits import apply_transplant
    from tl_transplant.edit.manifest import ManifestError, read_manifest

    rec = apply_transplant(pair, ["L0.H1"], 0.5).to_dict()
    with pytest.raises(ManifestError, match="unknown top-level key.*'alpha'.*transplants"):
        read_manifest({"transplants": [rec], "alpha": 1.0})
    assert read_manifest({"transplants": [rec], "note": "free text"}).transplants[0]["alpha"] \
        == 0.5


def test_malicious_pickle_with_allow_pickle_is_not_a_checkpoint(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from tl_transplant.errors import ModelLoadError
    from tl_transplant.io.checkpoint import Checkpoint, CheckpointError
    from tl_transplant.models.side import ModelSide

    flag = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (flag,))

    pk = tmp_path / "pk"
    pk.mkdir()
    for f in dirs[1].iterdir():
        if f.suffix == ".json":
            shutil.copy(f, pk / f.name)
    torch.save({"model.embed_tokens.weight": Evil()}, pk / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelLoadError, match="not a loadable checkpoint.*nothing in them"):
            ModelSide.load(str(pk), allow_pickle=True)
        with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
            Checkpoint.open(pk, "target", allow_pickle=True)
    assert not flag.exists()


def test_api_load_checks_the_device_before_loading(dirs: tuple[Path, Path]) -> None:
    from tl_transplant.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown device 'gpu'.*'cuda:N'"):
        ModelPair.load(str(dirs[0]), str(dirs[1]), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available.*device='cpu'"):
            ModelPair.load(str(dirs[0]), str(dirs[1]), device="cuda:0")


# ---- silently accepted -----------------------------------------------------------------------


def test_duplicated_choices_are_named(tmp_path: Path) -> None:
    from tl_transplant.errors import TaskError

    with pytest.raises(TaskError, match=r"choice\(s\) ' b' appear more than once"):
        Task("t", ["q a", "q b"], [" a", " b"], metric="mc_logprob",
             choices=[[" a", " b"], [" b", " c", " b"]])
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"prompt": "q", "answer": " a", "choices": [" a", " a"]}) + "\n")
    with pytest.raises(TaskError, match="appear more than once"):
        Task.from_dataset(str(f), metric="mc_logprob", choices_field="choices")


def test_next_token_acc_warns_once_on_multi_token_answers(pair: ModelPair, task: Task) -> None:
    from tl_transplant.evaluation.evaluator import evaluate

    multi = Task("probe_multi", task.prompts[:6], [a + " n1" for a in task.answers[:6]],
                 prepend_bos=True)
    with pytest.warns(UserWarning, match="scores only the first token.*6 of 6") as got:
        first = evaluate(pair.target, multi, progress=False)
        evaluate(pair.target, multi, progress=False)  # a sweep evaluates many times: once
    assert sum("first token" in str(w.message) for w in got) == 1
    single = Task("probe_single", task.prompts[:6], task.answers[:6], prepend_bos=True)
    with warnings_as_errors():
        assert evaluate(pair.target, single, progress=False).mean == first.mean


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    """No UserWarning may be raised inside (the negative half of a warning test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def test_prompts_in_both_dev_and_test_warn(task: Task) -> None:
    from tl_transplant.sweeps.search import split_task

    dup = Task("dup", [*task.prompts[:10], task.prompts[0]] * 2,
               [*task.answers[:10], task.answers[0]] * 2, prepend_bos=True)
    with pytest.warns(UserWarning, match="prompt.*in both dev and test"):
        dup.split(0.5, 0)
    a, b = task.subset(range(0, 10)), task.subset(range(5, 15))  # overlapping files
    with pytest.warns(UserWarning, match="5 prompt.*in both dev and test.*Remove"):
        split_task((a, b), 0.5, 0, "task")
    with warnings_as_errors():
        task.split(0.5, 0)  # the zoo task has no duplicates: no warning


def test_manifest_without_hashes_compounds_out_of_core_with_a_warning(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from tl_transplant.edit.manifest import MANIFEST_FORMAT, MANIFEST_NAME
    from tl_transplant.io.out_of_core import apply_manifest_out_of_core

    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"transplants": [
        {"format": MANIFEST_FORMAT, "units": ["L0.H1"], "alpha": 0.5}]}))
    once = apply_manifest_out_of_core(dirs[0], dirs[1], hand, tmp_path / "once")
    with pytest.warns(UserWarning, match=r"already holds from its own transplant #0 "
                      r"\(unit L0.H1, alpha=0.5\); the blends compound"):
        twice = apply_manifest_out_of_core(dirs[0], once, hand, tmp_path / "twice")
    rec = json.loads((twice / MANIFEST_NAME).read_text())["transplants"][0]
    assert rec["extra"]["compounds_with"][0]["units"] == ["L0.H1"]


def test_tiny_dev_split_zero_budget_and_k0_are_refused(
    pair: ModelPair, task: Task, dirs: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tl_transplant.scoring import score
    from tl_transplant.sweeps.protocol import sweep
    from tl_transplant.sweeps.search import SweepError

    s = score(pair, task, method="weight_diff", units="head")
    kw: dict[str, Any] = dict(alphas=[1.0], n_boot=20, progress=False, control_tasks=[])
    with pytest.raises(SweepError, match=r"dev split has 1 example.*dev_fraction=0.001"):
        sweep(pair, task, s, ks=[1], dev_fraction=0.001, **kw)
    with pytest.raises(SweepError, match=r"ks=\[0\] sweeps nothing"):
        sweep(pair, task, s, ks=[0], **kw)
    with pytest.raises(SweepError, match=r"nothing to sweep.*budget 1e-09.*smallest unit"):
        sweep(pair, task, s, ks=[], budgets=[1e-9], **kw)
    with pytest.warns(UserWarning, match="chosen on 4 dev examples"):
        sweep(pair, task.subset(range(8)), s, ks=[1], **kw)
    cfg = {"source": str(dirs[0]), "target": str(dirs[1]), "seed": 0,
           "task": {"path": str(tmp_path / "t.jsonl"), "prepend_bos": True,
                    "dev_fraction": 0.001},
           "selection": {"methods": ["weight_diff"], "units": ["head"]},
           "sweep": {"k": [1], "alpha": [1.0]}}
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in task.to_records()))
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    rc, err = _main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"),
                     "--quiet"], capsys)
    assert rc == 2 and "dev split has 1 example" in err and not (tmp_path / "o").exists()


def test_generation_longer_than_the_context_is_refused(pair: ModelPair, task: Task) -> None:
    from tl_transplant.errors import TaskError
    from tl_transplant.evaluation.evaluator import evaluate

    t = Task("gen", task.prompts[:2], task.answers[:2], metric="exact_match",
             max_new_tokens=100000, prepend_bos=True)
    with pytest.raises(TaskError, match=r"100000 to generate\), more than the model's context "
                       r"of 32.*lower max_new_tokens"):
        evaluate(pair.target, t, progress=False)


def test_true_is_not_a_number(pair: ModelPair, task: Task) -> None:
    from tl_transplant.edit.edits import TransplantError, apply_transplant, transplant
    from tl_transplant.edit.patching import PatchError, patch_activations
    from tl_transplant.errors import TaskError
    from tl_transplant.sweeps.protocol import sweep
    from tl_transplant.sweeps.search import SweepError

    with pytest.raises(TaskError, match="max_new_tokens must be a positive int, got True"):
        Task("t", ["a"], ["b"], metric="exact_match", max_new_tokens=True)  # type: ignore[arg-type]
    with pytest.raises(TransplantError, match="alpha must be a number, got True"):
        transplant(pair, ["L0.H1"], True)
    with pytest.raises(TransplantError, match="alpha must be a number, got True"):
        apply_transplant(pair, ["L0.H1"], True)
    with pytest.raises(PatchError, match="alpha must be a number, got True"):
        patch_activations(pair, ["L0.H1"], True)
    with pytest.raises(SweepError, match="each alpha must be a number, got True"):
        sweep(pair, task, ["L0.H1"], ks=[1], alphas=[True], progress=False)
    assert not pair.applied


def test_extract_boxed_is_linear() -> None:
    import time

    from tl_transplant.tasks.extract import extract_boxed, normalize_answer

    cases = {"so \\boxed{\\frac{1}{2}}.": "\\frac{1}{2}", "\\boxed{1} then \\boxed{2": "1",
             "\\boxed{ {{3}} }": "3", "$\\boxed{x\\{y\\}}$": "x\\{y\\}", "no box, 4.": "4",
             "\\fbox{7} and 8": "7"}
    assert {k: extract_boxed(k) for k in cases} == cases
    assert normalize_answer("{\\boxed{1}}") == "{\\boxed{1}}"  # an inner box: kept as it was
    t0 = time.perf_counter()
    assert extract_boxed("\\boxed{" + "{" * 100_000 + "5" + "}" * 100_001) == "5"
    assert extract_boxed("\\boxed{" * 8000) == ""
    assert extract_boxed("{" * 100_000 + "6" + "}" * 100_000) == "6"
    # Quadratic, these took about 20 minutes; linear, well under a second on any machine.
    assert time.perf_counter() - t0 < 30


def test_export_inside_patch_activations_is_refused(pair: ModelPair, tmp_path: Path) -> None:
    from tl_transplant.edit.patching import patch_activations

    with patch_activations(pair, ["L0.H1"]):
        with pytest.raises(ExportError, match="changes no weights.*transplant"):
            export_hf(pair, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
    assert (export_hf(pair, tmp_path / "o") / "model.safetensors").is_file()  # after: fine


def test_unchecked_non_finite_weights_load_with_a_note(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from tl_transplant.models.side import ModelSide

    nan = Path(shutil.copytree(dirs[1], tmp_path / "nan"))
    state = load_file(str(nan / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("inf")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"q_proj.*loaded anyway \(check_finite=False\).*NaN "
                      r"\(Scores.top\(\) skips them\)") as got:
        ModelSide.load(str(nan), check_finite=False)
    assert len([w for w in got if "loaded anyway" in str(w.message)]) == 1
    with warnings_as_errors():
        ModelSide.load(str(dirs[1]), check_finite=False)  # finite: no note
