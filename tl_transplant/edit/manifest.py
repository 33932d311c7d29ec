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

A weight-level transplant (a :class:`~tl_transplant.edit.weights.WeightMask`) has no
units: its record holds ``"units": []`` and a ``"weights"`` object naming the mask
file that lies next to the JSON::

    "weights": {"file": "weights-<first 16 hex of mask_sha256>.safetensors",
                "sha256": "<SHA-256 of that file>", "mask_sha256": "<WeightMask.sha256>",
                "n_params": 1234, "tensors": {"model.layers.0.mlp.up_proj.weight": 1000, ...}}

The file is the mask's packed bits (:meth:`WeightMask.file_bytes`, canonical, so
its SHA-256 is known before it is written). :func:`write_manifest` writes each
mask file beside the JSON; :func:`read_manifest` reads it back from beside the
JSON, checks both digests and keeps the mask in memory (``Manifest.mask``,
``ManifestDoc.masks``); the mask itself is never in the JSON.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from tl_transplant.edit.weights import WeightMask

MANIFEST_NAME = "transplant_manifest.json"
MANIFEST_FORMAT = "tl_transplant.edit.manifest/1"

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
    "weights",
)
#: How a mask file next to a manifest is named: ``weights-<16 hex of the mask digest>``.
MASK_FILE_RE = re.compile(r"^weights-[0-9a-f]{16}\.safetensors$")


class ManifestError(TLTransplantError, ValueError):
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
    #: A weight-level transplant's mask file entry (see the module docstring); None for units.
    weights: dict[str, Any] | None = None
    #: The weight mask itself (in memory only; written to ``weights["file"]``).
    mask: WeightMask | None = field(default=None, repr=False, compare=False)

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
            **({"weights": self.weights} if self.weights is not None else {}),
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

    @classmethod
    def for_mask(cls, mask: WeightMask, **fields: Any) -> Manifest:
        """A weight-level record: no units, ``weights`` naming ``mask``'s file, ``mask`` kept."""
        return cls(units=[], kv_added=[], weights=mask_entry(mask), mask=mask, **fields)

    def save(self, path: str | Path) -> Path:
        """Write this one record as a bare JSON object (read back by :meth:`load`); a mask
        file is written next to it."""
        p = Path(path)
        d = self.to_dict()
        _write_masks(p.parent, [d], _masks_of(self))
        p.write_text(_dumps(d))
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
        return doc.manifests()[0]


def mask_entry(mask: WeightMask) -> dict[str, Any]:
    """The ``weights`` object of a record for ``mask``."""
    return {
        "file": f"weights-{mask.sha256[:16]}.safetensors",
        "sha256": mask.file_sha256,
        "mask_sha256": mask.sha256,
        "n_params": mask.n_params,
        "tensors": mask.counts(),
    }


@dataclass
class ManifestDoc:
    """A manifest document: the transplants applied in order, and the input's history.

    ``masks`` holds the weight masks of weight-level records (keyed by their
    ``weights["mask_sha256"]``): read from the files next to a manifest, or taken from
    in-memory :class:`Manifest` objects; never part of the JSON.
    """

    transplants: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, WeightMask] = field(default_factory=dict, repr=False, compare=False)

    def mask_of(self, record: dict[str, Any]) -> WeightMask | None:
        """The weight mask of a weight-level record, if it is at hand (None for units)."""
        w = record.get("weights") if isinstance(record, dict) else None
        return self.masks.get(str(w.get("mask_sha256"))) if isinstance(w, dict) else None

    def to_dict(self) -> dict[str, Any]:
        """``{"transplants": [...]}``, plus ``"history"`` when there is one."""
        d: dict[str, Any] = {"transplants": self.transplants}
        if self.history:
            d["history"] = self.history
        return d

    def manifests(self) -> list[Manifest]:
        """The transplants as :class:`Manifest` objects (every record must be complete)."""
        out = []
        for r in self.transplants:
            m = Manifest.from_dict(r)
            m.mask = self.mask_of(r)
            out.append(m)
        return out


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
    w = r.get("weights")
    if w is not None:
        _check_weights(w, f"{label}: transplant #{i}")
        if r["units"]:
            raise ManifestError(
                f"{label}: transplant #{i} names units and a weight mask; a record is either "
                "unit-level (units) or weight-level (weights, with units: [])"
            )
    elif not r["units"]:
        raise ManifestError(
            f"{label}: transplant #{i} names no units; a transplant moves at least one unit"
        )
    _check_types(r, f"{label}: transplant #{i}")


#: Keys a record may hold: its fields, and what writers add (``fraction_params``, the
#: export's ``reversible_context``).
RECORD_KEYS = frozenset({*_RECORD_KEYS, "format", "fraction_params", "reversible_context"})
#: Keys a manifest document may hold at its top level (``note``: free text for people).
DOCUMENT_KEYS = frozenset({"transplants", "history", "note"})
_TYPES: dict[str, tuple[type, str]] = {
    "source": (dict, "an object (the model's identity)"),
    "target": (dict, "an object (the model's identity)"),
    "tensors": (list, "a list of tensor objects"),
    "kv_added": (list, "a list of unit strings"),
    "kv": (str, "'group' or 'none'"),
    "n_units_by_kind": (dict, "an object of counts"),
    "extra": (dict, "an object"),
    "created": (str, "a date string"),
    "n_params_moved": (int, "an integer"),
    "n_params_target": (int, "an integer"),
    "fraction_params": ((int, float), "a number"),  # type: ignore[dict-item]
    "reversible_context": (bool, "true or false"),
}


def _is(v: Any, t: type | tuple[type, ...]) -> bool:
    return isinstance(v, t) and not (isinstance(v, bool) and t in (int, (int, float)))


def _check_types(r: dict[str, Any], where: str) -> None:
    """Every key of a record known and of its type, so a bad hand edit is named here, not
    met as an AttributeError deep inside an apply."""
    unknown = sorted(set(map(str, r)) - RECORD_KEYS)
    if unknown:
        raise ManifestError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a record holds only "
            f"{', '.join(sorted(RECORD_KEYS))} (a misspelt key would be ignored, so it is refused)"
        )
    for key, (t, what) in _TYPES.items():
        if key in r and r[key] is not None and not _is(r[key], t):
            raise ManifestError(f"{where}: {key} must be {what}, got {_kind(r[key])}")
    if not all(isinstance(u, str) for u in r.get("kv_added") or []):
        raise ManifestError(f"{where}: kv_added must be a list of unit strings")
    for j, row in enumerate(r.get("tensors") or []):
        at = f"{where}: tensors[{j}]"
        if not isinstance(row, dict):
            raise ManifestError(f"{at} must be an object with name, shape, ..., got {_kind(row)}")
        if not isinstance(row.get("name"), str):
            raise ManifestError(f"{at}: name must be the tensor's name (a string)")
        shape = row.get("shape")
        if shape is not None and not (isinstance(shape, list)
                                      and all(_is(d, int) and d >= 0 for d in shape)):
            raise ManifestError(f"{at}: shape must be a list of sizes like [576, 576], "
                                f"got {_kind(shape)}")
        for key in ("sha256", "sha256_before", "dtype"):
            if key in row and not isinstance(row[key], str):
                raise ManifestError(f"{at}: {key} must be a string, got {_kind(row[key])}")


def _kind(v: Any) -> str:
    """``the str 'x'`` / ``the int 7``: what a value is, cut short."""
    text = repr(v) if isinstance(v, (str, int, float, bool)) or v is None else ""
    return f"the {type(v).__name__} {text[:40]}".rstrip()


def _check_weights(w: Any, where: str) -> None:
    """A record's ``weights`` object: a bare mask file name and the two digests."""
    if not isinstance(w, dict):
        raise ManifestError(f"{where}: weights must be an object, got {type(w).__name__}")
    missing = [k for k in ("file", "sha256", "mask_sha256") if not isinstance(w.get(k), str)]
    if missing:
        raise ManifestError(f"{where}: weights lacks {', '.join(missing)} (strings)")
    f = w["file"]
    if Path(f).name != f or f in ("", ".", "..") or "\\" in f:
        raise ManifestError(
            f"{where}: weights file {f!r} must be a bare file name (it lies next to the manifest)"
        )


def _masks_of(obj: Any) -> dict[str, WeightMask]:
    """The in-memory weight masks an argument of read/write_manifest carries."""
    if isinstance(obj, ManifestDoc):
        return dict(obj.masks)
    if isinstance(obj, Manifest):
        return {obj.mask.sha256: obj.mask} if obj.mask is not None else {}
    if isinstance(obj, (list, tuple)):
        out: dict[str, WeightMask] = {}
        for m in obj:
            out.update(_masks_of(m) if isinstance(m, Manifest) else {})
        return out
    return {}


def _load_masks(records: list[Any], root: Path, label: str) -> dict[str, WeightMask]:
    """Read and check the mask file of every weight-level record from ``root``."""
    from tl_transplant.edit.weights import WeightMask, WeightMaskError

    out: dict[str, WeightMask] = {}
    for i, r in enumerate(records):
        w = r.get("weights") if isinstance(r, dict) else None
        if w is None:
            continue
        _check_weights(w, f"{label}: transplant #{i}")
        if w["mask_sha256"] in out:
            continue
        p = root / w["file"]
        if not p.is_file():
            raise ManifestError(
                f"{label}: transplant #{i} is a weight-level transplant, and its mask file "
                f"{w['file']} is missing from {root}. Put the {w['file']} that was written with "
                "this manifest next to it (copy the whole directory), or write the transplant "
                "again."
            )
        try:
            mask = WeightMask.load(p, sha256=w["sha256"])
        except WeightMaskError as e:
            raise ManifestError(
                f"{label}: transplant #{i}: {e}. Restore the original {w['file']} (copy it from "
                "where the manifest was written), or write the transplant again."
            ) from None
        if mask.sha256 != w["mask_sha256"]:
            raise ManifestError(
                f"{label}: transplant #{i}: the mask in {w['file']} is not the one the record "
                "names (mask_sha256 differs); the record or the file was edited"
            )
        out[w["mask_sha256"]] = mask
    return out


def _write_masks(root: Path, records: list[Any], masks: dict[str, WeightMask]) -> None:
    """Write the mask file of every weight-level record into ``root`` (next to the JSON).

    A file already there with the recorded SHA-256 is kept; a record whose mask is not at
    hand is refused (the manifest would name a file that does not exist).
    """
    from tl_transplant.edit.weights import file_sha256

    for i, r in enumerate(records):
        w = r.get("weights") if isinstance(r, dict) else None
        if w is None:
            continue
        _check_weights(w, f"transplant #{i}")
        p = root / w["file"]
        mask = masks.get(w["mask_sha256"])
        if p.is_file() and file_sha256(p) == w["sha256"]:
            continue
        if mask is None:
            raise ManifestError(
                f"transplant #{i} is a weight-level transplant, but its mask "
                f"({w['file']}) is not at hand to write next to the manifest; pass the Manifest "
                "(or the ManifestDoc read from disk) that holds it, not a bare dict"
            )
        data = mask.file_bytes()
        if hashlib.sha256(data).hexdigest() != w["sha256"]:
            raise ManifestError(
                f"transplant #{i}: the record's weights.sha256 is not the SHA-256 of its mask "
                f"file {w['file']}; the record was edited"
            )
        p.write_bytes(data)


def read_manifest(
    manifest: ManifestLike, *, check: bool = True, allow_empty: bool = True
) -> ManifestDoc:
    """Read a manifest from a file or directory, a document/record dict, a list or a Manifest.

    A file may hold one record or a document ``{"transplants": [...], "history": [...]}``
    as :func:`write_manifest` writes it. ``check=True`` validates each record
    (format, units, a finite alpha) and raises :class:`ManifestError` naming the
    bad one; ``check=False`` takes the records as they are. ``allow_empty=False``
    refuses a manifest without transplants. Records are returned as dict copies.
    A weight-level record's mask file is read from the manifest's directory and
    checked against both digests (:class:`ManifestError` naming the file if it is
    missing or altered); the masks are in ``ManifestDoc.masks``.
    """
    data: Any = manifest
    label = "manifest"
    root: Path | None = None
    masks = _masks_of(manifest)
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest).expanduser()
        label = f"manifest {path}"
        if path.is_dir():
            path = path / MANIFEST_NAME
        root = path.parent
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
        unknown = sorted(set(map(str, data)) - DOCUMENT_KEYS)
        if unknown and check:
            raise ManifestError(
                f"{label}: unknown top-level key(s) {', '.join(map(repr, unknown))} beside "
                "transplants; a document holds only transplants, history and a note, and each "
                "transplant its own alpha, units, ... (edit transplants[i].alpha, not a "
                "top-level alpha, which would be ignored)"
            )
        if not isinstance(data["transplants"], list) or not isinstance(
                data.get("history") or [], list):
            raise ManifestError(f"{label}: transplants and history must be lists of records")
        history = list(data.get("history") or [])
        data = data["transplants"]
    items = data if isinstance(data, (list, tuple)) else [data]
    records = [m.to_dict() if isinstance(m, Manifest) else m for m in items]
    if not records and not allow_empty:
        raise ManifestError(f"{label} holds no transplants")
    if check:
        for i, r in enumerate(records):
            _check_record(r, i, label)
    if root is not None:
        masks.update(_load_masks(records, root, label))
        masks.update(_load_masks(history, root, f"{label} (history)"))
    return ManifestDoc(
        [dict(r) if isinstance(r, dict) else r for r in records],
        [dict(r) if isinstance(r, dict) else r for r in history],
        masks,
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
    ``transplant_manifest.json``. Returns the file written. The mask file of each
    weight-level record is written into the same directory."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    doc = manifest_document(manifest)
    masks = _masks_of(manifest)
    _write_masks(p.parent, list(doc.get("transplants") or []), masks)
    _write_masks(p.parent, list(doc.get("history") or []), masks)
    p.write_text(_dumps(doc))
    return p


__all__ = [
    "DOCUMENT_KEYS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MASK_FILE_RE",
    "Manifest",
    "ManifestDoc",
    "ManifestError",
    "ManifestLike",
    "RECORD_KEYS",
    "manifest_document",
    "mask_entry",
    "read_manifest",
    "write_manifest",
]
