"""Sweeps: choice on dev only, tie-break, retention constraint, Pareto front, restore, outputs."""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tl_transplant.evaluation.stats import UndefinedMetricWarning
from tl_transplant.sweeps.protocol import RankedUnits, SweepRow, choose_best, pareto_front, sweep
from tl_transplant.sweeps.search import SweepError
from tl_transplant.tasks.task import Task
from tl_transplant.testing import same_state, snapshot_side

TRUE_UNITS = ["L1.mlp.down_proj", "L1.attn.o_proj"]  # where source != target
DECOYS = ["L0.attn.q_proj", "L0.mlp.up_proj", "L1.attn.q_proj"]  # identical in both: no-ops
RANKING = [DECOYS[0], *TRUE_UNITS, DECOYS[1], DECOYS[2]]


@pytest.fixture(scope="module")
def eng(engineered_pair, next_ids):
    """The shared llama pair equal except TRUE_UNITS; tasks labelled by the source / by the target."""
    pair, tok = engineered_pair
    rng = np.random.default_rng(0)
    pool = [
        " ".join(f"w{i}" for i in rng.integers(0, 92, size=int(rng.integers(2, 7))))
        for _ in range(150)
    ]
    ls, lt = next_ids(pair.source, pool), next_ids(pair.target, pool)
    keep = [i for i in range(len(pool)) if ls[i] >= 4 and lt[i] >= 4]
    word = tok.convert_ids_to_tokens

    def mk(name: str, idx: list[int], lab: list[int]) -> Task:
        return Task(
            name, [pool[i] for i in idx], [" " + word(lab[i]) for i in idx], prepend_bos=True
        )

    src, ctl = mk("src", keep[:40], ls), mk("ctl", keep[40:80], lt)
    # Neither model ever predicts these answers: source == target == 0 (no gap).
    none_lab = [next(j for j in range(4, 96) if j not in (ls[i], lt[i])) for i in range(len(pool))]
    nogap = mk("nogap", keep[:20], none_lab)
    return pair, src, ctl, nogap


_snapshot = snapshot_side
_same = same_state


def _rule(rows):
    return min(rows, key=lambda r: (-r.metric, r.n_params or 0, r.k, r.alpha))


KW = dict(ks=[1, 3, 4], alphas=[0.5, 1.0], n_boot=200, progress=False)


def test_sweep_finds_units_restores_and_reports_on_test(eng):
    pair, src, ctl, _ = eng
    before = _snapshot(pair.target)
    res = sweep(pair, src, RankedUnits(RANKING, method="oracle"), control_tasks=[ctl], **KW)
    assert _same(before, _snapshot(pair.target)) and not pair.active
    assert len(res.rows) == 6 and res.config["n_dev"] == 20 and res.config["n_test"] == 20
    t_dev = res.baselines["dev"]["target"].mean
    assert res.baselines["dev"]["source"].mean == 1.0 and t_dev < 0.6
    for r in res.rows:
        if r.k == 1:  # the decoy alone changes nothing
            assert r.metric == t_dev and r.max_drop == 0.0 and r.recovery == 0.0
        else:
            assert r.units[1:3] == TRUE_UNITS
    full = [r for r in res.rows if r.k in (3, 4) and r.alpha == 1.0]
    assert all(r.metric == 1.0 and r.recovery == 1.0 for r in full)
    best = res.best
    assert best is _rule(res.rows) and best.metric == 1.0
    assert best.k == 3  # K=4 ties with K=3 (its extra unit is a no-op): smaller K wins
    # Test split: the choice is reported with CIs and retention.
    m = best.test.metrics
    assert best.test.task == "src:test" and m.n == 20
    if best.alpha == 1.0:
        assert m.transplanted == 1.0 and m.recovery == 1.0
    assert set(m.ci) == {"delta", "tir", "recovery"} and m.ci["delta"] is not None
    (ret,) = best.test.retention
    assert ret.task == "ctl:test" and ret.before == 1.0 and ret.drop > 0
    # Pareto front: the harmless no-op and the best recovery are on it; it is non-dominated.
    front = res.pareto
    assert any(r.k == 1 for r in front) and any(r.metric == 1.0 for r in front)
    for r in front:
        assert not any(
            o.metric >= r.metric
            and o.max_drop <= r.max_drop
            and (o.metric > r.metric or o.max_drop < r.max_drop)
            for o in res.rows
        )
    df = res.to_frame()
    assert len(df) == 6 and int(df["best"].sum()) == 1 and "drop:ctl" in df.columns
    assert {"method", "k", "alpha", "dev_next_token_acc", "recovery", "pareto"} <= set(df.columns)
    assert "best on dev: oracle K=3" in res.summary()


def test_retention_constraint_is_respected(eng):
    pair, src, ctl, _ = eng
    res = sweep(pair, src, RANKING, control_tasks=[ctl], max_retention_drop=0.0, **KW)
    b = res.best
    assert b is not None and b.feasible and b.max_drop <= 0.0
    assert all(not r.feasible for r in res.rows if r.metric > b.metric)
    assert b.k == 1 and b.alpha == 0.5  # the no-op; ties -> smaller alpha
    assert b.test is not None and b.test.max_drop == 0.0
    with pytest.warns(UserWarning, match="no configuration kept"):
        none = sweep(pair, src, RANKING, control_tasks=[ctl], max_retention_drop=-1.0, **KW)
    assert none.best is None and "test" not in none.baselines and not pair.active


def test_choice_never_reads_test_labels(eng):
    pair, src, ctl, _ = eng
    _, test = src.split(0.5, seed=0)
    answers = list(src.answers)
    for i in test.meta["indices"]:
        answers[i] = " w0" if answers[i] != " w0" else " w1"
    corrupted = src.replace(answers=answers)
    a = sweep(pair, src, RANKING, control_tasks=[ctl], **KW)
    with pytest.warns(UndefinedMetricWarning, match="test: "):  # corrupted: nobody is right
        b = sweep(pair, corrupted, RANKING, control_tasks=[ctl], **KW)
    assert [(r.k, r.alpha, r.metric, r.max_drop) for r in a.rows] == [
        (r.k, r.alpha, r.metric, r.max_drop) for r in b.rows
    ]
    assert (a.best.k, a.best.alpha) == (b.best.k, b.best.alpha)
    assert a.best.test.metrics.transplanted != b.best.test.metrics.transplanted


def test_zero_gap_gives_none_and_tie_break(eng):
    pair, _, _, nogap = eng
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sweep(pair, nogap, RANKING, ks=[3, 1], alphas=[1.0, 0.5], n_boot=100,
                    control_tasks=(), progress=False)
    msgs = [str(w.message) for w in caught if w.category is UndefinedMetricWarning]
    assert any(m.startswith("dev: recovery undefined") for m in msgs)
    assert any(m.startswith("test: TIR undefined") for m in msgs)
    assert all(r.recovery is None and r.tir is None and r.metric == 0.0 for r in res.rows)
    assert (res.best.k, res.best.alpha) == (1, 0.5)  # all tie: smaller K, then smaller alpha
    assert res.best.test.metrics.recovery is None
    assert any("recovery undefined" in n for n in res.notes)


def test_tie_break_and_pareto_rules():
    def row(m, k, a, metric, drop=0.0):
        return SweepRow(
            m,
            k,
            a,
            ["L0.attn.q_proj"] * k,
            metric,
            0.0,
            None,
            None,
            control={"c": {"before": 1.0, "after": 1.0 - drop, "drop": drop}},
        )

    rows = [
        row("a", 8, 1.0, 0.5),
        row("a", 4, 1.0, 0.5),
        row("a", 4, 0.5, 0.5),
        row("b", 4, 0.5, 0.5),
        row("a", 16, 1.0, 0.4),
    ]
    assert choose_best(rows) is rows[2]  # smaller K, then alpha, then the earlier method
    rows.append(row("a", 32, 1.0, 0.9, drop=0.3))
    assert choose_best(rows) is rows[-1]
    assert choose_best(rows, max_retention_drop=0.2) is rows[2]
    assert choose_best(rows, max_retention_drop=-0.1) is None
    front = pareto_front(rows)
    assert front == [rows[-1], rows[2]]  # duplicates of a point: only the tie-break winner


class FakeScores:
    """Stands in for the scoring engineer's Scores: any object with .top(k, kinds=...)."""

    method = "fake_l1"

    def __init__(self, units):
        self.ranked = RankedUnits(units)
        self.calls = []

    def top(self, k, kinds=None):
        self.calls.append((k, kinds))
        return [str(u) for u in self.ranked.top(k, kinds)]


def test_methods_side_by_side_and_save(eng, tmp_path: Path):
    pair, src, ctl, _ = eng
    fake = FakeScores(["L0.H1", *RANKING])
    scores = {"oracle": RANKING, "reverse": list(reversed(RANKING)), "fake": fake}
    res = sweep(
        pair,
        src,
        scores,
        ks=[0, 2],
        alphas=[1.0],
        units="linear",
        control_tasks=[ctl],
        n_boot=100,
        progress=False,
    )
    assert fake.calls == [(2, "linear")]  # K=0 needs no ranking; kinds are passed through
    assert res.methods == ["oracle", "reverse", "fake"]
    assert set(res.best_by_method) == {"oracle", "reverse", "fake"}
    assert all(r.test is not None for r in res.best_by_method.values())
    by = res.by_method()
    assert list(by.columns) == ["fake", "oracle", "reverse"] and list(by.index) == [0, 2]
    k0 = [r.metric for r in res.rows if r.k == 0]
    assert len(set(k0)) == 1 and k0[0] == res.baselines["dev"]["target"].mean
    out = res.save(tmp_path / "out")
    data = json.loads((out / "results.json").read_text())
    assert data["best"]["k"] == res.best.k and data["config"]["prepend_bos"] is True
    assert len(data["rows"]) == 6 and data["pareto"]
    assert (out / "sweep.csv").read_text().count("\n") == 7
    assert (out / "sweep.png").stat().st_size > 1000
    json.dumps(res.to_dict(), allow_nan=False)
    # The sweep never imports the report: saving with report.html is a call one level up.
    with pytest.raises(SweepError, match=r"tl_transplant\.report\.save_sweep"):
        res.save(tmp_path / "rep2", report=True)
    with pytest.raises(SweepError, match="save_sweep"):
        res.save(tmp_path / "rep2", title="t")
    assert not (tmp_path / "rep2").exists()
    from tl_transplant.report import save_sweep

    rep = save_sweep(res, tmp_path / "rep", title="t <&>")
    assert rep == tmp_path / "rep" and (rep / "results.json").read_text() == (
        out / "results.json").read_text()
    assert "<title>t &lt;&amp;&gt;</title>" in (rep / "report.html").read_text()


def test_bad_arguments(eng):
    pair, src, ctl, _ = eng
    with pytest.raises(TypeError, match="scores must be"):
        sweep(pair, src, 42, progress=False)
    with pytest.raises(ValueError, match="distinct names"):
        sweep(pair, src, RANKING, control_tasks=[src], progress=False)
    with pytest.raises(ValueError, match="ks must be"):
        sweep(pair, src, RANKING, ks=[-1], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sweep(pair, src, RANKING, ks=[9], alphas=[1.0], n_boot=50, control_tasks=(),
                    progress=False)
    assert res.rows[0].n_units == 5 and any("only 5 units" in n for n in res.notes)
    assert res.config["retention"]["mode"] == "none" and not res.rows[0].control
    with pytest.raises(ValueError, match=r"each budget must be a fraction .* \(0, 1\]"):
        sweep(pair, src, RANKING, budgets=[0.0], progress=False)
    with pytest.raises(ValueError, match=r"each budget must be .*\(got True\)"):
        sweep(pair, src, RANKING, budgets=[True], progress=False)
    with pytest.raises(ValueError, match="at least one K"):
        sweep(pair, src, RANKING, ks=[], progress=False)


class _Splits:  # like the zoo's Splits: given dev/test files
    def __init__(self, dev, test):
        self.dev, self.test = dev, test


def test_given_splits_match_internal_split(eng):
    pair, src, ctl, _ = eng
    a = sweep(pair, src, RANKING, control_tasks=[ctl], **KW)
    given = sweep(
        pair, src.split(0.5, 0), RANKING, control_tasks=[_Splits(*ctl.split(0.5, 0))], **KW
    )
    assert [(r.k, r.alpha, r.metric, r.control) for r in a.rows] == [
        (r.k, r.alpha, r.metric, r.control) for r in given.rows
    ]
    assert given.task["name"] == "src" and given.config["split"] == "given"
    assert given.best.test.metrics.to_dict() == a.best.test.metrics.to_dict()
    with pytest.raises(TypeError, match="given"):
        sweep(pair, "src", RANKING, progress=False)


def test_every_row_states_params_then_units(eng):
    pair, src, ctl, _ = eng
    from tl_transplant.edit.budget import block_params
    from tl_transplant.edit.edits import plan_transplant

    res = sweep(pair, src, RANKING, control_tasks=[ctl], **KW)
    n_block = block_params(pair.layout)
    for r in res.rows:
        assert r.budget is None and r.size == f"K={r.k}"
        assert r.n_params == plan_transplant(pair, r.units).n_params
        assert r.pct_params == r.n_params / n_block and r.pct_units == r.n_units / 14
    cols = list(res.to_frame().columns)
    assert cols.index("pct_params") < cols.index("pct_units") < cols.index("k")
    keys = list(res.to_dict()["rows"][0])
    assert keys.index("pct_params") < keys.index("pct_units") < keys.index("k")
    text = res.summary()
    assert f"of block params, {100 * res.best.pct_units:.3g}% of units" in text


def test_budgets_suggested_set_and_comparison_on_test(eng, tmp_path: Path):
    from tl_transplant.edit.budget import block_params
    from tl_transplant.report.text import COMPARISON_NOTE
    from tl_transplant.scoring.scores import Scores

    pair, src, ctl, _ = eng
    lay = pair.layout
    n_block = block_params(lay)
    # A gate-like scorer (rule "score") with its own suggested set: the true units.
    gate = Scores(RANKING, [5.0, 4.0, 3.0, 2.0, 1.0], method="gate",
                  meta={"budget_rule": "score", "suggested": TRUE_UNITS})
    scores = {"oracle": RANKING, "random": list(reversed(RANKING)), "gate": gate}
    res = sweep(pair, src, scores, ks=[], budgets=[0.1, 0.25], alphas=[0.5, 1.0],
                control_tasks=[ctl], compare_on_test=True, n_boot=200, progress=False)
    assert res.config["budgets"] == [0.1, 0.25] and res.config["block_params"] == n_block
    for r in res.rows:
        assert r.pct_params == r.n_params / n_block
        if isinstance(r.budget, float):
            assert r.n_params <= r.budget * n_block and r.size == f"budget {100 * r.budget:g}%"
    oracle = {r.budget: r.units for r in res.rows if r.method == "oracle" and r.alpha == 1.0}
    # Walk the ranking: 10% = 1536 weights holds the 1024-weight decoy only; 25% holds the
    # decoy and both true units (3584), skipping nothing else that fits.
    assert oracle == {0.1: [DECOYS[0]], 0.25: [DECOYS[0], *TRUE_UNITS]}
    sugg = [r for r in res.rows if r.budget == "suggested"]
    assert {r.method for r in sugg} == {"gate"} and all(r.units == TRUE_UNITS for r in sugg)
    assert any(r.metric == 1.0 for r in sugg)
    # The choice is still made on dev only, by the usual rule.
    assert res.best is _rule(res.rows) and res.best.metric == 1.0
    # Comparison: one cell per (method, size), best alpha on dev, evaluated on test.
    cells = {(c.method, c.size): c for c in res.comparison}
    assert set(cells) == {(m, s) for m in ("oracle", "random", "gate")
                          for s in ("budget 10%", "budget 25%")} | {("gate", "suggested")}
    rnd = RankedUnits(list(reversed(RANKING)))
    for (m, size), c in cells.items():
        group = [r for r in res.rows if r.method == m and r.size == size]
        assert c.row is _rule(group) and c.row.test is not None
        assert c.row.test.metrics.n == 20
        if m != "random":
            # The random control is filled to this cell's own parameter count (issue 18),
            # by the same fill rule, so it lands at most one unit below it.
            v = c.vs["random"]
            want = rnd.within_budget(c.row.n_params / n_block, lay) if c.row.n_params else []
            assert v.n_units == len(want) and v.chosen_n_params == c.row.n_params
            assert v.n_params <= c.row.n_params
            assert all(v.n_params + lay.n_params(u) > c.row.n_params
                       for u in rnd.units if str(u) not in map(str, want))
            assert v.ci[0] <= v.diff <= v.ci[1]
            same = cells.get(("random", size))
            if same is not None and same.row.n_params == v.n_params:
                assert v.diff == c.row.test.transplanted.mean - same.row.test.transplanted.mean
        else:
            assert "random" not in c.vs
    assert cells[("oracle", "budget 25%")].vs["random"].diff > 0
    frame = res.comparison_frame()
    assert list(frame.columns[:4]) == ["method", "size", "pct_params", "pct_units"]
    assert "minus_random" in frame.columns and len(frame) == 7
    assert COMPARISON_NOTE in res.summary() and "budget 25%" in res.summary()
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert data["comparison"]["note"] == COMPARISON_NOTE and len(data["comparison"]["cells"]) == 7
    assert res.by_budget().shape == (2, 3)
    assert (res.save(tmp_path / "b") / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "b" / "comparison.csv").read_text().count("\n") == 8
    from tl_transplant.report.html import comparison_markdown, write_report

    page = write_report(tmp_path / "b", sweep_result=res).read_text()
    assert "Comparison: method × budget" in page and COMPARISON_NOTE in page
    md = comparison_markdown(res).splitlines()
    assert md[0] == f"_{COMPARISON_NOTE}_" and len(md) == 4 + 7
    assert md[2].startswith("| method | size | % params | % units |")
    assert not pair.active


def test_default_control_is_generic_retention(eng, tmp_path: Path):
    """No control task given: the generic proxy is measured, and max_retention_drop binds it."""
    from tl_transplant.sweeps.protocol import GENERIC_RETENTION_NOTE

    pair, src, _, _ = eng
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # word-level vocab: task contexts only
        free = sweep(pair, src, RANKING, ks=[1, 3], alphas=[1.0], n_boot=100, progress=False)
        tight = sweep(pair, src, RANKING, ks=[1, 3], alphas=[1.0], n_boot=100, progress=False,
                      max_retention_drop=0.0)
    assert free.config["retention"] == {"mode": "generic", "description": GENERIC_RETENTION_NOTE}
    assert [c["name"] for c in free.config["control_tasks"]] == ["generic_retention"]
    assert free.control_baselines["dev"]["generic_retention"].mean == 1.0
    assert any(GENERIC_RETENTION_NOTE in n for n in free.notes)
    k3 = next(r for r in free.rows if r.k == 3)  # the true units move the target's predictions
    assert k3.control["generic_retention"]["drop"] > 0 and free.best is k3
    (ret,) = free.best.test.retention
    assert ret.task == "generic_retention:test" and ret.before == 1.0 and ret.drop > 0
    assert tight.best.k == 1 and tight.best.max_drop == 0.0  # the constraint applies to it
    assert GENERIC_RETENTION_NOTE in free.summary()
    assert json.loads(json.dumps(free.to_dict()))["config"]["retention"]["mode"] == "generic"
    from tl_transplant.report.html import write_report

    page = write_report(tmp_path, sweep_result=free).read_text()
    assert html.escape(GENERIC_RETENTION_NOTE) in page


def test_ties_go_to_fewer_weights_moved():
    def row(k, n_params, alpha=1.0, budget=None):
        return SweepRow("m", k, alpha, ["L0.N0"] * k, 0.5, 0.0, None, None, budget=budget,
                        n_params=n_params)

    heads, neurons = row(2, 2048, budget=0.05), row(4, 384)
    assert choose_best([heads, neurons]) is neurons  # same metric: fewer weights first
    assert choose_best([row(4, 384, 1.0), row(4, 384, 0.5)]).alpha == 0.5
    assert heads.size == "budget 5%" and neurons.size == "K=4"
    assert SweepRow("m", 3, 1.0, [], 0.5, 0.0, None, None, budget="suggested").size == "suggested"
