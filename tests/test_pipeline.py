"""The one-call pipeline, its config validation, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tl_transplant import ConfigError, load_config, run
from tl_transplant.cli import main
from tl_transplant.pipeline.runner import RESULT_KEYS
from tl_transplant.testing import (
    tiny_run_dir,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny llama pair on disk plus task JSONL files."""
    d = tmp_path_factory.mktemp("pipe")
    return tiny_run_dir(d)


def _cfg(d: Path, **over) -> dict:
    cfg = {
        "source": str(d / "source"),
        "target": str(d / "target"),
        "task": {"path": str(d / "task.jsonl"), "prepend_bos": True, "metric": "answer_logprob"},
        "control_tasks": [
            {"path": str(d / "control.jsonl"), "prepend_bos": True, "metric": "answer_logprob"}
        ],
        "selection": {
            "methods": ["weight_diff", "activation_diff"],
            "units": ["head", "neuron"],
            "controls": ["random"],
        },
        "sweep": {"k": [2, 4], "alpha": [0.5, 1.0]},
        "seed": 0,
        "export": True,
    }
    cfg.update(over)
    return cfg


def test_run_writes_everything_and_export_matches(workdir, tmp_path):
    res = run(_cfg(workdir), tmp_path / "out", progress=False, log=lambda *_: None)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert tuple(results) == RESULT_KEYS
    for f in (
        "sweep.csv",
        "sweep.png",
        "sweep.json",
        "scores_weight_diff.json",
        "scores_activation_diff.json",
        "transplant_manifest.json",
        "config.json",
    ):
        assert (out / f).exists(), f
    best = results["best"]
    assert best["method"] in ("weight_diff", "activation_diff") and best["k"] in (2, 4)
    assert results["fraction_units"] == best["k"] / len(res.pair.units(("head", "neuron")))
    assert 0 < results["fraction_params"] < 1
    assert results["fraction_params"] == best["pct_params"] == res.sweep.best.pct_params
    assert list(results).index("fraction_params") < list(results).index("fraction_units")
    assert results["retention_control"]["mode"] == "given" and results["comparison"] is None
    assert set(results["controls"]) == {"random"}
    assert len(results["controls"]["random"]["best_minus_control_ci"]) == 2
    assert results["retention"][0]["drop"] == pytest.approx(
        results["retention"][0]["before"] - results["retention"][0]["after"]
    )
    # The exported model is the transplanted target the run ended with.
    re = AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (
            re(ids).logits - res.pair.target.bridge(ids, return_type="logits")
        ).abs().max() <= 1e-5
    man = json.loads((out / "transplant_manifest.json").read_text())["transplants"][0]
    assert man["units"] == best["units"] and man["alpha"] == best["alpha"]
    assert "baselines" in res.table() and best["method"] in res.table()


def test_run_refuses_non_empty_out(workdir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(
        ValueError, match="not empty; choose a new directory or pass overwrite=True"
    ):
        run(_cfg(workdir), tmp_path / "out", progress=False, log=lambda *_: None)
    assert (tmp_path / "out" / "x").read_text() == "keep"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sweep": {"k": [2], "alpha": [1.5]}}, r"sweep\.alpha: each alpha must be in \[0, 1\]"),
        (
            {"selection": {"methods": ["magic"]}},
            r"selection\.methods: unknown scoring method 'magic'; valid: .*attribution",
        ),
        ({"selection": {"units": ["layer"]}}, r"selection\.units: unknown unit kind 'layer'"),
        ({"sweep": {"k": [0]}}, r"sweep\.k: give a non-empty list of K >= 1"),
        ({"colour": "red"}, r"colour: unknown key"),
        (
            {"task": {"path": "x.jsonl", "metric": "bleu"}},
            r"task\.metric: must be one of next_token_acc",
        ),
    ],
)
def test_config_errors_name_the_key(workdir, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(workdir, **change))


def test_config_missing_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="target: required key is missing"):
        load_config({"source": "a", "task": {"path": "t.jsonl"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_paths_relative_to_file(workdir, tmp_path):
    (tmp_path / "data").mkdir()
    cfg = _cfg(workdir)
    cfg["task"] = {"path": "data/t.jsonl"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert load_config(p).task.path == str(tmp_path / "data" / "t.jsonl")


def test_cli_run_and_errors(workdir, tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(workdir, export=False)))
    assert main(["run", str(p), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "chosen:" in capsys.readouterr().out
    assert not (tmp_path / "o" / "model").exists()
    p.write_text(yaml.safe_dump(_cfg(workdir, sweep={"k": [1], "alpha": [2]})))
    assert main(["run", str(p), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "tl-transplant run: error: invalid config: sweep.alpha"
    )


def test_cli_export_and_score(workdir, tmp_path, capsys):
    assert (
        main(
            [
                "export",
                "--source",
                str(workdir / "source"),
                "--target",
                str(workdir / "target"),
                "--units",
                "L0.H1,L1.N3",
                "--alpha",
                "0.5",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    man = json.loads((tmp_path / "e" / "transplant_manifest.json").read_text())
    assert man["transplants"][0]["units"] == ["L0.H1", "L1.N3"]
    assert (
        main(
            [
                "export",
                "--source",
                str(workdir / "source"),
                "--target",
                str(workdir / "target"),
                "--units",
                "L9.H1",
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 2
    )
    assert "valid layers are 0..1" in capsys.readouterr().err
    assert (
        main(
            [
                "score",
                "--source",
                str(workdir / "source"),
                "--target",
                str(workdir / "target"),
                "--task",
                str(workdir / "task.jsonl"),
                "--method",
                "weight_diff",
                "--out",
                str(tmp_path / "s.json"),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["method"] == "weight_diff"


@pytest.mark.parametrize("cmd", ["demo", "run", "score", "export", "apply", "pairs"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: tl-transplant" in capsys.readouterr().out


def test_run_budgets_compare_and_no_retention(workdir, tmp_path, capsys):
    """Budgets only (--budget, --only-budget), the comparison table, retention: none."""
    from tl_transplant.report.text import COMPARISON_NOTE

    cfg = _cfg(workdir, export=False, control_tasks=[], sweep={"k": [2], "alpha": [1.0]},
               selection={"methods": ["weight_diff"], "units": ["head", "neuron"],
                          "controls": ["random"]})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    argv = ["run", str(p), "--out", str(tmp_path / "o"), "--quiet", "--budget", "0.02,5%",
            "--only-budget", "--compare", "--retention", "none"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"comparison ({COMPARISON_NOTE}):" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    sweep_json = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert sweep_json["config"]["budgets"] == [0.02, 0.05] and sweep_json["config"]["ks"] == []
    assert {r["budget"] for r in sweep_json["rows"]} == {0.02, 0.05}
    assert results["retention_control"]["mode"] == "none" and results["retention"] == []
    cells = results["comparison"]["cells"]
    assert results["comparison"]["note"] == COMPARISON_NOTE
    assert {c["size"] for c in cells} == {"budget 2%", "budget 5%"}
    assert all(0 < c["pct_params"] <= c["budget"] and c["test_metric"] is not None
               for c in cells)
    best = results["best"]
    assert best["budget"] in (0.02, 0.05) and 0 < best["pct_params"] <= best["budget"]
    # The random control is drawn at the same parameter budget, not at the same K.
    rnd = results["controls"]["random"]
    assert 0 < rnd["pct_params"] <= best["budget"]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Comparison: method × budget" in html and COMPARISON_NOTE in html
    fresh = ["run", str(p), "--out", str(tmp_path / "o2"), "--quiet"]
    with pytest.raises(SystemExit):  # argparse refuses a budget > 1
        main(fresh + ["--budget", "0.5,2"])
    assert "each budget must be a fraction in (0, 1], got 2" in capsys.readouterr().err
    assert main(fresh + ["--only-budget"]) == 2
    assert "--only-budget needs --budget" in capsys.readouterr().err


def test_run_without_controls_uses_generic_retention(workdir, tmp_path):
    import warnings

    from tl_transplant.sweeps.protocol import GENERIC_RETENTION_NOTE

    cfg = _cfg(workdir, export=False, control_tasks=[], sweep={"k": [2], "alpha": [1.0]},
               selection={"methods": ["weight_diff"], "units": ["head", "neuron"],
                          "controls": []})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # word-level vocab: task contexts only
        res = run(cfg, tmp_path / "g", progress=False, report=False, log=lambda *_: None)
    r = res.results  # typed: what results.json holds
    assert r.retention_control is not None
    assert (r.retention_control.mode, r.retention_control.description) == (
        "generic", GENERIC_RETENTION_NOTE)
    (ret,) = r.retention
    assert ret.task == "generic_retention:test" and ret.before == 1.0
    assert ret.drop == pytest.approx(ret.before - ret.after)
    assert f"retention control: {GENERIC_RETENTION_NOTE}" in res.table()
    assert json.loads((tmp_path / "g" / "results.json").read_text()) == r.to_dict()


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("name", ["cross_generation", "base_instruct"])
def test_demo_config_is_valid_and_compares_against_both_controls(name: str, full: bool) -> None:
    """The demo compares every rule with random and weight_diff at the same budgets, on test."""
    from tl_transplant.pipeline.config import load_config
    from tl_transplant.pipeline.runner import demo_config

    rc = load_config(demo_config(name, export=False, full=full))
    labels = {r.label for r in rc.selection.runs()}
    assert {"random", "weight_diff", "learned_mask"} <= labels
    # issue 18: the cheap weight-level rules and the dense baseline, and their controls
    assert {"attribution@weight", "random@weight", "magnitude", "dense"} <= labels
    assert {"random", "random@weight", "magnitude", "dense"} <= {
        r.label for r in rc.selection.runs("controls")}
    assert rc.sweep.budget and rc.sweep.compare and rc.export is False
    assert bool(rc.sweep.ks()) is full and ("activation_patch" in labels) is full


@pytest.mark.parametrize("progress", [False, True])
def test_learned_mask_candidate_set_is_said_once(workdir, tmp_path, capsys, progress):
    """A learned_mask run that gates a candidate set says so once, with or without bars
    (the scorer's note reaches the console only when progress is on)."""
    import warnings

    cfg = _cfg(workdir, export=False, control_tasks=[], sweep={"k": [2], "alpha": [1.0]},
               selection={"methods": ["learned_mask"], "units": ["head", "neuron"],
                          "controls": [], "options": {"learned_mask": {
                              "steps": 2, "unit_candidates": 0.2}}})
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # word-level vocab: task contexts only
        run(cfg, tmp_path / "o", progress=progress, report=False, log=lines.append)
    cap = capsys.readouterr()
    said = "\n".join(lines) + cap.out + cap.err
    assert said.count("with the largest attribution") == 1, said
