"""The transplant manifest: one type, one reader, one writer.

A *record* (:class:`Manifest`) says what one transplant changed: units, alpha,
model identities and the hashes of the tensors it touched. A manifest
*document* (``transplant_manifest.json``, :class:`ManifestDoc`) holds the
records applied in order, ``{"transplants": [...]}``, plus, for a model that
was itself a transplant, the records of its input as ``"history"``.

:func:`read_manifest` accepts a path (file or directory), a document or record
dict, a list of records, or a :class:`Manifest`; :func:`write_manifest` writes
a document. ``export_hf``, the pipeline, the in-memory transplant and the
out-of-core ``apply`` all go through these two, so the JSON on disk has one
shape (``json.dumps(doc, indent=2, default=str)``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "transplant_manifest.json"
MANIFEST_FORMAT = "tl_transplant.manifest/1"

_RECORD_KEYS = (
    "units",
    "kv_added",
    "alpha",
    "kv",
    "source",
    "target",
    "tensors",
    "n_params_moved",
    "n_params_target",
    "n_units_by_kind",
    "created",
    "extra",
)


class ManifestError(ValueError):
    """A manifest that cannot be read: missing, not JSON, or not a tl_transplant manifest."""


@dataclass
class Manifest:
    """What a transplant changed: units, alpha, model identities, and tensor hashes."""

    units: list[str]
    kv_added: list[str]
    alpha: float
    kv: str
    source: dict[str, Any]
    target: dict[str, Any]
    tensors: list[dict[str, Any]]
    n_params_moved: int
    n_params_target: int
    n_units_by_kind: dict[str, int]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    format: str = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction_params(self) -> float:
        return self.n_params_moved / max(1, self.n_params_target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created": self.created,
            "alpha": self.alpha,
            "kv": self.kv,
            "units": self.units,
            "kv_added": self.kv_added,
            "n_units_by_kind": self.n_units_by_kind,
            "n_params_moved": self.n_params_moved,
            "n_params_target": self.n_params_target,
            "fraction_params": self.fraction_params,
            "source": self.source,
            "target": self.target,
            "tensors": self.tensors,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """A record dict (as :meth:`to_dict` writes it) back to a Manifest."""
        if d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"not a tl_transplant manifest (format={d.get('format')!r}, expected "
                f"{MANIFEST_FORMAT!r})"
            )
        return cls(**{k: d[k] for k in _RECORD_KEYS if k in d})

    def save(self, path: str | Path) -> Path:
        """Write this one record as a bare JSON object (read back by :meth:`load`)."""
        p = Path(path)
        p.write_text(_dumps(self.to_dict()))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read one record: a bare record file, or a document holding exactly one transplant."""
        doc = read_manifest(path)
        if len(doc.transplants) != 1:
            raise ManifestError(
                f"{path} holds {len(doc.transplants)} transplants; Manifest.load reads exactly "
                "one (use read_manifest(path).manifests() for all of them)"
            )
        return cls.from_dict(doc.transplants[0])


@dataclass
class ManifestDoc:
    """A manifest document: the transplants applied in order, and the input's history."""

    transplants: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``{"transplants": [...]}``, plus ``"history"`` when there is one."""
        d: dict[str, Any] = {"transplants": self.transplants}
        if self.history:
            d["history"] = self.history
        return d

    def manifests(self) -> list[Manifest]:
        """The transplants as :class:`Manifest` objects (every record must be complete)."""
        return [Manifest.from_dict(r) for r in self.transplants]


ManifestLike = str | os.PathLike | Manifest | ManifestDoc | dict | Sequence[Any]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def _check_record(r: Any, i: int, label: str) -> None:
    """A record must name its format, units (strings) and a finite alpha."""
    if not isinstance(r, dict):
        raise ManifestError(f"{label}: transplant #{i} is a {type(r).__name__}, not an object")
    if r.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"{label}: transplant #{i} is not a tl_transplant manifest (format="
            f"{r.get('format')!r}, expected {MANIFEST_FORMAT!r})"
        )
    missing = [k for k in ("units", "alpha") if k not in r]
    if missing:
        raise ManifestError(f"{label}: transplant #{i} lacks {', '.join(missing)}")
    if not isinstance(r["units"], list) or not all(isinstance(u, str) for u in r["units"]):
        raise ManifestError(f"{label}: transplant #{i}: units must be a list of strings")
    try:
        alpha = float(r["alpha"])
    except (TypeError, ValueError):
        raise ManifestError(
            f"{label}: transplant #{i}: alpha {r['alpha']!r} is not a number"
        ) from None
    if not math.isfinite(alpha):
        raise ManifestError(f"{label}: transplant #{i}: alpha must be finite, got {alpha}")
    if not r["units"]:
        raise ManifestError(
            f"{label}: transplant #{i} names no units; a transplant moves at least one unit"
        )


def read_manifest(
    manifest: ManifestLike, *, check: bool = True, allow_empty: bool = True
) -> ManifestDoc:
    """Read a manifest from a file or directory, a document/record dict, a list or a Manifest.

    A file may hold one record or a document ``{"transplants": [...], "history": [...]}``
    as :func:`write_manifest` writes it. ``check=True`` validates each record
    (format, units, a finite alpha) and raises :class:`ManifestError` naming the
    bad one; ``check=False`` takes the records as they are. ``allow_empty=False``
    refuses a manifest without transplants. Records are returned as dict copies.
    """
    data: Any = manifest
    label = "manifest"
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest).expanduser()
        label = f"manifest {path}"
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{label} does not exist") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{label} is not valid JSON ({e})") from e
    if isinstance(data, ManifestDoc):
        data = data.to_dict()
    if isinstance(data, Manifest):
        data = data.to_dict()
    history: list[Any] = []
    if isinstance(data, dict) and "transplants" in data:
        history = list(data.get("history") or [])
        data = data["transplants"]
    items = data if isinstance(data, (list, tuple)) else [data]
    records = [m.to_dict() if isinstance(m, Manifest) else m for m in items]
    if not records and not allow_empty:
        raise ManifestError(f"{label} holds no transplants")
    if check:
        for i, r in enumerate(records):
            _check_record(r, i, label)
    return ManifestDoc(
        [dict(r) if isinstance(r, dict) else r for r in records],
        [dict(r) if isinstance(r, dict) else r for r in history],
    )


def manifest_document(manifest: ManifestLike) -> dict[str, Any]:
    """The JSON document for ``manifest``, as :func:`write_manifest` writes it.

    A document dict (one with ``"transplants"``) is kept as it is, other keys
    included; a record, a :class:`Manifest` or a list of them is wrapped.
    """
    if isinstance(manifest, ManifestDoc):
        return manifest.to_dict()
    if isinstance(manifest, Manifest):
        return {"transplants": [manifest.to_dict()]}
    if isinstance(manifest, dict):
        return manifest if "transplants" in manifest else {"transplants": [manifest]}
    if isinstance(manifest, (list, tuple)):
        return {"transplants": [m.to_dict() if isinstance(m, Manifest) else m for m in manifest]}
    raise ManifestError(
        "write_manifest takes a Manifest, a ManifestDoc, a record or document dict, or a list "
        f"of records; got {type(manifest).__name__}"
    )


def write_manifest(path: str | os.PathLike[str], manifest: ManifestLike) -> Path:
    """Write ``manifest`` as a document; ``path`` is a file, or a directory to hold
    ``transplant_manifest.json``. Returns the file written."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    p.write_text(_dumps(manifest_document(manifest)))
    return p


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestDoc",
    "ManifestError",
    "ManifestLike",
    "manifest_document",
    "read_manifest",
    "write_manifest",
]
