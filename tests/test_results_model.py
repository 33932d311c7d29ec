"""One typed result model (issue 19): ``results.json`` is :class:`Results`, field for field.

The golden files are the demo's ``results.json`` (cross_generation and base_instruct,
``--no-export``) written by the code *before* the typed model (commit f3bad39): reading
one into :class:`Results` and writing it back gives the same text, byte for byte, so the
model carries every key, its order, its type and its nulls. That the demo still writes
those numbers is ``scripts/check_demo_golden.py`` (it runs the demo twice; too slow here).
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from tl_transplant.report.text import NO_CHOICE, format_table
from tl_transplant.sweeps.records import (
    RESULT_KEYS,
    Baselines,
    ChoiceRecord,
    ControlRecord,
    Results,
    ResultsFileError,
    RetentionRecord,
    SplitBaseline,
    TestRecord,
)

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = sorted(DATA.glob("demo_*_results.json.gz"))


def _golden(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode()


def test_golden_files_are_there() -> None:
    assert {p.name for p in GOLDEN} == {"demo_cross_generation_results.json.gz",
                                        "demo_base_instruct_results.json.gz"}


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name.split("_results")[0])
def test_results_json_reads_and_writes_back_identically(path: Path, tmp_path: Path) -> None:
    text = _golden(path)
    res = Results.model_validate(json.loads(text))
    assert res.to_json() == text
    assert tuple(res.to_dict()) == RESULT_KEYS
    # typed all the way down: the table reads attributes, not keys
    assert res.best is not None and res.test is not None and res.selection is not None
    assert isinstance(res.controls[next(iter(res.controls))], ControlRecord)
    assert res.comparison is not None and res.comparison.cells[0].vs
    f = res.save(tmp_path / "results.json")
    assert Results.load(f) == res and f.read_text() == text
    # the table from the model, and from the same results as a plain mapping, agree
    table = format_table(res)
    assert table == format_table(json.loads(text))
    assert f"chosen: {res.best.method}" in table and "controls, each filled" in table


def test_weight_level_and_unit_level_choices_print_their_sizes() -> None:
    by_name = {p.name.split("_results")[0]: Results.model_validate(json.loads(_golden(p)))
               for p in GOLDEN}
    cg, bi = by_name["demo_cross_generation"], by_name["demo_base_instruct"]
    assert cg.best is not None and cg.best.mask is not None and cg.fraction_units is None
    assert f"{cg.best.mask.n_params} single weights" in format_table(cg)
    assert bi.best is not None and bi.best.mask is None and bi.fraction_units is not None
    assert f"K={bi.best.k}" in format_table(bi) and "of units searched" in format_table(bi)
    # a warning of the selection check is both a note and a line of the table
    assert bi.selection is not None and bi.selection.warning
    assert f"warning: {bi.selection.warning}" in format_table(bi)


def test_table_from_a_small_typed_result() -> None:
    base = Baselines(source=SplitBaseline(dev=0.8, test=0.75),
                     target=SplitBaseline(dev=0.2, test=None))
    assert format_table(Results(baselines=base)).splitlines() == [
        "baselines           dev      test",
        "  source           0.800     0.750",
        "  target           0.200       n/a",
        NO_CHOICE,
    ]
    res = Results(
        baselines=base,
        best=ChoiceRecord(method="attribution", grain="unit", pct_params=0.0123, pct_units=0.25,
                          budget=None, k=4, alpha=0.5, effective_alpha=0.5, extrapolates=False,
                          n_params=12, units=["L0.H1"], mask=None, dev_metric=0.6),
        test=TestRecord(transplanted=0.6, tir=3.0, recovery=0.7,
                        ci={"tir": [2.5, 3.5], "recovery": None}),
        controls={"random": ControlRecord(
            method="random", grain="unit", n_params=12, pct_params=0.0123,
            chosen_n_params=12, chosen_pct_params=0.0123, alpha=0.5, effective_alpha=0.5,
            extrapolates=False, n_units=1, note="", units=["L1.H0"], mask=None, test=0.3,
            recovery=0.1, recovery_ci=None, retention_drop=None, best_minus_control=0.3,
            best_minus_control_ci=[0.1, 0.5])},
        retention=[RetentionRecord(task="ret", before=0.9, after=0.85, drop=0.05)],
        fraction_params=0.0123, fraction_units=0.25,
    )
    text = format_table(res)
    assert ("chosen: attribution  K=4  alpha=0.5  (1.23% of block parameters, 25.0% of units "
            "searched)") in text
    assert "TIR 3.000 [2.500, 3.500]  recovery 0.700 n/a" in text
    assert "best-control 0.300 CI [0.100, 0.500]" in text
    assert text.endswith("retention ret: 0.900 -> 0.850 (drop 0.050)")


def test_a_bad_results_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"baselines": {}, "bogus": 1}))
    for name in ("a.json", "b.json", "missing.json"):
        with pytest.raises(ResultsFileError, match="cannot read"):
            Results.load(tmp_path / name)
    with pytest.raises(ValueError):  # frozen, unknown keys refused
        Results.model_validate({"baselines": {"source": {"dev": 1, "test": None},
                                              "target": {"dev": 0, "test": None}}, "x": 1})


def test_dict_access_of_0_1_still_works_with_a_warning() -> None:
    text = _golden(GOLDEN[0])
    res = Results.model_validate(json.loads(text))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert res["test"] == json.loads(text)["test"]
        assert res.get("nope", 3) == 3
    assert len(caught) == 2 and all(w.category is DeprecationWarning for w in caught)
