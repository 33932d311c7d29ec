"""Config validation: bad input is refused before any model loads, naming key, value and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tl_transplant.pipeline.config import ConfigError, SelectionConfig, check_device, load_config


def _cfg(**change: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"source": "src", "target": "tgt", "task": {"path": "t.jsonl"}}
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"sweep": {"k": [True]}}, r"sweep\.k: .*each K must be an integer >= 1 \(got True\)"),
        ({"sweep": {"k": [2, False]}}, r"sweep\.k: .*\(got False\)"),
        ({"sweep": {"k": ["4"]}}, r"sweep\.k: .*\(got '4'\)"),
        ({"sweep": {"k": 4}}, r"sweep\.k: give a non-empty list of K >= 1 \(got 4\)"),
        ({"sweep": {"alpha": [True]}}, r"sweep\.alpha: each alpha must be a number in \[0, 1\] "
                                       r"\(got True\)"),
        ({"sweep": {"alpha": ["0.5"]}}, r"sweep\.alpha: .*\(got '0\.5'\)"),
        ({"sweep": {"alpha": []}}, r"sweep\.alpha: give a non-empty list of alphas"),
        ({"sweep": {"budget": [0.0]}}, r"sweep\.budget: give a list of fractions of the block "
                                       r"parameters in \(0, 1\].*each budget must be in "
                                       r"\(0, 1\] \(got 0\.0\)"),
        ({"sweep": {"budget": [5]}}, r"sweep\.budget: .*\(got 5\); write 1% as 0\.01"),
        ({"sweep": {"budget": [True]}}, r"sweep\.budget: .*must be a number \(got True\)"),
        ({"sweep": {"budget": ["1%"]}}, r"sweep\.budget: .*must be a number \(got '1%'\)"),
        ({"sweep": {"budget": "0.01"}}, r"sweep\.budget: give a list of fractions"),
        ({"sweep": {"k": [], "budget": []}}, r"sweep: k: give a non-empty list of K >= 1, or a "
                                             r"budget list \(sweep\.budget\)"),
        ({"sweep": {"compare": "yes"}}, r"sweep\.compare: must be true or false \(got 'yes'\)"),
        ({"retention": "generic"}, r"retention: must be one of auto, none \(got 'generic'\)"),
        ({"retention": True}, r"retention: must be one of auto, none \(got True\)"),
        ({"seed": True}, r"seed: must be an integer \(got True\)"),
        ({"batch_size": 2.5}, r"batch_size: must be an integer \(got 2\.5\)"),
        ({"export": "yes"}, r"export: must be true or false \(got 'yes'\)"),
        ({"task": {"limit": True}}, r"task\.limit: must be an integer \(got True\)"),
        ({"task": {"dev_fraction": True}}, r"task\.dev_fraction: must be a number \(got True\)"),
        ({"task": {"extract": "boxxed"}}, r"task\.extract: must be one of strip, .*boxed "
                                          r"\(got 'boxxed'\)"),
        ({"task": {"metric": 3}}, r"task\.metric: must be one of .*mc_logprob.* \(got 3\)"),
        ({"dtype": "fp8"}, r"dtype: Input should be 'float32', .*\(got 'fp8'\)"),
        ({"task": {"prepend_bos": 3}}, r"task\.prepend_bos: must be true, false or 'auto' \(got 3\)$"),
    ],
)
def test_bools_and_wrong_types_are_refused(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(_cfg(**change))


def test_numbers_still_accepted() -> None:
    rc = load_config(_cfg(sweep={"k": [4, 1, 4], "alpha": [1, 0.5]}, seed=3))
    assert rc.sweep.k == [1, 4] and rc.sweep.alpha == [0.5, 1.0]
    assert all(type(a) is float for a in rc.sweep.alpha)
    assert rc.seed == 3
    assert rc.sweep.budget == [] and rc.sweep.compare is False and rc.retention == "auto"


def test_budget_compare_retention_keys_and_overrides() -> None:
    rc = load_config(_cfg(sweep={"k": [], "budget": [0.05, 0.01, 0.05, 1], "compare": True},
                          retention="none"))
    assert rc.sweep.k == [] and rc.sweep.budget == [0.01, 0.05, 1.0] and rc.sweep.compare
    assert rc.retention == "none"
    assert load_config(_cfg(sweep={"budget": 0.02})).sweep.budget == [0.02]
    over = load_config(_cfg(sweep={"k": [2]}), {"sweep": {"budget": [0.01]}, "retention": "none"})
    assert over.sweep.k == [2] and over.sweep.budget == [0.01] and over.retention == "none"
    again = load_config(over, {"sweep": {"compare": True}})
    assert again.sweep.compare and again.sweep.budget == [0.01]
    with pytest.raises(ConfigError, match=r"sweep\.budget: .*\(got 2\.0\)"):
        load_config(over, {"sweep": {"budget": [2.0]}})


@pytest.mark.parametrize("units", [[], None])
def test_empty_units_refused(units: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"selection\.units: give at least one unit kind: head, kv_head, neuron,"
                           r" linear"
    ):
        load_config(_cfg(selection={"units": units}))


def test_method_that_can_score_none_of_the_units_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"selection: methods: 'paper_l1' scores only linear units, none of "
              r"selection\.units \(head, neuron\); add one of linear to units",
    ):
        load_config(_cfg(selection={"methods": ["attribution", "paper_l1"],
                                    "units": ["head", "neuron"]}))
    with pytest.raises(ConfigError, match=r"controls: 'paper_l1' scores only linear"):
        load_config(_cfg(selection={"controls": ["paper_l1"], "units": ["head"]}))


def test_method_scores_the_intersection_of_units() -> None:
    rc = load_config(_cfg(selection={"methods": ["paper_l1", "attribution"],
                                     "units": ["neuron", "linear", "head"]}))
    assert rc.selection.kinds_for("paper_l1") == ["linear"]
    assert rc.selection.kinds_for("attribution") == ["neuron", "linear", "head"]
    assert SelectionConfig(units=["linear"], methods=["paper_l1"]).kinds_for("random") == [
        "linear"
    ]


def test_scorer_options_are_checked_at_load() -> None:
    rc = load_config(_cfg(selection={"methods": ["learned_mask", "iterative"],
                                     "options": {"learned_mask": {"steps": 7},
                                                 "iterative": {"inner": "attribution", "k": 4}}}))
    assert rc.selection.options["learned_mask"] == {"steps": 7}
    with pytest.raises(ConfigError, match=r"learned_mask does not take option\(s\) 'stepz'"):
        load_config(_cfg(selection={"methods": ["learned_mask"],
                                    "options": {"learned_mask": {"stepz": 7}}}))
    with pytest.raises(ConfigError, match=r"option steps='7' is invalid"):
        load_config(_cfg(selection={"methods": ["learned_mask"],
                                    "options": {"learned_mask": {"steps": "7"}}}))
    with pytest.raises(ConfigError, match=r"'attribution_ig' is not among selection\.methods"):
        load_config(_cfg(selection={"methods": ["attribution"],
                                    "options": {"attribution_ig": {"steps": 3}}}))


def test_yaml_error_keeps_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("source: a\ntarget: b\ntask: {path: [x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4:1: is not valid YAML: ")
    p.write_text("source: a\ntarget: b\n  bad: indent\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3:6: is not valid YAML: mapping values"):
        load_config(p)


def test_non_utf8_config_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"source: a\ntarget: \xff\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: not UTF-8 text \(byte 18\)"):
        load_config(p)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU0", "auto", ""])
def test_device_forms(device: str) -> None:
    with pytest.raises(ConfigError, match=rf"device: unknown device {device!r}; valid forms: "
                                          r"cpu, cuda, cuda:N"):
        load_config(_cfg(device=device))
    assert load_config(_cfg(device="CPU")).device == "cpu"
    with pytest.raises(ConfigError, match="device: unknown device 0"):
        load_config(_cfg(device=0))


def test_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"device: 'cuda': CUDA is not available on this machine; use device: cpu"
    ):
        load_config(_cfg(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(_cfg(device="cuda:1")).device == "cuda:1"
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        check_device("cuda:2")


def test_hub_task_names_are_not_made_paths(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    (tmp_path / "local_ds").mkdir()
    p.write_text(yaml.safe_dump(_cfg(
        task={"path": "HuggingFaceH4/MATH-500", "split": "test", "prompt_field": "problem",
              "extract": "boxed", "metric": "exact_match", "config_name": "default"},
        control_tasks=[{"path": "local_ds"}, {"path": "missing.jsonl"}],
    )))
    rc = load_config(p)
    assert rc.task.path == "HuggingFaceH4/MATH-500"  # a hub name stays a name
    assert rc.control_tasks[0].path == str(tmp_path / "local_ds")
    assert rc.control_tasks[1].path == str(tmp_path / "missing.jsonl")  # file-like: a path
    kw = rc.task.task_kwargs()
    assert kw["split"] == "test" and kw["config_name"] == "default" and kw["extract"] == "boxed"
    assert kw["prompt_field"] == "problem" and kw["choices_field"] == "choices"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"task": {"path": ""}}, r"task\.path: give a local file, a dataset folder or a hub "
                                 r"dataset name \(got ''\)"),
        ({"task": {"path": "a\x00b"}}, r"task\.path: give a local file"),
        ({"task": {"path": "~nobody_zz/t.jsonl"}}, r"task\.path: cannot expand "
                                                  r"'~nobody_zz/t\.jsonl': no such user"),
        ({"control_tasks": [{"path": "x.csv", "test_path": "~nobody_zz/y.csv"}]},
         r"control_tasks\.0\.test_path: cannot expand"),
        ({"source": "~nobody_zz/m"}, r"source: cannot expand"),
    ],
)
def test_bad_paths_refused(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(_cfg(**change))


# ---- fuzz: load_config raises only ConfigError ------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["head", "linear", "paper_l1", "cpu", "cuda", "auto",
                                          "exact_match", "boxed", "t.jsonl", "random",
                                          "~nobody_zz/t.jsonl", "~nobody_zz", "a\x00b", ".",
                                          "org/name", "cuda:7", "mc_logprob"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
_KEYS = {
    None: ["source", "target", "task", "control_tasks", "selection", "sweep", "seed", "export",
           "device", "dtype", "batch_size", "name", "retention"],
    "task": ["path", "metric", "limit", "extract", "split", "config_name", "dev_fraction",
             "prepend_bos", "max_new_tokens", "test_path"],
    "selection": ["methods", "units", "controls", "contrast_lambda"],
    "sweep": ["k", "alpha", "max_retention_drop", "budget", "compare"],
}


@st.composite
def _configs(draw: st.DrawFn) -> Any:
    cfg: dict[Any, Any] = _cfg()
    for key in draw(st.lists(st.sampled_from(_KEYS[None]), max_size=4)):
        sub = _KEYS.get(key)
        if sub and draw(st.booleans()):
            old = cfg.get(key)
            inner = dict(old) if isinstance(old, dict) else {}
            inner[draw(st.sampled_from(sub))] = draw(_values)
            cfg[key] = inner
        else:
            cfg[key] = draw(_values)
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(_scalars)] = draw(_values)  # odd keys: ints, None, floats
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=_configs())
def test_fuzz_dict_configs_raise_only_config_error(cfg: Any) -> None:
    try:
        load_config(cfg)
    except ConfigError:
        pass


_yaml_text = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab:- \n\t{}[]'\"&*!|>#%@,?0.9")), max_size=40),
    st.text(max_size=30),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=_yaml_text, cfg=_configs())
def test_fuzz_yaml_files_raise_only_config_error(tmp_path: Path, text: str, cfg: Any) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_config(p)
    except ConfigError:
        pass
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True) if _dumpable(cfg) else "x: [")
    try:
        load_config(p)
    except ConfigError:
        pass


def _dumpable(cfg: Any) -> bool:
    try:
        yaml.safe_dump(cfg)
    except yaml.YAMLError:
        return False
    return True
