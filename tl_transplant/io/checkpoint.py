"""Hugging Face checkpoints on disk, read from headers and written shard by shard.

* :class:`Checkpoint` opens a model directory without loading it: the weight
  index, every safetensors header (checked: each tensor's bytes must lie inside
  its file), the config; :meth:`Checkpoint.read_rows` reads a few rows of one
  tensor through a memory map.
* PyTorch ``.bin`` pickles are refused unless ``allow_pickle=True`` (loading a
  pickle can run code); they are then read with ``torch.load(weights_only=True)``.
* :func:`resolve_checkpoint` turns a local directory or a hub id into a path.
* :func:`write_safetensors_shards` / :func:`write_pickle_shards` copy the
  target's weights into a new directory, passing the tensors to edit through a
  :data:`BlendFn` chunk by chunk; :func:`copy_other_files` copies config,
  tokenizer and the other small files.

No model code and no layouts here: what a tensor *means* is decided by the
caller (:mod:`tl_transplant.io.out_of_core`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from tl_transplant.edit.manifest import MANIFEST_NAME, MASK_FILE_RE
from tl_transplant.errors import TLTransplantError

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

class CheckpointError(TLTransplantError, ValueError):
    """A checkpoint on disk cannot be read as asked (missing, corrupt, or pickle refused)."""


ReadRows = Callable[[int, int], torch.Tensor]
WriteRows = Callable[[int, torch.Tensor], None]
BlendFn = Callable[[str, tuple[int, ...], str, int, ReadRows, WriteRows], None]
"""``blend(model_name, shape, dtype, row_bytes, read_rows, write_rows)``: edit one tensor.

``read_rows(r0, r1)`` gives rows of the stored tensor; the blend passes each
finished chunk to ``write_rows(r0, chunk)`` (or edits the rows it was given in place).
"""


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
            raise CheckpointError(
                f"{where} has no config.json; is it a Hugging Face model directory?"
            )
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: config.json is not valid JSON ({e})") from e
        names = {p.name for p in root.iterdir() if p.is_file()}
        if (
            ST_INDEX in names
            or "model.safetensors" in names
            or any(n.endswith(".safetensors") for n in names)
        ):
            return cls._open_safetensors(root, role, names, config)
        if PT_INDEX in names or any(n.endswith(".bin") for n in names):
            if not allow_pickle:
                raise CheckpointError(
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
        raise CheckpointError(
            f"{where} has no weights: no {ST_INDEX}, model.safetensors or pytorch_model*.bin "
            f"(files: {', '.join(sorted(names)) or 'none'})"
        )

    @classmethod
    def _read_index(cls, path: Path, where: str) -> dict[str, Any]:
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: {path.name} is not valid JSON ({e})") from e
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{where}: {path.name} has no weight_map")
        return index

    @classmethod
    def _check_shards(cls, root: Path, files: list[str], index_name: str, where: str) -> None:
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(
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
                raise CheckpointError(
                    f"{where} has {len(st)} safetensors files ({', '.join(st)}) but no {ST_INDEX} "
                    "saying which tensor is in which"
                )
            files, wm = st, {}
        entries: dict[str, TensorEntry] = {}
        for f in files:
            for e in read_st_header(root / f, where):
                if not wm or wm.get(e.name) == f:
                    entries[e.name] = e
        lost = [n for n, f in wm.items() if n not in entries]
        if lost:
            raise CheckpointError(
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
            raise CheckpointError(f"{where} has .bin files but no pytorch_model.bin or {PT_INDEX}")
        ck = cls(root, role, "pickle", files, {}, index, config)
        for f in files:
            for n, t in ck._pickle_shard(f).items():
                if isinstance(t, torch.Tensor) and (not wm or wm.get(n) == f):
                    dtype = str(t.dtype).replace("torch.", "")
                    ck.entries[n] = TensorEntry(n, f, dtype, tuple(t.shape))
        lost = [n for n in wm if n not in ck.entries]
        if lost:
            raise CheckpointError(
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
        except pickle.UnpicklingError as e:  # the weights_only loader refused an object
            raise CheckpointError(
                f"{self.where}: {file} is not a loadable checkpoint: it holds objects other "
                "than tensors (possibly code), which the safe loader refused; nothing in it "
                "was run. Use a safetensors copy from a source you trust."
            ) from e
        except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; all mean "bad shard"
            raise CheckpointError(
                f"{self.where}: cannot read {file}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.where}: {file} does not hold a state dict")
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
            raise CheckpointError(f"{self.where}: cannot read {name} from {e.file}: {err}") from err


def read_st_header(path: Path, where: str) -> list[TensorEntry]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
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
            b, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise corrupt(f"the header entry for {name!r} is malformed") from err
        if dtype not in _ST_ITEMSIZE:
            raise corrupt(f"{name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if b < 0 or stop - b != nbytes:
            raise corrupt(
                f"{name!r} spans bytes {b}:{stop}, which does not fit {dtype}{list(shape)}"
            )
        if base + stop > size:
            raise corrupt(
                f"{name!r} ends at byte {base + stop}, past the end of the {size}-byte file"
            )
        end = max(end, stop)
        out.append(TensorEntry(name, path.name, dtype, shape, base + b, base + stop))
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
        raise CheckpointError(f"{role}: {text!r} is not a model directory")
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        path = Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, **kwargs))
        if allow_pickle and not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(text, allow_patterns=["*.bin", "*.json"], **kwargs))
    except Exception as e:  # noqa: BLE001 - hub errors are many; report which spec failed
        raise CheckpointError(
            f"{role}: {text!r} is not a local directory, and the hub (or its cache, when offline) "
            f"could not provide it: {type(e).__name__}: {e}"
        ) from e
    return path



def tensor_bytes(t: torch.Tensor) -> Any:
    """A tensor's raw bytes as a flat uint8 numpy view (dtype-exact, what sha256 hashes)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()



def write_safetensors_shards(
    tgt: Checkpoint, touched: dict[str, str], blend: BlendFn, tmp: Path
) -> dict[str, int]:
    """Copy each shard to ``tmp``; rewrite touched tensors' bytes in place (header unchanged).

    ``touched`` maps model tensor name -> stored name; each is passed to ``blend``.
    """
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

                def write(
                    r0: int, chunk: torch.Tensor, e: TensorEntry = e, rb: int = row_bytes
                ) -> None:
                    data = tensor_bytes(chunk)
                    if data.nbytes != chunk.shape[0] * rb:  # the blend keeps dtype and shape
                        raise CheckpointError(f"internal: {e.name} changed size while blending")
                    fh.seek(e.start + r0 * rb)
                    fh.write(memoryview(data))

                blend(
                    model_name,
                    e.shape,
                    tgt.dtype_name(e.name),
                    row_bytes,
                    cast(ReadRows, lambda r0, r1, n=e.name: tgt.read_rows(n, r0, r1)),
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


def write_pickle_shards(
    tgt: Checkpoint, touched: dict[str, str], blend: BlendFn, tmp: Path
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
                blend(
                    stored_to_model[n],
                    tuple(t.shape),
                    e.dtype,
                    row_bytes,
                    cast(ReadRows, lambda r0, r1, t=t: t[r0:r1]),
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


def copy_other_files(tgt: Checkpoint, tmp: Path) -> list[str]:
    """Copy config, tokenizer and other small top-level files; returns what was skipped.

    The manifest and its weight-mask files are not copied here: the caller writes the
    output's manifest, with the mask files its records (and history) name.
    """
    skipped = []
    for p in sorted(tgt.root.iterdir()):
        name = p.name
        if name.startswith("."):
            continue
        if not p.is_file():
            skipped.append(name + "/")
            continue
        if name == MANIFEST_NAME or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            ours = (ST_INDEX, PT_INDEX, MANIFEST_NAME)
            if name not in tgt.files and name not in ours and not MASK_FILE_RE.match(name):
                skipped.append(name)
            continue
        shutil.copyfile(p, tmp / name)
    return skipped

