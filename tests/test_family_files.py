"""Adding an architecture is one new file in ``tl_transplant/arch/families/``: the
walk-through's StarCoder2 block, saved as a module of a families package, is collected as
a family; a module there without ``FAMILY`` is refused; each built-in file is named after
its family."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import tl_transplant.arch.families as families_pkg
from tl_transplant.arch.families import FAMILIES, collect_families
from tl_transplant.arch.schema import FamilyLayout, LayoutMismatchError, check_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_an_architecture.md"


def _doc_family_file() -> str:
    """The doc's StarCoder2 block without the lines that register it at runtime."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    block = next(b for b in blocks if "FAMILY = FamilyLayout(" in b)
    lines = block.rstrip("\n").splitlines()
    assert lines[-1] == "register_family(FAMILY)", lines[-3:]
    return "\n".join(lines[:-3]) + "\n"


def _package(tmp_path: Path, name: str, files: dict[str, str]) -> str:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for fname, text in files.items():
        (pkg / fname).write_text(text)
    return name


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_the_doc_block_saved_as_a_file_is_a_family(on_path: Path) -> None:
    text = _doc_family_file()
    assert "register_family" not in text
    name = _package(on_path, "fams_doc", {"starcoder2.py": text, "_shared.py": "X = 1\n"})
    (fam,) = collect_families(name)
    assert isinstance(fam, FamilyLayout) and fam.family == "starcoder2"
    assert fam.model_types == ("starcoder2",) and "mlp.c_fc" in fam.linears
    check_table(fam)  # what register_family checks first


def test_a_module_without_family_is_refused(on_path: Path) -> None:
    name = _package(on_path, "fams_bad", {"notes.py": "TABLE = None\n"})
    with pytest.raises(LayoutMismatchError, match=r"fams_bad\.notes defines no FAMILY"):
        collect_families(name)


def test_each_builtin_file_is_named_after_its_family() -> None:
    folder = Path(families_pkg.__file__).parent
    files = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert [f.family for f in FAMILIES] == files
    assert {"gpt2", "gpt_neox", "llama", "olmo2", "phi3", "phi"} <= set(files)
