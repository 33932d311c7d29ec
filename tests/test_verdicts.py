"""Issue 18: parameter-matched controls, budgets that mean budgets, the literature's baselines
(dense, magnitude, dare, random weights), weight-level rows, and selection that says how much
to trust it (cross-validated dev estimate, test-outside-dev-CI warning)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tl_transplant import load_config, run, score
from tl_transplant.cli import main
from tl_transplant.edit.budget import ParamCounter, block_params
from tl_transplant.edit.weights import WeightMask
from tl_transplant.evaluation.stats import paired_metrics
from tl_transplant.scoring.scores import Scores
from tl_transplant.scoring.weight_scores import WeightScores
from tl_transplant.sweeps.protocol import sweep
from tl_transplant.sweeps.search import RankedUnits
from tl_transplant.sweeps.selection import (
    SelectionWarning,
    assess_selection,
    check_test_against_dev,
    cross_validated_selection,
    fold_indices,
)
from tl_transplant.tasks.task import Task
from tl_transplant.testing import (
    tiny_run_dir,
)

TRUE_UNITS = ["L1.mlp.down_proj", "L1.attn.o_proj"]  # where source != target
DECOYS = ["L0.attn.q_proj", "L0.mlp.up_proj", "L1.attn.q_proj"]
RANKING = [DECOYS[0], *TRUE_UNITS, DECOYS[1], DECOYS[2]]
KW = dict(alphas=[0.5, 1.0], n_boot=200, progress=False)


@pytest.fixture(scope="module")
def eng(engineered_pair, next_ids):
    """The shared llama pair (equal except TRUE_UNITS) and tasks labelled by each model."""
    pair, tok = engineered_pair
    rng = np.random.default_rng(0)
    pool = [" ".join(f"w{i}" for i in rng.integers(0, 92, size=int(rng.integers(2, 7))))
            for _ in range(150)]
    ls, lt = next_ids(pair.source, pool), next_ids(pair.target, pool)
    keep = [i for i in range(len(pool)) if ls[i] >= 4 and lt[i] >= 4]
    word = tok.convert_ids_to_tokens

    def mk(name: str, idx: list[int], lab: list[int]) -> Task:
        return Task(name, [pool[i] for i in idx], [" " + word(lab[i]) for i in idx],
                    prepend_bos=True)

    return pair, mk("src", keep[:40], ls), mk("ctl", keep[40:80], lt)


_MAG: list[WeightScores] = []  # the magnitude scores of the engineered pair


@pytest.fixture(scope="module")
def weight_scores(eng):
    pair = eng[0]
    out = {m: score(pair, None, m, units="weight", progress=False)
           for m in ("random", "magnitude", "dare")}
    _MAG[:] = [out["magnitude"]]
    return out


def _one_unit(layout, kinds) -> int:
    """The most weights one unit of ``kinds`` can add (a query head brings its KV group)."""
    return max(ParamCounter(layout, "group").cost(u) for u in layout.units(kinds))


def _check_matched(res, layout, kinds) -> None:
    """Every control of the verdict is filled to the chosen size: units within one unit below,
    weights exactly (dense: 100%, compared at its retention cost)."""
    best = res.best
    assert best is not None and res.verdict
    for label, c in res.verdict.items():
        d = c.to_dict()
        assert d["chosen_n_params"] == best.n_params, label
        assert d["chosen_pct_params"] == pytest.approx(best.pct_params)
        assert d["pct_params"] == pytest.approx(d["n_params"] / block_params(layout))
        if d["grain"] == "dense":
            assert d["pct_params"] == 1.0 and "retention cost" in d["note"]
        elif d["grain"] == "weight":  # exactly, or every weight with a score > 0 if fewer
            positive = c.control.selection.n_params if d["method"] == "magnitude" else None
            assert d["n_params"] == min(best.n_params, positive or best.n_params), label
            if positive is not None and positive < best.n_params:
                assert positive == sum(int((v > 0).sum()) for v in _MAG[0].values.values())
        else:
            assert 0 <= best.n_params - d["n_params"] < _one_unit(layout, kinds), label


@pytest.mark.parametrize("winner", ["k_row", "budget_row", "suggested", "weight_row"])
def test_controls_are_filled_to_the_chosen_parameter_count(eng, weight_scores, winner):
    pair, src, ctl = eng
    rnd_units = list(reversed(RANKING))
    gate = Scores(RANKING, [5.0, 4.0, 3.0, 2.0, 1.0], method="gate",
                  meta={"budget_rule": "score", "suggested": TRUE_UNITS})
    controls = {"random": RankedUnits(rnd_units, method="random"),
                "random@weight": weight_scores["random"], "magnitude": weight_scores["magnitude"]}
    if winner == "k_row":
        scores, kw = {"oracle": RANKING}, dict(ks=[3])
    elif winner == "budget_row":
        scores, kw = {"oracle": RANKING}, dict(budgets=[0.25])
    elif winner == "suggested":
        scores, kw = {"gate": gate}, dict(budgets=[0.25])
    else:
        scores, kw = {"magnitude": weight_scores["magnitude"]}, dict(budgets=[0.1, 0.2])
    res = sweep(pair, src, scores, control_tasks=[ctl], units="linear", controls=controls,
                **kw, **KW)
    best = res.best
    assert best is not None and best.n_params > 0
    want = {"k_row": lambda b: b.budget is None, "budget_row": lambda b: b.budget == 0.25,
            "suggested": lambda b: b.budget == "suggested",
            "weight_row": lambda b: b.mask is not None}[winner]
    assert want(best), best
    _check_matched(res, pair.layout, "linear")
    # The paired difference is the chosen test metric minus the control's, with its CI.
    for c in res.verdict.values():
        assert c.diff == pytest.approx(best.test.transplanted.mean
                                       - c.report.transplanted.mean)
        assert c.ci is not None and c.ci[0] <= c.diff + 1e-12 and c.diff <= c.ci[1] + 1e-12
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(data["verdict"]["controls"]) == set(controls) - {best.method}
    assert "searched:" in res.summary() and "controls, each filled to the chosen" in res.summary()
    assert not pair.active


def test_budget_without_k_runs_no_k_row_and_the_suggested_set_must_fit(eng, weight_scores):
    pair, src, ctl = eng
    # Suggested sets (units, and a weight mask) larger than the only budget asked for (10%).
    gate = Scores(RANKING, [5.0, 4.0, 3.0, 2.0, 1.0], method="gate",
                  meta={"budget_rule": "score", "suggested": TRUE_UNITS})
    mag = weight_scores["magnitude"]
    big = mag.top_n(int(0.15 * block_params(pair.layout)))
    wmask = WeightScores(mag.values, method="wgate", meta={}, suggested=big)
    res = sweep(pair, src, {"gate": gate, "wgate@weight": wmask}, control_tasks=[ctl],
                units="linear", budgets=[0.1], controls={}, **KW)
    assert all(r.budget is not None for r in res.rows)  # no K row: budgets mean budgets
    assert res.config["ks"] == []
    sugg = [r for r in res.rows if r.budget == "suggested"]
    assert {r.method for r in sugg} == {"gate", "wgate@weight"}
    assert all(r.over_budget and not r.feasible for r in sugg)  # shown, never chosen
    assert max(r.metric for r in sugg) > res.best.metric  # although it is better on dev
    assert res.best.budget == 0.1 and res.best.n_params <= 0.1 * block_params(pair.layout)
    assert res.searched is not None
    assert "within the largest budget 10%" in res.searched.text
    assert res.searched.n_configs == len(res.rows)
    assert res.searched.n_feasible == sum(r.feasible for r in res.rows)
    # Without any budget a suggested set is selectable, and the default K list runs.
    free = sweep(pair, src, {"gate": gate}, control_tasks=[ctl], units="linear", controls={},
                 ks=None, **KW)
    assert {r.k for r in free.rows if r.budget is None} == {8, 16, 32, 64, 128}
    assert not any(r.over_budget for r in free.rows)
    # Config: budget without k -> no K; k given explicitly -> both; neither -> default K.
    base = {"source": "s", "target": "t", "task": {"path": "t.jsonl"}}
    assert load_config({**base, "sweep": {"budget": [0.01]}}).sweep.ks() == []
    assert load_config({**base, "sweep": {"budget": [0.01], "k": [4]}}).sweep.ks() == [4]
    assert load_config(base).sweep.ks() == [1, 2, 4, 8, 16, 32]


def test_baselines_at_every_budget_and_dare_extrapolates(eng, weight_scores):
    pair, src, ctl = eng
    n_block = block_params(pair.layout)
    dense = score(pair, None, "dense", units="linear", alphas=[0.25, 1.0])
    ws = weight_scores
    scores = [ws["random"], ws["magnitude"], ws["dare"], dense]  # default labels
    budgets = [0.05, 0.1]
    res = sweep(pair, src, scores, control_tasks=[ctl], budgets=budgets, compare_on_test=True,
                **KW)
    assert res.methods == ["random@weight", "magnitude", "dare", "dense"]
    for m in ("random@weight", "magnitude", "dare"):
        got = {(r.budget, r.alpha) for r in res.rows if r.method == m}
        assert got == {(b, a) for b in budgets for a in (0.5, 1.0)}, m
        for r in res.rows:
            if r.method == m:
                assert r.mask is not None and r.n_params == int(r.budget * n_block)
    for r in (r for r in res.rows if r.method == "dare"):
        p = r.n_params / n_block
        assert r.effective_alpha == pytest.approx(r.alpha / p) and r.extrapolates
        assert r.to_dict()["extrapolates"] is True
    dense_rows = [r for r in res.rows if r.method == "dense"]
    assert [(r.size, r.alpha) for r in dense_rows] == [("dense", 0.25), ("dense", 1.0)]
    assert all(r.pct_params == 1.0 and r.over_budget for r in dense_rows)
    assert all(r.recovery_per_pct == pytest.approx(r.recovery / 100) for r in dense_rows
               if r.recovery is not None)
    # Every budget cell is compared with each baseline at the cell's own size; dare is
    # labelled as extrapolating, dense is taken at the cell's dev retention cost.
    for c in res.comparison:
        if c.size == "dense":
            continue
        others = {"random@weight", "magnitude", "dare", "dense"} - {c.method}
        assert set(c.vs) == others, c
        if "dare" in c.vs:
            assert c.vs["dare"].extrapolates is True
        dense_vs = c.vs["dense"]
        assert dense_vs.n_params == n_block and "the same retention cost" in dense_vs.note
        dev_ok = [r for r in dense_rows if r.max_drop <= c.row.max_drop + 1e-12]
        if dev_ok:
            pick = min(dev_ok, key=lambda r: (-r.metric, r.alpha))
            assert dense_vs.alpha == pick.alpha
        else:
            assert dense_vs.alpha == 0.0
    assert "(x)" in res.summary() and not pair.active


def test_cross_validated_selection_equals_brute_force():
    rng = np.random.default_rng(3)
    n, folds = 23, 4
    scores = [rng.integers(0, 2, n).astype(float) for _ in range(6)]
    scores[4] = scores[1].copy()  # an exact tie: broken by the rest of the key
    eligible = [True, True, False, True, True, True]
    tiebreak = [(100, 0, 1.0), (300, 0, 0.5), (1, 0, 0.5), (50, 2, 1.0), (200, 0, 0.5),
                (80, 0, 0.5)]
    target, source = rng.integers(0, 2, n).astype(float), np.ones(n)
    cv = cross_validated_selection(scores, eligible, tiebreak, folds=folds, seed=7,
                                   target=target, source=source)
    held, winners = [], []
    for f in fold_indices(n, folds, 7):
        train = [i for i in range(n) if i not in set(f.tolist())]
        best = None
        for i in range(len(scores)):
            if not eligible[i]:
                continue
            cand = (-round(float(np.mean(scores[i][train])), 12), *tiebreak[i], i)
            best = cand if best is None or cand < best else best
        w = best[-1]
        winners.append(w)
        held.append(float(np.mean(scores[w][f])))
    assert cv is not None and cv.winners == winners and cv.fold_metrics == held
    assert cv.metric == pytest.approx(float(np.mean(held)))
    assert 2 not in cv.winners  # never an ineligible row
    t_cv = np.mean([target[f].mean() for f in fold_indices(n, folds, 7)])
    assert cv.target == pytest.approx(t_cv)
    assert cv.recovery == pytest.approx((cv.metric - t_cv) / (1.0 - t_cv))
    # The folds partition the examples.
    parts = fold_indices(n, folds, 7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert cross_validated_selection(scores, [False] * 6, tiebreak) is None


def test_test_outside_dev_ci_warns_only_then():
    rng = np.random.default_rng(0)
    n = 60
    target = (rng.random(n) < 0.2).astype(float)
    source = np.ones(n)
    best = np.maximum(target, (rng.random(n) < 0.7).astype(float))
    trust = assess_selection(best, target, source, all_scores=[best, target],
                             eligible=[True, True], tiebreak=[(0,), (0,)], n_distinct=2,
                             metric="next_token_acc", n_boot=500, seed=0)
    lo, hi = trust.dev.ci["recovery"]
    assert lo < trust.dev.recovery < hi and trust.n_configs == 2 and trust.n_feasible == 2

    def test_metrics(rec: float):
        """Test scores whose recovery is ``rec`` (target 0.2, source 1.0, n = 50)."""
        t = np.r_[np.ones(10), np.zeros(40)]
        x = t.copy()
        x[10:10 + int(round(rec * 40))] = 1.0
        return paired_metrics(t, x, np.ones(50), n_boot=200, warn=False)

    inside = test_metrics(round(trust.dev.recovery * 40) / 40)
    assert check_test_against_dev(trust, inside) is None
    assert trust.test_check["outside"] is False and trust.warning is None
    below = test_metrics(max(0.0, lo - 0.2))
    msg = check_test_against_dev(trust, below)
    assert msg is not None and "below its dev 95% CI" in msg and "2 configurations" in msg
    assert trust.test_check["outside"] is True and trust.to_dict()["warning"] == msg


def test_sweep_warns_when_test_falls_outside_the_dev_ci(eng):
    pair, src, ctl = eng
    _, test = src.split(0.5, seed=0)
    answers = list(src.answers)
    for i in test.meta["indices"]:  # every test label wrong: test recovery collapses
        answers[i] = " w0" if answers[i] != " w0" else " w1"
    corrupted = src.replace(answers=answers)
    kw = dict(ks=[1, 3], control_tasks=[ctl], controls={}, **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)
        clean = sweep(pair, src, RANKING, **kw)
    assert clean.trust.test_check["outside"] is False and clean.trust.warning is None
    with pytest.warns(SelectionWarning, match="below its dev 95% CI"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("always", SelectionWarning)
        bad = sweep(pair, corrupted, RANKING, **kw)
    assert bad.trust.warning and any(bad.trust.warning in n for n in bad.notes)
    assert f"warning: {bad.trust.warning}" in bad.summary()
    # The choice and its dev figures do not depend on test.
    assert (clean.best.k, clean.best.alpha) == (bad.best.k, bad.best.alpha)
    assert clean.trust.cv.metric == bad.trust.cv.metric
    assert clean.trust.n_configs == len(clean.rows) == 4


# ---- the run: a weight-level winner, controls in results.json, export, CLI ---------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("verdict_pipe")
    return tiny_run_dir(d)


def _cfg(d: Path, **over) -> dict:
    cfg = {
        "source": str(d / "source"), "target": str(d / "target"),
        "task": {"path": str(d / "task.jsonl"), "prepend_bos": True, "metric": "answer_logprob"},
        "control_tasks": [{"path": str(d / "control.jsonl"), "prepend_bos": True,
                           "metric": "answer_logprob"}],
        "selection": {"methods": ["magnitude"], "units": ["head", "neuron", "weight"],
                      "controls": ["random", "dense", "dare"],
                      "options": {"dense": {"alphas": [0.5, 1.0]}}},
        "sweep": {"budget": [0.02, 0.05], "alpha": [0.5, 1.0]},
        "seed": 0, "export": True,
    }
    cfg.update(over)
    return cfg


def test_run_applies_and_exports_a_weight_level_winner(workdir, tmp_path):
    out = tmp_path / "out"
    res = run(_cfg(workdir), out, progress=False, log=lambda *_: None)
    r = json.loads((out / "results.json").read_text())
    best = r["best"]
    assert best["method"] == "magnitude" and best["grain"] == "weight"
    assert best["mask"]["n_params"] == best["n_params"] and best["units"] == []
    assert r["fraction_units"] is None and r["fraction_params"] == best["pct_params"]
    lay = res.pair.layout
    # Controls carry the chosen size and their own: units within one unit, weights exactly.
    assert set(r["controls"]) == {"random", "random@weight", "dense", "dare"}
    for name, c in r["controls"].items():
        assert c["chosen_n_params"] == best["n_params"], name
        assert c["pct_params"] == pytest.approx(c["n_params"] / block_params(lay))
    assert 0 <= best["n_params"] - r["controls"]["random"]["n_params"] < _one_unit(
        lay, ("head", "neuron"))
    assert r["controls"]["random@weight"]["n_params"] == best["n_params"]
    dare = r["controls"]["dare"]
    assert dare["extrapolates"] and dare["effective_alpha"] == pytest.approx(
        best["alpha"] * block_params(lay) / best["n_params"])
    assert r["controls"]["dense"]["n_params"] == block_params(lay)
    # Budgets only (no K rows), what was searched, and the trust in the choice.
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert rows and all(row["budget"] is not None for row in rows)
    assert all(row["mask"] is None or "sha256" in row["mask"] for row in rows)
    assert r["searched"]["n_configs"] == len(rows)
    assert r["selection"]["n_configs"] == len(rows) and r["selection"]["cv"]["folds"] == 5
    # The winner was applied (the manifest moves its weights) and exported exactly.
    man = json.loads((out / "transplant_manifest.json").read_text())["transplants"][0]
    assert man["n_params_moved"] == best["n_params"] and man["alpha"] == best["alpha"]
    assert man["extra"]["mask_sha256"] == best["mask"]["sha256"]
    re = AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (re(ids).logits - res.pair.target.bridge(ids, return_type="logits")
                ).abs().max() <= 1e-5
    # scores_<label>.json of a weight-level method is its unit view, not every weight.
    sc = json.loads((out / "scores_magnitude.json").read_text())
    assert sc["method"] == "magnitude@weight" and len(sc["units"]) == len(
        lay.units(("head", "neuron")))
    table = res.table()
    assert "single weights" in table and "searched:" in table and "control dare" in table
    assert "extrapolating control" in table
    page = (out / "report.html").read_text()
    assert "Verdict: parameter-matched controls" in page
    assert "counted per head and per neuron" in page


def test_config_and_cli_for_weight_units(workdir, tmp_path, capsys):
    from tl_transplant.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"'magnitude' scores single weights only, and "
                                          r"weight is not among selection\.units"):
        load_config(_cfg(workdir, selection={"methods": ["magnitude"], "units": ["head"]}))
    with pytest.raises(ConfigError, match=r"'activation_diff' scores only head, kv_head"):
        load_config(_cfg(workdir, selection={"methods": ["activation_diff"],
                                             "units": ["weight"]}))
    with pytest.raises(ConfigError, match=r"sweep\.budget: single weights are ranked by "
                                          r"parameter budget"):
        load_config(_cfg(workdir, selection={"methods": ["attribution"], "units": ["weight"]},
                         sweep={"k": [2]}))
    with pytest.raises(ConfigError, match=r"dense: option alphas=\[0\] is invalid"):
        load_config(_cfg(workdir, selection={"methods": ["dense"], "units": ["head"],
                                             "options": {"dense": {"alphas": [0]}}}))
    rc = load_config(_cfg(workdir, selection={
        "methods": ["attribution", "weight_diff@unit", "magnitude", "dense"],
        "units": ["neuron", "weights"], "controls": ["random"]}))
    assert [(r.label, r.grain) for r in rc.selection.runs()] == [
        ("attribution", "unit"), ("attribution@weight", "weight"), ("weight_diff", "unit"),
        ("magnitude", "weight"), ("dense", "dense")]
    assert [r.label for r in rc.selection.runs("controls")] == ["random", "random@weight"]
    # A weight-level baseline is a valid control of a unit-level search (not a method).
    rc = load_config(_cfg(workdir, selection={"methods": ["attribution"], "units": ["head"],
                                              "controls": ["random", "dare", "random@weight"]}))
    assert [(r.label, r.grain) for r in rc.selection.runs("controls")] == [
        ("random", "unit"), ("dare", "weight"), ("random@weight", "weight")]
    # score --units weight: .json is the unit view, .safetensors every weight's score.
    common = ["score", "--source", str(workdir / "source"), "--target", str(workdir / "target"),
              "--task", str(workdir / "task.jsonl"), "--method", "magnitude", "--units",
              "weight", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "w.json")]) == 0
    view = json.loads((tmp_path / "w.json").read_text())
    assert view["method"] == "magnitude@weight" and "L0.H0" in view["units"]
    assert main(common + ["--out", str(tmp_path / "w.safetensors")]) == 0
    full = WeightScores.load(tmp_path / "w.safetensors")
    assert full.method == "magnitude" and full.n_weights > len(view["units"])
    assert main(common + ["--out", str(tmp_path / "w.txt")]) == 2
    assert ".safetensors for the full weight scores" in capsys.readouterr().err
    # run --units replaces selection.units.
    cfg = _cfg(workdir, export=False, selection={"methods": ["weight_diff"],
                                                 "units": ["head"], "controls": []},
               sweep={"budget": [0.05], "alpha": [1.0]})
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "--out", str(tmp_path / "o"), "--quiet", "--units",
                 "head,weight"]) == 0
    r = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert r["config"]["methods"] == ["weight_diff", "weight_diff@weight"]


def test_weight_mask_rows_are_compact_in_json(eng, weight_scores):
    pair, src, ctl = eng
    res = sweep(pair, src, {"magnitude": weight_scores["magnitude"]}, control_tasks=[ctl],
                budgets=[0.1], alphas=[1.0], n_boot=100, progress=False, controls={})
    text = json.dumps(res.to_dict())
    (row,) = res.to_dict()["rows"]
    assert set(row["mask"]) == {"n_params", "sha256", "n_tensors", "top_tensors"}
    assert row["mask"]["n_params"] == res.rows[0].mask.n_params == 1536
    assert len(text) < 20_000  # no per-weight indices
    assert isinstance(res.rows[0].mask, WeightMask) and res.rows[0].units == []
