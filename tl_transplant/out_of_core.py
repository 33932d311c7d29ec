"""Apply a transplant manifest to checkpoints on disk, without loading either model.

``apply_manifest_out_of_core(source, target, manifest, out_dir)`` (the CLI's
``tl-transplant apply``) reads the manifest's units and alpha, binds the
family layout to the target's tensor names and shapes (read from the
safetensors headers alone), and then walks the target's shards:

* a shard that no unit touches is copied byte for byte;
* a shard that holds touched tensors is copied, and each touched tensor is
  read through a memory map a few rows at a time (``CHUNK_BYTES``), blended
  with the same rows of the matching source tensor (the only source tensors
  ever read) by the rule of the in-memory path
  (:func:`tl_transplant.transplant.blend_values`), and written back in place.
  Blending keeps dtype and shape, so the shard's header, and the index json,
  keep the target's layout exactly.

Peak memory is a few chunks (target rows, source rows, a mask), not a model
and not even a whole tensor. Config, tokenizer and other small files are
copied, the manifest is written next to the weights, and everything goes
through a temporary sibling directory that is renamed into place, as in
:func:`export_hf`.

The result is bit-identical to ``apply_transplant`` + ``export_hf`` on the same
checkpoints (tensor by tensor; shard boundaries follow the target).
PyTorch ``.bin`` pickles are refused unless ``allow_pickle=True`` (loading a
pickle can run code); they are then converted to safetensors shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from tl_transplant.export import MANIFEST_NAME, commit_out_dir, prepare_out_dir
from tl_transplant.layouts import (
    LayoutMismatchError,
    ModelLayout,
    TensorSlice,
    UnsupportedArchitectureError,
    bind_layout,
    family_for,
)
from tl_transplant.transplant import MANIFEST_FORMAT, Manifest, blend_values
from tl_transplant.units import Head, KVHead, Neuron, UnitError

log = logging.getLogger(__name__)

ST_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes -> bytes per element
_ST_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_ST_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Weight files of any format: never copied as "other files" (they are the weights, or stale
# copies of them in another format, e.g. original/consolidated.pth).
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".pkl",
    ".npz",
    ".onnx",
    ".ot",
)
_MAX_HEADER = 100 * 1024 * 1024
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


ManifestLike = str | os.PathLike | Manifest | dict | Sequence[Any]


class OutOfCoreError(ValueError):
    """The checkpoints or the manifest do not allow an out-of-core transplant."""


# ---- checkpoints on disk ----------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives: file, dtype, shape and (safetensors) byte range."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int = -1  # absolute byte offsets in the file (safetensors only)
    stop: int = -1


@dataclass
class Checkpoint:
    """A model directory read from headers only: weight files, tensor entries, config."""

    root: Path
    role: str
    format: Literal["safetensors", "pickle"]
    files: list[str]
    entries: dict[str, TensorEntry]
    index: dict[str, Any] | None
    config: dict[str, Any]
    _pickle_cache: tuple[str, dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.role} checkpoint {self.root}"

    @classmethod
    def open(cls, root: str | Path, role: str, *, allow_pickle: bool = False) -> Checkpoint:
        """Read the weight index and every shard header; raise clear errors for bad files."""
        root = Path(root)
        where = f"{role} checkpoint {root}"
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise OutOfCoreError(
                f"{where} has no config.json; is it a Hugging Face model directory?"
            )
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OutOfCoreError(f"{where}: config.json is not valid JSON ({e})") from e
        names = {p.name for p in root.iterdir() if p.is_file()}
        if (
            ST_INDEX in names
            or "model.safetensors" in names
            or any(n.endswith(".safetensors") for n in names)
        ):
            return cls._open_safetensors(root, role, names, config)
        if PT_INDEX in names or any(n.endswith(".bin") for n in names):
            if not allow_pickle:
                raise OutOfCoreError(
                    f"{where} holds PyTorch pickle weights (.bin), not safetensors. Unpickling "
                    "can execute arbitrary code, so they are refused. Convert the checkpoint to "
                    "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust its "
                    "origin."
                )
            warnings.warn(
                f"{where}: loading PyTorch pickle weights (.bin). Unpickling a file can execute "
                "arbitrary code; only do this for checkpoints you trust. The output is written "
                "as safetensors.",
                UserWarning,
                stacklevel=3,
            )
            return cls._open_pickle(root, role, names, config)
        raise OutOfCoreError(
            f"{where} has no weights: no {ST_INDEX}, model.safetensors or pytorch_model*.bin "
            f"(files: {', '.join(sorted(names)) or 'none'})"
        )

    @classmethod
    def _read_index(cls, path: Path, where: str) -> dict[str, Any]:
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutOfCoreError(f"{where}: {path.name} is not valid JSON ({e})") from e
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise OutOfCoreError(f"{where}: {path.name} has no weight_map")
        return index

    @classmethod
    def _check_shards(cls, root: Path, files: list[str], index_name: str, where: str) -> None:
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise OutOfCoreError(
                f"{where} is missing {len(missing)} of the {len(files)} shards that {index_name} "
                f"names: {', '.join(missing)}. Re-download or re-save the checkpoint."
            )

    @classmethod
    def _open_safetensors(
        cls, root: Path, role: str, names: set[str], config: dict[str, Any]
    ) -> Checkpoint:
        where = f"{role} checkpoint {root}"
        index = None
        if ST_INDEX in names:
            index = cls._read_index(root / ST_INDEX, where)
            wm: dict[str, str] = index["weight_map"]
            files = list(dict.fromkeys(wm.values()))
            cls._check_shards(root, files, ST_INDEX, where)
        elif "model.safetensors" in names:
            files, wm = ["model.safetensors"], {}
        else:
            st = sorted(n for n in names if n.endswith(".safetensors"))
            if len(st) != 1:
                raise OutOfCoreError(
                    f"{where} has {len(st)} safetensors files ({', '.join(st)}) but no {ST_INDEX} "
                    "saying which tensor is in which"
                )
            files, wm = st, {}
        entries: dict[str, TensorEntry] = {}
        for f in files:
            for e in _read_st_header(root / f, where):
                if not wm or wm.get(e.name) == f:
                    entries[e.name] = e
        lost = [n for n, f in wm.items() if n not in entries]
        if lost:
            raise OutOfCoreError(
                f"{where}: {ST_INDEX} puts {lost[0]!r} (and {len(lost) - 1} more) in "
                f"{wm[lost[0]]}, but that shard does not hold it; the index and shards disagree "
                "(corrupt or mixed-up download?)"
            )
        return cls(root, role, "safetensors", files, entries, index, config)

    @classmethod
    def _open_pickle(
        cls, root: Path, role: str, names: set[str], config: dict[str, Any]
    ) -> Checkpoint:
        where = f"{role} checkpoint {root}"
        index = None
        if PT_INDEX in names:
            index = cls._read_index(root / PT_INDEX, where)
            wm: dict[str, str] = index["weight_map"]
            files = list(dict.fromkeys(wm.values()))
            cls._check_shards(root, files, PT_INDEX, where)
        elif "pytorch_model.bin" in names:
            files, wm = ["pytorch_model.bin"], {}
        else:
            raise OutOfCoreError(f"{where} has .bin files but no pytorch_model.bin or {PT_INDEX}")
        ck = cls(root, role, "pickle", files, {}, index, config)
        for f in files:
            for n, t in ck._pickle_shard(f).items():
                if isinstance(t, torch.Tensor) and (not wm or wm.get(n) == f):
                    dtype = str(t.dtype).replace("torch.", "")
                    ck.entries[n] = TensorEntry(n, f, dtype, tuple(t.shape))
        lost = [n for n in wm if n not in ck.entries]
        if lost:
            raise OutOfCoreError(
                f"{where}: {PT_INDEX} puts {lost[0]!r} in {wm[lost[0]]}, which does not hold it"
            )
        return ck

    def _pickle_shard(self, file: str) -> dict[str, Any]:
        if self._pickle_cache is not None and self._pickle_cache[0] == file:
            return self._pickle_cache[1]
        self._pickle_cache = None
        path = self.root / file
        try:
            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; all mean "bad shard"
            raise OutOfCoreError(
                f"{self.where}: cannot read {file}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(sd, dict):
            raise OutOfCoreError(f"{self.where}: {file} does not hold a state dict")
        self._pickle_cache = (file, sd)
        return sd

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: e.shape for n, e in self.entries.items()}

    def dtype_name(self, name: str) -> str:
        e = self.entries[name]
        return _ST_DTYPE_NAMES.get(e.dtype, e.dtype)

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` (along dim 0) of one tensor, read through a memory map.

        The file is mapped only for this read, so resident memory stays at the
        rows asked for, whatever the tensor's size.
        """
        e = self.entries[name]
        if self.format == "pickle":
            return self._pickle_shard(e.file)[name][r0:r1].detach().clone()
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.root / e.file), framework="pt", device="cpu") as f:
                return f.get_slice(name)[r0:r1]
        except (SafetensorError, OSError) as err:
            raise OutOfCoreError(f"{self.where}: cannot read {name} from {e.file}: {err}") from err


def _read_st_header(path: Path, where: str) -> list[TensorEntry]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""

    def corrupt(why: str) -> OutOfCoreError:
        return OutOfCoreError(
            f"{where}: shard {path.name} is corrupt or truncated: {why}. Re-download or re-save it."
        )

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise corrupt(f"the file has {size} bytes, less than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise corrupt(f"header length {n} does not fit in the {size}-byte file")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    base = 8 + n
    out: list[TensorEntry] = []
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(x) for x in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise corrupt(f"the header entry for {name!r} is malformed") from err
        if dtype not in _ST_ITEMSIZE:
            raise corrupt(f"{name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if b < 0 or e - b != nbytes:
            raise corrupt(f"{name!r} spans bytes {b}:{e}, which does not fit {dtype}{list(shape)}")
        if base + e > size:
            raise corrupt(f"{name!r} ends at byte {base + e}, past the end of the {size}-byte file")
        end = max(end, e)
        out.append(TensorEntry(name, path.name, dtype, shape, base + b, base + e))
    if base + end != size:
        raise corrupt(f"{size - base - end} bytes follow the last tensor")
    return out


def resolve_checkpoint(
    spec: str | os.PathLike[str],
    role: str = "model",
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local directory as is, or a hub id resolved to its snapshot (weights + small files)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.resolve()
    text = str(spec)
    if isinstance(spec, os.PathLike) or text.startswith((".", "/", "~")) or p.exists():
        raise OutOfCoreError(f"{role}: {text!r} is not a model directory")
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        path = Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, **kwargs))
        if allow_pickle and not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(text, allow_patterns=["*.bin", "*.json"], **kwargs))
    except Exception as e:  # noqa: BLE001 - hub errors are many; report which spec failed
        raise OutOfCoreError(
            f"{role}: {text!r} is not a local directory, and the hub (or its cache, when offline) "
            f"could not provide it: {type(e).__name__}: {e}"
        ) from e
    return path


# ---- binding the manifest to the checkpoints --------------------------------------------


def _raw_config(ck: Checkpoint) -> Any:
    """config.json as attributes: enough for the dims, without importing transformers."""
    return SimpleNamespace(**ck.config)


def _auto_config(ck: Checkpoint) -> Any:
    """The config as transformers reads it (class defaults filled in, composite configs)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(ck.root), local_files_only=True)


def _check_dims(layout: ModelLayout) -> None:
    """The dims must tile the stored tensors exactly: the last head, KV group and neuron end
    where their tensors end, and there is no layer past the last."""
    d = layout.dims
    reach: dict[tuple[str, int], int] = {}
    for u in (Head(0, d.H - 1), KVHead(0, d.KV - 1), Neuron(0, d.I - 1)):
        for s in layout.slices(u):
            reach[(s.param, s.dim)] = max(reach.get((s.param, s.dim), 0), s.stop)
    for (param, dim), stop in reach.items():
        if stop != layout.shapes[param][dim]:
            raise LayoutMismatchError(
                f"the config's dims (heads={d.H}, kv_heads={d.KV}, head_dim={d.dh}, "
                f"d_mlp={d.I}) reach {stop} of the {layout.shapes[param][dim]} entries of "
                f"{param} along dim {dim}"
            )
    extra = layout.prefix(d.n_layers)
    if any(n.startswith(extra) for n in layout.shapes):
        raise LayoutMismatchError(
            f"the checkpoint has tensors under {extra!r} but the config says {d.n_layers} layers"
        )


def _bind_with(
    config: Any, shapes: dict[str, tuple[int, ...]]
) -> tuple[ModelLayout, dict[str, str]]:
    try:
        layout, rename = bind_layout(config, shapes), {n: n for n in shapes}
    except LayoutMismatchError:
        # Checkpoints saved from the base model lack its prefix (GPT-2's h.0... on the hub).
        prefix = family_for(config.model_type).layer_prefix.split(".")[0] + "."
        if any(n.startswith(prefix) for n in shapes):
            raise
        layout = bind_layout(config, {prefix + n: s for n, s in shapes.items()})
        rename = {prefix + n: n for n in shapes}
    _check_dims(layout)
    return layout, rename


def bind_checkpoint(ck: Checkpoint) -> tuple[ModelLayout, dict[str, str]]:
    """Bind the family layout to a checkpoint's stored names and shapes.

    Returns the layout (over HF model names) and a map model name -> stored
    name, which differ only for checkpoints saved without the base-model
    prefix (e.g. GPT-2's ``h.0.attn...`` for ``transformer.h.0.attn...``).
    The dims come from config.json directly when they tile the stored shapes
    exactly, else from transformers' ``AutoConfig`` (class defaults filled in).
    """
    model_type = ck.config.get("model_type")
    if not model_type:
        raise OutOfCoreError(f"{ck.where}: config.json has no model_type")
    try:
        family_for(model_type)
    except UnsupportedArchitectureError as e:
        raise OutOfCoreError(f"{ck.where}: {e}") from e
    shapes = ck.shapes()
    last: Exception | None = None
    for make in (_raw_config, _auto_config):
        try:
            return _bind_with(make(ck), shapes)
        except (LayoutMismatchError, TypeError, ValueError, KeyError, OSError) as e:
            last = e
    raise OutOfCoreError(f"{ck.where}: {last}") from last


@dataclass
class _RecordPlan:
    """One manifest record resolved against the checkpoints."""

    number: int
    alpha: float
    slices: dict[str, list[TensorSlice]]  # model tensor name -> slices it blends
    rows: dict[str, dict[str, Any]]  # model tensor name -> the manifest's tensor row


def load_manifest_records(
    manifest: ManifestLike,
) -> list[dict[str, Any]]:
    """Manifest records from a file, a :class:`Manifest`, a dict or a list (applied in order).

    A file may hold one manifest or ``{"transplants": [...]}`` as ``export_hf`` writes it.
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
            raise OutOfCoreError(f"{label} does not exist") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutOfCoreError(f"{label} is not valid JSON ({e})") from e
    if isinstance(data, Manifest):
        data = data.to_dict()
    if isinstance(data, dict) and "transplants" in data:
        data = data["transplants"]
    items = data if isinstance(data, (list, tuple)) else [data]
    records = [m.to_dict() if isinstance(m, Manifest) else m for m in items]
    if not records:
        raise OutOfCoreError(f"{label} holds no transplants")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise OutOfCoreError(f"{label}: transplant #{i} is a {type(r).__name__}, not an object")
        if r.get("format") != MANIFEST_FORMAT:
            raise OutOfCoreError(
                f"{label}: transplant #{i} is not a tl_transplant manifest (format="
                f"{r.get('format')!r}, expected {MANIFEST_FORMAT!r})"
            )
        missing = [k for k in ("units", "alpha") if k not in r]
        if missing:
            raise OutOfCoreError(f"{label}: transplant #{i} lacks {', '.join(missing)}")
        if not isinstance(r["units"], list) or not all(isinstance(u, str) for u in r["units"]):
            raise OutOfCoreError(f"{label}: transplant #{i}: units must be a list of strings")
        try:
            alpha = float(r["alpha"])
        except (TypeError, ValueError):
            raise OutOfCoreError(
                f"{label}: transplant #{i}: alpha {r['alpha']!r} is not a number"
            ) from None
        if not math.isfinite(alpha):
            raise OutOfCoreError(f"{label}: transplant #{i}: alpha must be finite, got {alpha}")
    return [dict(r) for r in records]


def _plan_record(
    i: int, rec: dict[str, Any], layout: ModelLayout, tgt: Checkpoint, rename: dict[str, str]
) -> _RecordPlan:
    fam = (rec.get("target") or {}).get("family")
    if fam and fam != layout.family.family:
        raise OutOfCoreError(
            f"manifest transplant #{i} was made for a {fam}-family model, but {tgt.where} is "
            f"{layout.model_type} ({layout.family.family} family)"
        )
    units = []
    for text in [*rec["units"], *rec.get("kv_added", [])]:
        try:
            units.append(layout.validate(text))
        except UnitError as e:
            raise OutOfCoreError(
                f"manifest transplant #{i} names unit {text!r}, which {tgt.where} lacks: {e}"
            ) from e
    if "kv_added" not in rec and rec.get("kv", "group") == "group":
        # A hand-written manifest: add KV groups of query heads as plan_transplant does.
        units += [layout.kv_group_of(u) for u in units if isinstance(u, Head)]
    slices: dict[str, list[TensorSlice]] = {}
    for unit in dict.fromkeys(units):
        try:
            parts = layout.slices(unit)
        except LayoutMismatchError as e:
            raise OutOfCoreError(
                f"manifest transplant #{i} names unit {unit}, which {tgt.where} lacks: {e}"
            ) from e
        for s in parts:
            slices.setdefault(s.param, []).append(s)
    rows: dict[str, dict[str, Any]] = {}
    for row in rec.get("tensors", []):
        name = row.get("name")
        if name not in slices:
            raise OutOfCoreError(
                f"manifest transplant #{i} lists tensor {name!r} as changed, but its units do not "
                "touch it in this checkpoint; the manifest does not match this model (or was "
                "edited by hand)"
            )
        have = tgt.entries[rename[name]].shape
        if "shape" in row and tuple(row["shape"]) != have:
            raise OutOfCoreError(
                f"manifest transplant #{i} records {name} with shape {tuple(row['shape'])}, but "
                f"{tgt.where} stores it with shape {have}; the manifest was made for another model"
            )
        rows[name] = row
    return _RecordPlan(i, float(rec["alpha"]), slices, rows)


def _check_pair(
    ls: ModelLayout,
    lt: ModelLayout,
    src: Checkpoint,
    tgt: Checkpoint,
    rs: dict[str, str],
    rt: dict[str, str],
) -> None:
    """The out-of-core twin of ``check_compatible``: same family, dims and unit-tensor shapes."""
    if ls.family.family != lt.family.family:
        raise OutOfCoreError(
            f"source is a {ls.model_type} ({ls.family.family} family) but target is a "
            f"{lt.model_type} ({lt.family.family} family); transplants need the same architecture"
        )
    for n in lt.unit_tensors():
        if n not in rs:
            raise OutOfCoreError(f"{src.where} has no tensor {n!r}, which the target has")
        ss, st = src.entries[rs[n]].shape, tgt.entries[rt[n]].shape
        if ss != st:
            raise OutOfCoreError(
                f"shapes differ: tensor {n!r} has shape {ss} in the source but {st} in the "
                "target; the models must share layer count, head counts and widths"
            )
    extra = set(ls.unit_tensors()) - set(lt.unit_tensors())
    if extra:
        raise OutOfCoreError(f"{src.where} has tensor {sorted(extra)[0]!r}, which the target lacks")


# ---- the blend, one tensor at a time ----------------------------------------------------


_WHEN = {"sha256_before": "before", "sha256": "after"}
CHUNK_BYTES = 2 * 2**20  # rows of a tensor are blended this many bytes at a time


def _chunk_mask(parts: list[TensorSlice], shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
    """The transplant mask restricted to rows ``r0:r1`` (``shape`` is the chunk's shape)."""
    m = torch.zeros(shape, dtype=torch.bool)
    for s in parts:
        if s.dim == 0:
            a, b = max(s.start, r0), min(s.stop, r1)
            if a < b:
                m[a - r0 : b - r0] = True
        else:
            m.narrow(s.dim, s.start, s.size).fill_(True)
    return m


def _tensor_bytes(t: torch.Tensor) -> Any:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@dataclass
class _Blender:
    """Blends target tensors with the source, a chunk of rows at a time, checking hashes."""

    src: Checkpoint
    src_names: dict[str, str]
    plans: list[_RecordPlan]
    mismatches: list[str] = field(default_factory=list)

    @torch.no_grad()
    def blend(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        row_bytes: int,
        read_rows: Callable[[int, int], torch.Tensor],
        write_rows: Callable[[int, torch.Tensor], None],
    ) -> None:
        """Apply every record that touches tensor ``name``, in order, chunk by chunk.

        ``read_rows(r0, r1)`` gives target rows, ``write_rows(r0, chunk)`` takes the
        result. The blend is elementwise, so chunks give the bits of the whole-tensor
        in-memory blend; the manifest's sha256 of each stage is taken over the chunks
        in order, which is the tensor's byte stream.
        """
        plans = [p for p in self.plans if p.slices.get(name)]
        if not shape:
            raise OutOfCoreError(f"internal: 0-dim tensor {name} cannot hold a unit")
        hashers: dict[tuple[int, str], Any] = {}
        for p in plans:
            row = p.rows.get(name, {})
            if row.get("dtype") and row["dtype"] != dtype:
                self.mismatches.append(
                    f"transplant #{p.number}: {name} is {row['dtype']} in the manifest but "
                    f"{dtype} in the checkpoint; hashes not compared"
                )
                continue
            for when in ("sha256_before", "sha256"):
                if row.get(when):
                    hashers[(p.number, when)] = hashlib.sha256()
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            t = read_rows(r0, r1)
            s_rows: torch.Tensor | None = None
            for p in plans:
                if (h := hashers.get((p.number, "sha256_before"))) is not None:
                    h.update(_tensor_bytes(t))
                mask = _chunk_mask(p.slices[name], tuple(t.shape), r0, r1)
                if mask.any():
                    if s_rows is None:
                        s_rows = self.src.read_rows(self.src_names[name], r0, r1)
                    if mask.all():  # whole rows (e.g. a whole linear): skip the gathers
                        t.copy_(blend_values(name, t, s_rows, p.alpha))
                    else:
                        t[mask] = blend_values(name, t[mask], s_rows[mask], p.alpha)
                if (h := hashers.get((p.number, "sha256"))) is not None:
                    h.update(_tensor_bytes(t))
            write_rows(r0, t)
        for (number, when), h in hashers.items():
            plan = next(p for p in plans if p.number == number)
            if h.hexdigest() != plan.rows[name][when]:
                self.mismatches.append(
                    f"transplant #{number}: {name} {_WHEN[when]} the blend does not match the "
                    f"manifest's {when}"
                )


# ---- writing ----------------------------------------------------------------------------


def _write_safetensors_shards(
    tgt: Checkpoint, touched: dict[str, str], blend: _Blender, tmp: Path
) -> dict[str, int]:
    """Copy each shard; rewrite touched tensors' bytes in place (header unchanged)."""
    by_file: dict[str, list[str]] = {}
    for model_name, stored in touched.items():
        by_file.setdefault(tgt.entries[stored].file, []).append(model_name)
    for f in tgt.files:
        shutil.copyfile(tgt.root / f, tmp / f)
        names = by_file.get(f, [])
        if not names:
            continue
        with open(tmp / f, "r+b") as fh:
            for model_name in names:
                e = tgt.entries[touched[model_name]]
                row_bytes = (e.stop - e.start) // max(1, e.shape[0]) if e.shape else 0

                def write(r0: int, chunk: torch.Tensor, e: TensorEntry = e, rb: int = row_bytes):
                    data = _tensor_bytes(chunk)
                    if data.nbytes != chunk.shape[0] * rb:  # the blend keeps dtype and shape
                        raise OutOfCoreError(f"internal: {e.name} changed size while blending")
                    fh.seek(e.start + r0 * rb)
                    fh.write(memoryview(data))

                blend.blend(
                    model_name,
                    e.shape,
                    tgt.dtype_name(e.name),
                    row_bytes,
                    lambda r0, r1, n=e.name: tgt.read_rows(n, r0, r1),
                    write,
                )
    if tgt.index is not None:
        index = dict(tgt.index)
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(e.stop - e.start for e in tgt.entries.values())
        index["metadata"] = meta
        (tmp / ST_INDEX).write_text(json.dumps(index, indent=2))
    return {"shards": len(tgt.files), "shards_rewritten": len(by_file)}


def _st_name(pickle_file: str) -> str:
    stem = pickle_file[: -len(".bin")] if pickle_file.endswith(".bin") else pickle_file
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def _write_pickle_shards(
    tgt: Checkpoint, touched: dict[str, str], blend: _Blender, tmp: Path
) -> dict[str, int]:
    """Convert each .bin shard to a safetensors shard, blending touched tensors."""
    from safetensors.torch import save_file

    stored_to_model = {v: k for k, v in touched.items()}
    weight_map: dict[str, str] = {}
    total = 0
    for f in tgt.files:
        sd = tgt._pickle_shard(f)
        out: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], str] = {}
        storages: set[int] = set()
        for n, e in tgt.entries.items():
            if e.file != f:
                continue
            t = sd[n]
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in seen:  # tied weights: keep the first name, as the in-memory path does
                continue
            seen[key] = n
            if n in stored_to_model:
                t = t.detach().contiguous().clone()
                row_bytes = t[0].numel() * t.element_size() if t.dim() else 0
                blend.blend(
                    stored_to_model[n],
                    tuple(t.shape),
                    e.dtype,
                    row_bytes,
                    lambda r0, r1, t=t: t[r0:r1],
                    lambda r0, chunk: None,
                )
            elif t.untyped_storage().data_ptr() in storages or not t.is_contiguous():
                t = t.contiguous().clone()
            storages.add(t.untyped_storage().data_ptr())
            out[n] = t
        name = _st_name(f)
        save_file(out, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out, sd
    tgt._pickle_cache = None
    if len(tgt.files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / ST_INDEX).write_text(json.dumps(index, indent=2))
    return {
        "shards": len(tgt.files),
        "shards_rewritten": len(tgt.files),
        "converted_from_pickle": 1,
    }


def _copy_other_files(tgt: Checkpoint, tmp: Path) -> list[str]:
    """Copy config, tokenizer and other small top-level files; returns what was skipped."""
    skipped = []
    for p in sorted(tgt.root.iterdir()):
        name = p.name
        if name.startswith("."):
            continue
        if not p.is_file():
            skipped.append(name + "/")
            continue
        if name == MANIFEST_NAME or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            if name not in tgt.files and name not in (ST_INDEX, PT_INDEX, MANIFEST_NAME):
                skipped.append(name)
            continue
        shutil.copyfile(p, tmp / name)
    return skipped


def _prior_records(tgt: Checkpoint) -> list[Any]:
    p = tgt.root / MANIFEST_NAME
    if not p.is_file():
        return []
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    prior = list(data.get("history", [])) if isinstance(data, dict) else []
    return prior + (list(data.get("transplants", [])) if isinstance(data, dict) else [])


# ---- the entry point --------------------------------------------------------------------


def apply_manifest_out_of_core(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    manifest: ManifestLike,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    strict: bool = False,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Apply ``manifest`` to the target checkpoint on disk and write an HF directory.

    ``source``/``target``: local model directories, or hub ids resolved like
    ``snapshot_download`` (``local_files_only``/``HF_HUB_OFFLINE`` honoured).
    ``manifest``: a ``transplant_manifest.json`` path (or the directory holding
    it), a :class:`Manifest`, a manifest dict, or a list; several transplants
    are applied in order, as they were in memory. The manifest's tensor hashes
    are checked against what the blend produces; a mismatch (another
    checkpoint, or another dtype) warns, or raises with ``strict=True``.
    Returns the output directory. The output's tensors are bit-identical to
    ``apply_transplant`` + ``export_hf`` on the same checkpoints.
    """
    out, _stats = _apply(
        source,
        target,
        manifest,
        out_dir,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        strict=strict,
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
    )
    return out


def _apply(
    source: Any,
    target: Any,
    manifest: Any,
    out_dir: Any,
    *,
    overwrite: bool,
    allow_pickle: bool,
    strict: bool,
    revision: str | None,
    local_files_only: bool | None,
    cache_dir: Any,
) -> tuple[Path, dict[str, Any]]:
    records = load_manifest_records(manifest)
    hub = dict(
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        allow_pickle=allow_pickle,
    )
    src_dir = resolve_checkpoint(source, "source", **hub)
    tgt_dir = resolve_checkpoint(target, "target", **hub)
    out_path = Path(out_dir).expanduser().resolve()
    if out_path in (src_dir.resolve(), tgt_dir.resolve()):
        raise OutOfCoreError(
            f"--out {out_path} is the {'source' if out_path == src_dir.resolve() else 'target'} "
            "checkpoint itself; write the transplanted model to a new directory"
        )
    src = Checkpoint.open(src_dir, "source", allow_pickle=allow_pickle)
    tgt = Checkpoint.open(tgt_dir, "target", allow_pickle=allow_pickle)
    lt, rt = bind_checkpoint(tgt)
    ls, rs = bind_checkpoint(src)
    _check_pair(ls, lt, src, tgt, rs, rt)
    plans = [_plan_record(i, r, lt, tgt, rt) for i, r in enumerate(records)]
    touched = {n: rt[n] for p in plans for n in p.slices}
    blend = _Blender(src, rs, plans)

    out, tmp = prepare_out_dir(out_dir, overwrite)
    try:
        writer = _write_pickle_shards if tgt.format == "pickle" else _write_safetensors_shards
        stats = writer(tgt, touched, blend, tmp)
        if blend.mismatches:
            msg = (
                f"the blended tensors do not match the manifest's hashes "
                f"({len(blend.mismatches)} notes; first: {blend.mismatches[0]}). The "
                "checkpoints are not the ones the manifest was made from (or were loaded in "
                "another dtype)."
            )
            if strict:
                raise OutOfCoreError(msg + " Refusing because strict=True.")
            warnings.warn(msg, UserWarning, stacklevel=3)
        skipped = _copy_other_files(tgt, tmp)
        stats.update(
            tensors_blended=len(touched), skipped_files=skipped, hash_notes=list(blend.mismatches)
        )
        info = {"source": str(src_dir), "target": str(tgt_dir), **stats}
        out_records = []
        for r in records:
            extra = dict(r.get("extra") or {})
            extra["out_of_core"] = info
            out_records.append({**r, "extra": extra})
        doc: dict[str, Any] = {"transplants": out_records}
        prior = _prior_records(tgt)
        if prior:
            doc["history"] = prior
        (tmp / MANIFEST_NAME).write_text(json.dumps(doc, indent=2, default=str))
        commit_out_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote %s: %d tensors blended in %d of %d shards",
        out,
        len(touched),
        stats["shards_rewritten"],
        stats["shards"],
    )
    return out, stats


# ---- command line -----------------------------------------------------------------------

_APPLY_HELP = "apply a transplant manifest to checkpoints on disk, without loading the models"
_APPLY_DESCRIPTION = """\
Apply a saved transplant manifest (transplant_manifest.json, as export_hf
writes it) to a source and a target checkpoint on disk, tensor by tensor.
Neither model is loaded: memory stays at a few MB of rows beyond the Python
and torch runtime, so a multi-billion-parameter pair can be transplanted on
any CPU box. Shards that
no unit touches are copied byte for byte; the output keeps the target's shard
layout, config and tokenizer, and matches the in-memory transplant bit for bit.

example:
  tl-transplant apply --source big-source/ --target big-target/ \\
      --manifest run/transplant_manifest.json --out transplanted/
"""


def add_apply_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``apply`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "apply",
        help=_APPLY_HELP,
        description=_APPLY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        metavar="DIR_OR_ID",
        help="source model: a local HF directory or a hub id (read from the cache "
        "when HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--target",
        required=True,
        metavar="DIR_OR_ID",
        help="target model, the one whose weights are edited (same forms as --source)",
    )
    p.add_argument(
        "--manifest",
        required=True,
        metavar="JSON",
        help="transplant_manifest.json (or a directory holding one); every "
        "transplant in it is applied, in order",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory; written via a temporary sibling and renamed into place",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept PyTorch .bin (pickle) checkpoints; unpickling can execute code, "
        "so only use this for files you trust (the output is safetensors)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (instead of warning) when the blended tensors do not match the "
        "manifest's sha256 hashes, i.e. the checkpoints are not the ones it was "
        "made from",
    )
    p.set_defaults(func=main_apply)
    return p


def main_apply(args: argparse.Namespace) -> int:
    """Run ``apply`` from parsed arguments; returns the exit status."""
    try:
        out, stats = _apply(
            args.source,
            args.target,
            args.manifest,
            args.out,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            strict=getattr(args, "strict", False),
            revision=None,
            local_files_only=None,
            cache_dir=None,
        )
    except ValueError as e:  # OutOfCoreError, TransplantError, UnitError, ExportError
        print(f"tl-transplant apply: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: {stats['tensors_blended']} tensors blended in "
        f"{stats['shards_rewritten']} of {stats['shards']} shards; the rest copied byte for byte"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tl_transplant.out_of_core apply ...`` (until the main CLI wires it in)."""
    parser = argparse.ArgumentParser(prog="tl-transplant")
    sub = parser.add_subparsers(dest="command", required=True)
    add_apply_command(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
