"""Runs that resume: the finished costly stages of :func:`tl_transplant.run`, kept beside ``--out``.

A run keeps each data-based method's scores on dev (the long stage: attribution,
learned_mask, activation patching ...) and each dev evaluation of the sweep in a staging
area ``<out>.partial/`` as soon as it finishes. An interrupted run (an exception, Ctrl-C,
SIGTERM, SIGKILL) leaves it there; ``run(..., resume=True)`` (``tl-transplant run ...
--resume``) reuses the stages whose key matches and logs what it reused. A finished run
removes the staging area, so its output is that of a run that was never interrupted.

The key (:func:`run_key`) is a SHA-256 of the normalised config, a fingerprint of every
input the run reads (the source and target directories, or a hub id's cached snapshot, and
the task files: names, sizes, and the content of files up to 4 MiB, the first and last MiB
and the modification time of larger ones) and the versions of tl_transplant, torch and
transformers. A different key reuses nothing (and says which part differs). Weight-only
scorers (``weight_diff``, ``magnitude``, ``random``, ``dare``, ``dense``) cost seconds and
are recomputed; the test-split evaluations (the chosen configuration, the controls, the
comparison) are not kept.

Stored stages are lossless: tensors in safetensors (float64 unit scores, float32 weight
scores, a weight-level method's suggested mask as indices, per-example dev scores), ``meta``
as tagged JSON (NaN, tuples and tensors kept); every stored entry is read back and compared
with what was computed, and one that does not round-trip exactly is not kept (the log says
so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tl_transplant.errors import OutputError, os_reason

if TYPE_CHECKING:
    from tl_transplant.pipeline.config import RunConfig
    from tl_transplant.pipeline.result import MethodScores
    from tl_transplant.sweeps.options import DevEval

Log = Callable[..., Any]

PARTIAL_SUFFIX = ".partial"
KEY_FILE = "key.json"
STAGE_FORMAT = "tl_transplant.stage.scores/1"
EVAL_FORMAT = "tl_transplant.stage.dev_eval/1"
_SMALL = 4 << 20  # files up to this size are hashed whole
_EDGE = 1 << 20  # of larger files: the first and last MiB (with size and mtime)


def partial_dir(out: str | Path) -> Path:
    """The staging area of the run writing ``out``: ``<out>.partial`` beside it."""
    o = Path(out).expanduser().resolve()
    return o.parent / f"{o.name}{PARTIAL_SUFFIX}"


# ---- the key -----------------------------------------------------------------------------


def _file_print(p: Path, h: Any) -> None:
    st = p.stat()
    h.update(f"{st.st_size}\0".encode())
    with p.open("rb") as f:
        if st.st_size <= _SMALL:
            h.update(f.read())
            return
        h.update(f.read(_EDGE))
        f.seek(st.st_size - _EDGE)
        h.update(f.read(_EDGE))
    h.update(f"{st.st_mtime_ns}\0".encode())


def path_fingerprint(path: str | Path) -> str:
    """SHA-256 over a file or a directory tree (relative names, sizes, contents as in the
    module docstring); a string that is not a local path (a hub id) is hashed with its
    locally cached snapshot, if any."""
    h = hashlib.sha256()
    p = Path(str(path)).expanduser()
    if p.is_file():
        _file_print(p, h)
    elif p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0".encode())
            _file_print(f, h)
    else:  # a hub id: its cached snapshot, when there is one
        h.update(f"not a local path: {path}\0".encode())
        snap = _hub_snapshot(str(path))
        if snap is not None:
            h.update(path_fingerprint(snap).encode())
    return h.hexdigest()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model (its current revision), None if not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a repo id, not cached, offline: hash the id alone
        return None


def _versions() -> str:
    import transformers

    from tl_transplant import __version__

    return f"tl_transplant {__version__}, torch {torch.__version__}, " \
           f"transformers {transformers.__version__}"


@dataclass(frozen=True)
class RunKey:
    """The parts a run's stages depend on, each a SHA-256 (``versions`` is readable)."""

    parts: dict[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()

    def differs(self, other: dict[str, str]) -> list[str]:
        """The parts that differ from ``other`` (a stored key's parts)."""
        return [k for k in sorted({*self.parts, *other}) if self.parts.get(k) != other.get(k)]


def run_key(cfg: RunConfig, inputs: Iterable[Any] = ()) -> RunKey:
    """The key of a run: its normalised config, the fingerprints of the source, the target
    and every other input path (task files), and the package versions."""
    conf = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    parts = {"config": hashlib.sha256(conf.encode()).hexdigest(),
             "source": path_fingerprint(cfg.source), "target": path_fingerprint(cfg.target),
             "versions": _versions()}
    others = sorted({str(p) for p in inputs} - {str(cfg.source), str(cfg.target)})
    h = hashlib.sha256()
    for p in others:
        h.update(f"{p}\0{path_fingerprint(p)}\0".encode())
    parts["inputs"] = h.hexdigest()
    return RunKey(parts)


# ---- lossless meta -----------------------------------------------------------------------


def _enc(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_enc(v) for v in x]
    if isinstance(x, tuple):
        return {"__tuple__": [_enc(v) for v in x]}
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.detach().cpu().tolist(), "dtype": str(x.dtype).split(".")[-1]}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        if any(k in ("__tuple__", "__tensor__") for k in x):
            raise TypeError("a meta key collides with the store's tags")
        return {k: _enc(v) for k, v in x.items()}
    raise TypeError(f"cannot store a {type(x).__name__} losslessly")


def _dec(x: Any) -> Any:
    if isinstance(x, list):
        return [_dec(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_dec(v) for v in x["__tuple__"])
        if set(x) == {"__tensor__", "dtype"}:
            return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
        return {k: _dec(v) for k, v in x.items()}
    return x


def same(a: Any, b: Any) -> bool:
    """Exact equality with NaN equal to NaN, tensors by dtype, shape and values, and
    tuples distinct from lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and bool(((a == b) | (a.isnan() & b.isnan())).all()
                         if a.is_floating_point() else torch.equal(a, b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# ---- scores <-> safetensors --------------------------------------------------------------


def _scores_payload(s: MethodScores) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from tl_transplant.scoring.weight_scores import WeightScores

    md: dict[str, str] = {"format": STAGE_FORMAT, "method": s.method,
                          "meta": json.dumps(_enc(s.meta), allow_nan=True)}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(s, WeightScores):
        md["kind"] = "weight"
        tensors.update({f"v.{n}": v.contiguous() for n, v in s.values.items()})
        if s.suggested is not None:
            md["suggested_shapes"] = json.dumps(s.suggested.shapes)
            tensors.update({f"s.{n}": i.contiguous() for n, i in s.suggested.index.items()})
        return tensors, md
    md["kind"] = "unit"
    md["units"] = json.dumps([str(u) for u in s.units])
    md["columns"] = json.dumps(list(s.columns))
    tensors["values"] = s.values.contiguous()
    if s.consistency is not None:
        tensors["consistency"] = s.consistency.contiguous()
    tensors.update({f"c.{i}": v.contiguous() for i, v in enumerate(s.columns.values())})
    return tensors, md


def _scores_from(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> MethodScores:
    from tl_transplant.edit.weights import WeightMask
    from tl_transplant.scoring.scores import Scores
    from tl_transplant.scoring.weight_scores import WeightScores

    meta = _dec(json.loads(md["meta"]))
    if md["kind"] == "weight":
        sug = None
        if "suggested_shapes" in md:
            sug = WeightMask({k[2:]: v for k, v in tensors.items() if k.startswith("s.")},
                             json.loads(md["suggested_shapes"]))
        vals = {k[2:]: v for k, v in tensors.items() if k.startswith("v.")}
        return WeightScores(vals, method=md["method"], meta=meta, suggested=sug)
    cols = json.loads(md["columns"])
    return Scores(json.loads(md["units"]), tensors["values"], method=md["method"],
                  consistency=tensors.get("consistency"),
                  columns={c: tensors[f"c.{i}"] for i, c in enumerate(cols)}, meta=meta)


def _same_scores(a: MethodScores, b: MethodScores) -> bool:
    from tl_transplant.scoring.weight_scores import WeightScores

    if type(a) is not type(b) or a.method != b.method or not same(a.meta, b.meta):
        return False
    if isinstance(a, WeightScores) and isinstance(b, WeightScores):
        sa, sb = a.suggested, b.suggested
        return (same(a.values, b.values) and (sa is None) == (sb is None)
                and (sa is None or sb is None or sa.sha256 == sb.sha256))
    return (a.units == b.units and same(a.values, b.values)  # type: ignore[union-attr]
            and same(a.consistency, b.consistency)  # type: ignore[union-attr]
            and same(a.columns, b.columns))  # type: ignore[union-attr]


# ---- dev evaluations <-> safetensors -----------------------------------------------------


def _eval_payload(value: DevEval) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    r, after = value
    md = {"format": EVAL_FORMAT, "task": r.task, "metric": r.metric, "model": r.model,
          "prepend_bos": json.dumps(r.prepend_bos),
          "generations": json.dumps(r.generations), "predictions": json.dumps(r.predictions),
          "meta": json.dumps(_enc(r.meta), allow_nan=True),
          "after": json.dumps(after, allow_nan=True)}
    return {"scores": torch.from_numpy(np.ascontiguousarray(r.scores))}, md


def _eval_from(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> DevEval:
    from tl_transplant.evaluation.evaluator import EvalResult

    r = EvalResult(task=md["task"], metric=md["metric"], model=md["model"],
                   scores=tensors["scores"].numpy(), prepend_bos=json.loads(md["prepend_bos"]),
                   generations=json.loads(md["generations"]),
                   predictions=json.loads(md["predictions"]), meta=_dec(json.loads(md["meta"])))
    return r, {str(k): float(v) for k, v in json.loads(md["after"]).items()}


def _same_eval(a: DevEval, b: DevEval) -> bool:
    ra, rb = a[0], b[0]
    return (type(ra) is type(rb) and ra.scores.dtype == rb.scores.dtype
            and bool(np.array_equal(ra.scores, rb.scores, equal_nan=True))
            and same([ra.task, ra.metric, ra.model, ra.prepend_bos, ra.generations,
                      ra.predictions, ra.meta, dict(a[1])],
                     [rb.task, rb.metric, rb.model, rb.prepend_bos, rb.generations,
                      rb.predictions, rb.meta, dict(b[1])]))


# ---- the store ---------------------------------------------------------------------------


class RunStore:
    """The staging area of one run: ``key.json`` and ``scores/<label>.safetensors``.

    Open it with :meth:`open` (which applies ``resume``/``overwrite``; the area is made
    when the first stage is kept, and one holding no stage is removed); :meth:`get` gives a
    stored method's scores (None if absent or unreadable), :meth:`put` keeps one (written
    to a temporary name, read back, compared, then renamed: a kill mid-write leaves no
    entry), :meth:`finish` removes the area after a finished run.
    """

    def __init__(self, root: Path, key: RunKey, log: Log = print) -> None:
        self.root, self.key, self.log = root, key, log
        self.reused: list[str] = []
        self.reused_evals = 0

    @classmethod
    def open(cls, out: str | Path, key: RunKey, *, resume: bool, overwrite: bool,
             log: Log = print) -> RunStore:
        """The staging area beside ``out``. An existing one is reused (``resume``, same
        key), replaced (``resume`` with another key, or ``overwrite``), or refused (an
        :class:`~tl_transplant.errors.OutputError`: neither flag given)."""
        root = partial_dir(out)
        if root.exists() and not root.is_dir():
            raise OutputError(f"{root} exists and is not a directory; tl_transplant keeps an "
                              "interrupted run's stages there: move it away")
        if root.is_dir():
            stored = cls._stored_key(root)
            what = cls._summary(root)
            if not what:  # nothing finished (a run that failed early): nothing to lose
                cls._remove(root)
            elif not resume and not overwrite:
                raise OutputError(
                    f"{root} holds an interrupted run's finished stages ({what}); pass "
                    "--resume (resume=True) to reuse those that match this run, or "
                    "--overwrite (overwrite=True) to discard them and start again")
            elif not resume:
                log(f"discarding the interrupted run's stages in {root} (--overwrite)")
                cls._remove(root)
            elif stored is None or stored.get("digest") != key.digest:
                parts = key.differs(dict((stored or {}).get("parts") or {}))
                log(f"--resume: {root} was made by a different run (its "
                    f"{', '.join(parts) or 'key'} differ{'s' if len(parts) == 1 else ''}); "
                    "reusing nothing")
                cls._remove(root)
            else:
                log(f"--resume: reusing {root} (key {key.digest[:12]}; {what})")
        elif resume:
            log(f"--resume: no interrupted run at {root}; starting from the beginning")
        return cls(root, key, log)

    def _begin(self) -> None:
        """Create the area and its ``key.json`` (on the first stage kept)."""
        (self.root / "scores").mkdir(parents=True, exist_ok=True)
        kf = self.root / KEY_FILE
        if not kf.is_file():
            tmp = self.root / f".{KEY_FILE}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"digest": self.key.digest, "parts": self.key.parts},
                                      indent=1))
            tmp.replace(kf)

    @staticmethod
    def _labels(root: Path) -> list[str]:
        return sorted(p.stem for p in (root / "scores").glob("*.safetensors"))

    @staticmethod
    def _n_evals(root: Path) -> int:
        return len(list((root / "dev").glob("*.safetensors")))

    @classmethod
    def _summary(cls, root: Path) -> str:
        """What ``root`` holds, e.g. ``scores of attribution; 12 dev evaluations`` ("" if
        nothing)."""
        names, n = cls._labels(root), cls._n_evals(root)
        parts = ([f"scores of {', '.join(names)}"] if names else []) + (
            [f"{n} dev evaluation{'s' if n != 1 else ''}"] if n else [])
        return "; ".join(parts)

    @property
    def kept(self) -> list[str]:
        """The labels whose scores are in the area now."""
        return self._labels(self.root) if self.root.is_dir() else []

    def interrupted(self) -> None:
        """Log what an interrupted run leaves for ``--resume`` (nothing if nothing)."""
        what = self._summary(self.root) if self.root.is_dir() else ""
        if what:
            self.log(f"kept the finished stages ({what}) in {self.root}; "
                     "run again with --resume (resume=True) to reuse them")

    @staticmethod
    def _stored_key(root: Path) -> dict[str, Any] | None:
        try:
            d = json.loads((root / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    @staticmethod
    def _remove(root: Path) -> None:
        try:
            shutil.rmtree(root)
        except OSError as e:
            raise OutputError(f"cannot remove {root}: {os_reason(e)}; remove it yourself") from e

    def _path(self, label: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", label)
        return self.root / "scores" / f"{safe}.safetensors"

    def _read(self, p: Path, fmt: str, field: str, value: str,
              parse: Callable[[dict[str, torch.Tensor], dict[str, str]], Any],
              again: str) -> Any | None:
        """``parse(tensors, metadata)`` of the stage file ``p`` if it is this run's (format
        ``fmt``, ``metadata[field] == value``); None if absent, and None with a log line
        (``...; {again}``) if unreadable or not this run's."""
        from safetensors import SafetensorError, safe_open

        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                md = dict(f.metadata() or {})
                if md.get("format") != fmt or md.get(field) != value:
                    raise ValueError("not this run's stage file")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            return parse(tensors, md)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"--resume: cannot read {p.name} ({e}); {again}")
            return None

    def get(self, label: str) -> MethodScores | None:
        """The stored scores of ``label`` (logged as reused), or None."""
        p = self._path(label)
        s: MethodScores | None = self._read(p, STAGE_FORMAT, "label", label, _scores_from,
                                            f"scoring {label} again")
        if s is None:
            return None
        self.log(f"reused scores of {label} (key {self.key.digest[:12]}, {p})")
        self.reused.append(label)
        return s

    def put(self, label: str, s: MethodScores) -> bool:
        """Keep ``s`` as ``label``'s scores; False (and a log line) if it would not
        round-trip exactly or cannot be written."""
        def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            tensors, md = _scores_payload(s)
            return tensors, {**md, "label": label}

        return self._keep(self._path(label), build,
                          lambda back, md: _same_scores(s, _scores_from(back, md)),
                          f"{label}'s scores are")

    def _keep(self, p: Path,
              build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]],
              same: Callable[[dict[str, torch.Tensor], dict[str, str]], bool],
              what: str) -> bool:
        """Write what ``build`` gives to ``p`` under a temporary name, read it back, keep it
        only if ``same`` holds, then rename; False (and a log line) otherwise. Best effort:
        a stage that cannot be kept is never the reason a run fails."""
        from safetensors.torch import load_file, save_file

        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            self._begin()
            p.parent.mkdir(exist_ok=True)
            tensors, md = build()
            save_file(_unshared(tensors), str(tmp), metadata=md)
            if not same(load_file(str(tmp)), md):
                raise ValueError("its stored copy differs")
            tmp.replace(p)
        except Exception as e:  # noqa: BLE001 - best effort, see above
            tmp.unlink(missing_ok=True)
            self.log(f"note: {what} not kept for --resume ({e})")
            return False
        return True

    # ---- the sweep's dev evaluations (sweeps.options.DevStore) ----------------------------

    @staticmethod
    def _eval_name(key: tuple[Any, ...]) -> str:
        kind, what, alpha = key
        sel = what if kind == "mask" else sorted(str(u) for u in what)
        return json.dumps([kind, sel, repr(float(alpha))])

    def _eval_path(self, name: str) -> Path:
        return self.root / "dev" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.safetensors"

    def get_eval(self, key: tuple[Any, ...]) -> DevEval | None:
        """A kept dev evaluation of the configuration ``key`` (a selection key), or None."""
        name = self._eval_name(key)
        value: DevEval | None = self._read(self._eval_path(name), EVAL_FORMAT, "key", name,
                                           _eval_from, "evaluating it again")
        if value is not None:
            self.reused_evals += 1
        return value

    def put_eval(self, key: tuple[Any, ...], value: DevEval) -> bool:
        """Keep one dev evaluation (as :meth:`put`: written, read back, compared, renamed)."""
        name = self._eval_name(key)

        def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            tensors, md = _eval_payload(value)
            return tensors, {**md, "key": name}

        return self._keep(self._eval_path(name), build,
                          lambda back, md: _same_eval(value, _eval_from(back, md)),
                          "a dev evaluation is")

    def finish(self) -> None:
        """The run finished: remove the staging area (its results are in the output)."""
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["PARTIAL_SUFFIX", "RunKey", "RunStore", "partial_dir", "path_fingerprint",
           "run_key", "same"]


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each with storage of its own (safetensors refuses shared memory, e.g.
    learned_mask's values and its ``gate`` column are one tensor)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v.contiguous()
        if ptr != -1:
            seen.add(ptr)
    return out
