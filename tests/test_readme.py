"""The README's "Ten lines of Python" runs as printed (on the embedded pair, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {heading!r}"
    return m.group(1)


def test_ten_lines_of_python_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _block("## Ten lines of Python")
    assert 'export_hf(pair, "transplanted/")' in code  # the line we redirect below
    monkeypatch.chdir(tmp_path)
    ns: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    assert (tmp_path / "transplanted" / "config.json").is_file()
    res = ns["res"]
    assert res.best is not None  # type: ignore[attr-defined]
