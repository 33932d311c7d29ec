"""Local data files for lm-eval task YAMLs, resolved next to the YAML (offline, cwd-free).

lm-eval's own way to read local files, ``dataset_path: json`` with ``dataset_kwargs:
{data_files: ...}``, hands the paths to ``datasets.load_dataset``, which resolves relative
paths against the *working directory*. A task folder that should work from anywhere (the
miniature tasks shipped in ``tl_transplant/harness/tasks/``, or a user's ``include_path``)
can instead name this loader as lm-eval's ``custom_dataset``::

    custom_dataset: !function tl_transplant.harness.data.local_files
    dataset_kwargs:
      data_files: {train: data/train.jsonl, test: data/test.jsonl}

lm-eval calls it with the task's ``metadata`` (which holds ``config_source``, the YAML's
path) and ``dataset_kwargs``; relative paths are taken from the YAML's folder. JSON lines /
JSON files become ``datasets.Dataset.from_list`` (no cache files written); CSV and parquet go
through ``datasets.load_dataset`` on the absolute path. Nothing is fetched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.harness.errors import HarnessError

if TYPE_CHECKING:
    import datasets


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise HarnessError(f"{path}: line {i} is not JSON ({e.msg})") from e
        return rows
    data = json.loads(text)
    if not isinstance(data, list):
        raise HarnessError(f"{path}: a .json data file must hold a list of records")
    return data


def _load_one(path: Path) -> datasets.Dataset:
    import datasets

    if not path.is_file():
        raise HarnessError(f"data file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = _read_rows(path)
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise HarnessError(f"{path}: expected a non-empty list of JSON objects")
        return datasets.Dataset.from_list(rows)
    kinds = {".csv": "csv", ".parquet": "parquet"}
    if path.suffix not in kinds:
        raise HarnessError(f"{path}: unsupported data file type; use .jsonl, .json, .csv, .parquet")
    return datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")


def local_files(
    data_files: Mapping[str, str] | None = None,
    config_source: str | None = None,
    **_: Any,
) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset``: ``{split: file}`` read from the task YAML's folder.

    ``config_source`` is the YAML path lm-eval's task factory records in the task metadata;
    other metadata keys are ignored.
    """
    import datasets

    if not isinstance(data_files, Mapping) or not data_files:
        raise HarnessError(
            "local_files needs dataset_kwargs: {data_files: {SPLIT: FILE, ...}} in the task YAML"
        )
    base = Path(config_source).parent if config_source and config_source != "inline" else Path()
    out = {}
    for split, f in data_files.items():
        p = Path(f).expanduser()
        out[str(split)] = _load_one(p if p.is_absolute() else base / p)
    return datasets.DatasetDict(out)


__all__ = ["local_files"]
