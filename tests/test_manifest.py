"""The manifest: one type, one reader, one writer, and the JSON bytes they agree on."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import tl_transplant
from tl_transplant.edit.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    ManifestDoc,
    ManifestError,
    read_manifest,
    write_manifest,
)

# The package exports functions named like some modules (transplant), so import by name.
export_mod = importlib.import_module("tl_transplant.io.export")
transplant_mod = importlib.import_module("tl_transplant.edit.edits")


def _manifest(units: list[str] | None = None, alpha: float = 0.5) -> Manifest:
    return Manifest(
        units=units or ["L0.H1", "L1.N3"],
        kv_added=["L0.KV0"],
        alpha=alpha,
        kv="group",
        source={"name": "s", "family": "llama"},
        target={"name": "t", "family": "llama", "n_params": 100},
        tensors=[{"name": "w", "shape": [2, 3], "dtype": "float32", "n_changed": 3}],
        n_params_moved=3,
        n_params_target=100,
        n_units_by_kind={"head": 1, "neuron": 1, "kv_head": 1},
        created="2026-01-01T00:00:00+00:00",
        extra={"path": Path("/x")},  # not JSON: written with default=str
    )


def test_one_type_everywhere() -> None:
    assert tl_transplant.Manifest is Manifest is transplant_mod.Manifest
    assert export_mod.MANIFEST_NAME == MANIFEST_NAME == "transplant_manifest.json"
    assert transplant_mod.MANIFEST_FORMAT == MANIFEST_FORMAT == "tl_transplant.edit.manifest/1"


def test_write_is_the_documented_json(tmp_path: Path) -> None:
    m = _manifest()
    path = write_manifest(tmp_path, m)
    assert path == tmp_path / MANIFEST_NAME
    want = json.dumps({"transplants": [m.to_dict()]}, indent=2, default=str)
    assert path.read_text() == want
    (back,) = read_manifest(tmp_path).manifests()
    assert back.to_dict() == {**m.to_dict(), "extra": {"path": "/x"}}


def test_document_dict_kept_as_is_and_history_round_trips(tmp_path: Path) -> None:
    doc = {"transplants": [_manifest().to_dict()], "history": [_manifest(alpha=1.0).to_dict()],
           "note": "kept"}
    p = write_manifest(tmp_path / "m.json", doc)
    assert json.loads(p.read_text())["note"] == "kept"
    got = read_manifest(p)
    assert [r["alpha"] for r in got.transplants] == [0.5]
    assert [r["alpha"] for r in got.history] == [1.0]
    assert ManifestDoc(got.transplants).to_dict().keys() == {"transplants"}
    assert list(got.to_dict()) == ["transplants", "history"]


def test_reader_accepts_every_form(tmp_path: Path) -> None:
    m1, m2 = _manifest(alpha=0.25), _manifest(alpha=0.75)
    forms = [m1, m1.to_dict(), [m1, m2.to_dict()], {"transplants": [m1.to_dict()]},
             ManifestDoc([m1.to_dict()])]
    alphas = [[r["alpha"] for r in read_manifest(f).transplants] for f in forms]
    assert alphas == [[0.25], [0.25], [0.25, 0.75], [0.25], [0.25]]
    m1.save(tmp_path / "bare.json")  # a bare record file
    assert json.loads((tmp_path / "bare.json").read_text())["format"] == MANIFEST_FORMAT
    assert Manifest.load(tmp_path / "bare.json").alpha == 0.25
    write_manifest(tmp_path / "one.json", m2)
    assert Manifest.load(tmp_path / "one.json").alpha == 0.75
    write_manifest(tmp_path / "two.json", [m1, m2])
    with pytest.raises(ManifestError, match="holds 2 transplants"):
        Manifest.load(tmp_path / "two.json")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"format": "other/1", "units": [], "alpha": 1}, "not a tl_transplant manifest"),
        ({"format": MANIFEST_FORMAT, "alpha": 1}, "lacks units"),
        ({"format": MANIFEST_FORMAT, "units": "L0.H0", "alpha": 1}, "list of strings"),
        ({"format": MANIFEST_FORMAT, "units": [], "alpha": "x"}, "not a number"),
        ({"format": MANIFEST_FORMAT, "units": [], "alpha": 0.5}, "names no units"),
        ({"format": MANIFEST_FORMAT, "units": [], "alpha": float("inf")}, "must be finite"),
        ("L0.H0", "is a str, not an object"),
    ],
)
def test_reader_errors_name_the_record(record: object, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        read_manifest([_manifest(), record])
    assert len(read_manifest([record], check=False).transplants) == 1


def test_reader_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_manifest(tmp_path / "bad.json")
    assert read_manifest({"transplants": []}).transplants == []
    with pytest.raises(ManifestError, match="holds no transplants"):
        read_manifest({"transplants": []}, allow_empty=False)
    with pytest.raises(ManifestError, match="write_manifest takes"):
        write_manifest(tmp_path / "x.json", 3)  # type: ignore[arg-type]
