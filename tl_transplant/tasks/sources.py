"""Where tasks come from: records, local files and folders, ``datasets`` objects, the hub.

:func:`from_records` builds a :class:`~tl_transplant.tasks.task.Task` from dicts and
:func:`from_dataset` from a ``datasets.Dataset``/``DatasetDict``, a local
JSONL/JSON/CSV/TSV/parquet file, a ``save_to_disk`` folder, a folder of data files or a hub
dataset name (they are ``Task.from_records`` / ``Task.from_dataset``). A malformed record
raises naming its file line or row and the field; which extra fields a record needs
(wrong answers, choices) is the metric's to say (:attr:`Metric.needs
<tl_transplant.tasks.metrics.Metric.needs>`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tl_transplant.errors import TaskError
from tl_transplant.tasks.metrics import needs_of

if TYPE_CHECKING:
    import datasets

    from tl_transplant.tasks.task import Task

#: Local file suffixes and the ``datasets`` builder that reads each.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

# ---- record validation ---------------------------------------------------------------


def _as_text(value: Any, where: str, field_name: str) -> str:
    """A string field of a record; numbers are accepted and converted, anything else is an error."""
    if value is None:
        raise TaskError(f"{where}: field {field_name!r} is missing or null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise TaskError(
            f"{where}: field {field_name!r} must be a string, got {type(value).__name__}: "
            f"{value!r:.80}"
        )
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise TaskError(f"{where}: field {field_name!r} is empty")
    return text


def _choice_answer(
    rec: Mapping[str, Any], where: str, answer_field: str, choices_field: str, metric: str
) -> tuple[list[str], str]:
    """(choices, correct choice text) of one record of a metric that needs choices
    (``mc_logprob``); an int answer is an index."""
    if choices_field not in rec:
        raise TaskError(
            f"{where}: no field {choices_field!r} (fields: {', '.join(map(str, rec)) or 'none'}); "
            f"metric {metric!r} needs a list of choices per example"
        )
    raw = rec[choices_field]
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) < 2:
        raise TaskError(
            f"{where}: field {choices_field!r} must be a list of 2+ strings, got {raw!r:.80}"
        )
    cs = [_as_text(c, where, f"{choices_field}[{j}]") for j, c in enumerate(raw)]
    a = rec[answer_field]
    if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
        if not 0 <= int(a) < len(cs):
            raise TaskError(
                f"{where}: answer index {int(a)} is out of range for {len(cs)} choices"
            )
        return cs, cs[int(a)]
    text = _as_text(a, where, answer_field)
    if text not in cs:
        raise TaskError(
            f"{where}: answer {text!r:.40} is neither one of the choices {cs!r:.80} nor an "
            "integer index into them"
        )
    return cs, text


def _as_text_list(value: Any, where: str, field_name: str) -> list[str]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [_as_text(value, where, field_name)]
    if value is None:
        raise TaskError(f"{where}: field {field_name!r} is missing or null")
    if not isinstance(value, (list, tuple)):
        raise TaskError(
            f"{where}: field {field_name!r} must be a string or a list of strings, got "
            f"{type(value).__name__}"
        )
    if not value:
        raise TaskError(f"{where}: field {field_name!r} is an empty list")
    return [_as_text(v, where, f"{field_name}[{j}]") for j, v in enumerate(value)]




# ---- constructors -----------------------------------------------------------------


def from_records(
    cls: type[Task],
    records: Iterable[Mapping[str, Any]],
    *,
    name: str = "task",
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    wrong_field: str | None = "wrong_answers",
    choices_field: str = "choices",
    row_label: Callable[[int], str] | None = None,
    **kwargs: Any,
) -> Task:
    """Build a ``cls`` (a :class:`Task` class) from dicts; a malformed record raises naming
    its row and field (this is ``Task.from_records``).

    ``wrong_field`` is read when present (a string or a list of strings) and is
    required when the metric needs wrong answers (``logit_diff``). When it needs choices
    (``mc_logprob``) each record needs ``choices_field`` (a list of strings) and its answer
    is the correct choice's text or, when the answer is an integer, its 0-based index.
    Numbers are accepted as text. Other keyword arguments go to :class:`Task` (``metric``,
    ``max_new_tokens``, ...). ``row_label`` (e.g. ``"line 7"``) is kept in
    ``meta["row_labels"]`` so later errors (``Task.check_context``) name the source row.
    """
    label = row_label or (lambda i: f"record {i}")
    metric = kwargs.get("metric", "next_token_acc")
    needs = needs_of(metric)
    prompts: list[str] = []
    answers: list[str] = []
    wrongs: list[list[str]] = []
    choices: list[list[str]] = []
    labels: list[str] = []
    any_wrong = False
    for i, rec in enumerate(records):
        where = f"task {name!r}: {label(i)}"
        if not isinstance(rec, Mapping):
            raise TaskError(f"{where}: expected a mapping of fields, got {type(rec).__name__}")
        for f in (prompt_field, answer_field):
            if f not in rec:
                raise TaskError(
                    f"{where}: no field {f!r} (fields: {', '.join(map(str, rec)) or 'none'})"
                )
        prompts.append(_as_text(rec[prompt_field], where, prompt_field))
        if "choices" in needs:
            cs, a = _choice_answer(rec, where, answer_field, choices_field, metric)
            choices.append(cs)
            answers.append(a)
        else:
            answers.append(_as_text(rec[answer_field], where, answer_field))
        labels.append(label(i))
        w = rec.get(wrong_field) if wrong_field else None
        if w is None:
            if "wrong_answers" in needs:
                raise TaskError(
                    f"{where}: field {wrong_field!r} is missing or null; metric {metric!r} "
                    "needs wrong answers for every example"
                )
            wrongs.append([])
        else:
            any_wrong = True
            wrongs.append(_as_text_list(w, where, str(wrong_field)))
    if not prompts:
        raise TaskError(f"task {name!r}: no records")
    # Wrong answers are kept only when every record has them (a metric needing them checks).
    wrong_answers = wrongs if any_wrong and all(wrongs) else None
    if row_label is not None:
        kwargs["meta"] = {**dict(kwargs.get("meta") or {}), "row_labels": labels}
    return cls(
        name=name,
        prompts=prompts,
        answers=answers,
        wrong_answers=wrong_answers,
        choices=choices if "choices" in needs else None,
        **kwargs,
    )

def from_dataset(
    cls: type[Task],
    data: datasets.Dataset | datasets.DatasetDict | str | Path,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    *,
    split: str = "train",
    config_name: str | None = None,
    name: str | None = None,
    wrong_field: str | None = "wrong_answers",
    choices_field: str = "choices",
    limit: int | None = None,
    **kwargs: Any,
) -> Task:
    """Build a ``cls`` (a :class:`Task` class) from a ``datasets.Dataset``/``DatasetDict``, a
    local file or folder, or a hub dataset name (this is ``Task.from_dataset``).

    A string or path is resolved in this order:

    1. an existing file: by suffix, ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet``
       read with ``datasets.load_dataset`` (the single file is its ``"train"``
       split; slices such as ``"train[:50]"`` work). Errors name the JSONL line,
       or the row for other formats; a file that is not UTF-8 names its byte/line;
    2. an existing folder written by ``save_to_disk`` (``dataset_info.json`` +
       ``state.json``, or a ``DatasetDict``'s ``dataset_dict.json``): read with
       ``datasets.load_from_disk``; ``split`` picks a DatasetDict's split;
    3. any other existing folder (data files, or a hub repo laid out locally,
       e.g. ``data/test-00000-of-00001.parquet``): ``datasets.load_dataset(folder,
       config_name, split=split)``;
    4. otherwise a hub name (``HuggingFaceH4/MATH-500``):
       ``datasets.load_dataset(name, config_name, split=split)``, an error saying
       to download it first when that fails (offline, unknown name).

    ``config_name`` is ``load_dataset``'s second argument (a dataset's subset).
    ``limit`` keeps the first N rows.
    """
    import datasets

    label: Callable[[int], str] = lambda i: f"row {i}"  # noqa: E731
    source = "datasets"
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser()
        source = str(data)
        if path.is_file():
            name = name or path.stem
            try:
                ds, label = _load_local(path, split)
            except _JsonlLoadError as e:
                # datasets could not build a table; our own per-line check names the culprit.
                bad_lines = e.lines
                from_records(
                    cls,
                    e.records,
                    name=name,
                    prompt_field=prompt_field,
                    answer_field=answer_field,
                    wrong_field=wrong_field,
                    choices_field=choices_field,
                    row_label=lambda i: f"line {bad_lines[i]}",
                    **{k: v for k, v in kwargs.items() if k != "meta"},
                )
                raise TaskError(str(e)) from e.__cause__
        elif path.is_dir():
            name = name or path.name
            ds = _load_folder(path, split, config_name)
        elif path.suffix.lower() in FORMATS or isinstance(data, Path) or path.is_absolute():
            raise FileNotFoundError(f"no such dataset file: {path}")
        else:
            name = name or str(data).rstrip("/").split("/")[-1]
            ds = _load_hub(str(data), split, config_name)
    elif isinstance(data, datasets.DatasetDict):
        ds = _pick_split(data, split, "dataset")
    elif isinstance(data, datasets.Dataset):
        ds = data
    else:
        raise TypeError(
            "from_dataset takes a datasets.Dataset/DatasetDict, a path to a local "
            ".jsonl/.json/.csv/.tsv/.parquet file or dataset folder, or a hub dataset name, "
            f"got {type(data).__name__}"
        )
    name = name or "dataset"
    metric = kwargs.get("metric", "next_token_acc")
    needs = needs_of(metric)
    cols = list(ds.column_names)
    for f in (prompt_field, answer_field):
        if f not in cols:
            raise TaskError(
                f"task {name!r}: the dataset has no field {f!r} (fields: {', '.join(cols)})"
            )
    if wrong_field is not None and wrong_field not in cols:
        if "wrong_answers" in needs:
            raise TaskError(
                f"task {name!r}: metric {metric!r} needs a wrong-answers field, but the "
                f"dataset has no field {wrong_field!r} (fields: {', '.join(cols)})"
            )
        wrong_field = None
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    meta = dict(kwargs.pop("meta", {}) or {})
    meta.setdefault("source", source)
    if isinstance(data, (str, Path)) and not Path(data).expanduser().is_file():
        meta.setdefault("split", split)
        if config_name is not None:
            meta.setdefault("config_name", config_name)
    meta.setdefault("fields", {"prompt": prompt_field, "answer": answer_field})
    if "choices" in needs:
        meta["fields"]["choices"] = choices_field
        if choices_field not in cols:
            raise TaskError(
                f"task {name!r}: metric {metric!r} needs a choices field, but the dataset "
                f"has no field {choices_field!r} (fields: {', '.join(cols)})"
            )
    return from_records(
        cls,
        iter(ds),
        name=name,
        prompt_field=prompt_field,
        answer_field=answer_field,
        wrong_field=wrong_field,
        choices_field=choices_field,
        row_label=label,
        meta=meta,
        **kwargs,
    )


# ---- readers -------------------------------------------------------------------------


class _JsonlLoadError(ValueError):
    """datasets failed on a JSONL file whose lines all parse; carries them for a precise error."""

    def __init__(self, msg: str, records: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(msg)
        self.records = records
        self.lines = lines


def _check_utf8(path: Path) -> str:
    """The file's text; a non-UTF-8 file raises naming its byte offset and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskError(
            f"{path}: line {line}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _pick_split(dd: datasets.DatasetDict, split: str, what: str) -> datasets.Dataset:
    if split not in dd:
        raise TaskError(f"{what} has no split {split!r} (splits: {', '.join(dd)})")
    return dd[split]


def _load_folder(path: Path, split: str, config_name: str | None) -> datasets.Dataset:
    """A ``save_to_disk`` folder (Dataset or DatasetDict), else a folder of data files."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    ):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types; name the folder
            raise TaskError(f"{path}: could not read the save_to_disk folder: {e}") from e
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, split, f"{path}")
        return loaded
    try:
        ds = datasets.load_dataset(str(path), config_name, split=split)
    except Exception as e:
        raise TaskError(
            f"{path}: could not load the folder with datasets.load_dataset (split {split!r}"
            f"{'' if config_name is None else f', config {config_name!r}'}): {e}"
        ) from e
    return ds


def _load_hub(name: str, split: str, config_name: str | None) -> datasets.Dataset:
    """``datasets.load_dataset(name, config_name, split=split)`` with an actionable error."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # offline, unknown name, bad split: all name the dataset
        raise TaskError(
            f"{name!r} is not a local file or folder, and could not load dataset {name!r} "
            f"from the hub (split {split!r}"
            f"{'' if config_name is None else f', config {config_name!r}'}): "
            f"{type(e).__name__}: {e}; download it first (datasets.load_dataset(...)"
            ".save_to_disk(DIR)) or pass a local path"
        ) from e


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int], bool]:
    """Records, their 1-based line numbers, and whether blank lines were skipped."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    blank = False
    with io.StringIO(_check_utf8(path), newline=None) as fh:  # lines as open() splits them
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                blank = True
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(
                    f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}"
                )
            records.append(obj)
            lines.append(n)
    return records, lines, blank


def _load_local(path: Path, split: str) -> tuple[Any, Callable[[int], str]]:
    import tempfile

    import datasets

    suffix = path.suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise TaskError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    extra: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if fmt in ("csv", "json"):
        _check_utf8(path)
    if suffix != ".jsonl":
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split=split, **extra)
        except Exception as e:  # datasets raises many types; name the file
            raise TaskError(f"{path}: could not read as {fmt}: {e}") from e
        if fmt == "csv":
            return ds, lambda i: f"row {i} (data row {i + 1} after the header)"
        return ds, lambda i: f"row {i}"
    records, lines, blank = _read_jsonl(path)  # validates each line first: precise errors
    if not records:
        raise TaskError(f"{path}: no records")
    with tempfile.TemporaryDirectory(prefix="tl_transplant_jsonl_") as tmp:
        src = path
        if blank:  # datasets' fallback parser trips on blank lines; give it a clean copy
            src = Path(tmp) / path.name
            src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        try:
            ds = datasets.load_dataset("json", data_files=str(src), split=split)
        except Exception as e:
            raise _JsonlLoadError(f"{path}: could not read as json: {e}", records, lines) from e
    if len(ds) == len(lines) and "[" not in split:
        return ds, lambda i: f"line {lines[i]}"
    return ds, lambda i: f"row {i}"


__all__ = ["FORMATS", "from_dataset", "from_records"]
