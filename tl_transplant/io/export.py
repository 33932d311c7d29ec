"""Export the (transplanted) target back to a Hugging Face directory.

The written directory loads with plain ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained``. It holds safetensors weights written
from the same HF tensors the bridge evaluated (not from the bridge's own
state dict, whose keys and fused layouts differ), the config captured before
the bridge was booted, the tokenizer, and ``transplant_manifest.json`` (with the
mask file of each weight-level transplant beside it).

Writing goes to a hidden temporary sibling that is renamed into place, so an
interrupted export never leaves a half-written directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from tl_transplant.edit.manifest import MANIFEST_NAME as MANIFEST_NAME  # re-exported
from tl_transplant.edit.manifest import Manifest, ManifestDoc, write_manifest
from tl_transplant.edit.patching import patch_activations
from tl_transplant.errors import TLTransplantError
from tl_transplant.models.pair import ModelPair
from tl_transplant.models.side import ModelSide


class ExportError(TLTransplantError, ValueError):
    """The export cannot be written as asked."""


def _side_of(obj: Any) -> ModelSide:
    if isinstance(obj, ModelPair):
        return obj.target
    if isinstance(obj, ModelSide):
        return obj
    raise ExportError(
        f"export_hf takes a ModelPair (exports its target) or a ModelSide, got {type(obj).__name__}"
    )


def write_safetensors(
    state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = "5GB"
) -> list[str]:
    """Write ``state`` as (possibly sharded) safetensors plus the HF index; returns file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {n: state[n].detach().contiguous().cpu() for n in names}
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        (out_dir / filename).chmod(0o644)
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return list(split.filename_to_tensors)


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 probes without killing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(out: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>-*`` siblings left by dead processes.

    A killed export, apply or run (SIGKILL, power loss) leaves its temporary sibling
    behind; the pid in the name tells whether its writer is gone. Siblings of live
    processes (another export to the same place) are left alone. Returns what was removed.
    """
    say = log if log is not None else (lambda msg: warnings.warn(msg, UserWarning, stacklevel=4))
    removed: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = _TMP_RE.match(p.name)
        if not m or m["name"] != out.name or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            say(f"removed stale temporary directory {p} left by process {m['pid']}, "
                "which is no longer running")
    return removed


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: Path, inputs: Iterable[Any]) -> None:
    """Refuse an output directory that is, or contains, one of ``inputs`` (local paths).

    Replacing it would delete the model, config or task files the run reads from.
    Entries that are not local paths (hub ids, in-memory models) are skipped.
    """
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            continue
        p = Path(item).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if _inside(p, out):
            what = "is" if p == out else "contains"
            raise ExportError(
                f"the output directory {out} {what} the input {p}; writing there would "
                "replace what is being read. Choose a new output directory."
            )


def check_out_file(out: str | Path, overwrite: bool, *, inputs: Iterable[Any] = ()) -> Path:
    """Check an output *file* before any work: returns its resolved path.

    Never a file the command reads (one of ``inputs``, or a file inside an input
    directory such as a model's ``config.json``), even with ``overwrite``; an existing
    file (an earlier run's ``results.json`` ...) only with ``overwrite``.
    """
    p = Path(out).expanduser().resolve()
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            continue
        q = Path(item).expanduser()
        if q.exists() and (p == q.resolve() or (q.is_dir() and _inside(p, q.resolve())
                                               and p.exists())):
            raise ExportError(
                f"--out {out} is {'the input' if p == q.resolve() else 'a file of the input'} "
                f"{q}; writing there would destroy what is being read (even with "
                "--overwrite). Choose another output file."
            )
    if p.exists() and not overwrite:
        raise ExportError(
            f"--out {out} already exists; choose a new file name or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    return p


def replace_file(out: Path, write: Callable[[Path], Any]) -> None:
    """Write ``out`` through ``write(temp path)`` beside it, then rename into place, so an
    interrupted write never leaves a half-written file where an old one was."""
    tmp = out.parent / f".{out.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{out.suffix}"
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_out_dir(
    out_dir: str | Path, overwrite: bool, *, inputs: Iterable[Any] = ()
) -> tuple[Path, Path]:
    """Check ``out_dir`` and return (final path, fresh temporary sibling).

    Refuses an output that is a file, is non-empty (unless ``overwrite``), or is or
    contains one of ``inputs``; removes stale temporary siblings of dead processes.
    The temporary sibling's name carries this process's pid for that check.
    """
    out = Path(out_dir).expanduser().resolve()
    check_not_input(out, inputs)
    for anc in out.parents:
        if anc.exists() and not anc.is_dir():
            raise ExportError(
                f"cannot write {out}: {anc} is a file, not a directory; choose another output path"
            )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; choose a directory path")
    here = Path.cwd().resolve()
    if _inside(here, out) and out.is_dir() and any(out.iterdir()):
        raise ExportError(
            f"the output directory {out} is, or contains, the current directory; replacing "
            "it would delete what you are working in. Choose a new output directory."
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out} is not empty; choose a new directory or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise ExportError(
            f"cannot write {out}: {e.strerror or e} ({e.filename or out.parent}); choose a "
            "writable output directory"
        ) from e
    try:
        _claim(out, tmp, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, tmp


def _claim_path(out: Path) -> Path:
    return out.parent / f".{out.name}.claim"


def _claim_holder(claim: Path) -> tuple[int, Path] | None:
    """(pid, temporary directory) of a live claim on an output, None if it is stale.

    A claim is live while its writer runs and its temporary directory exists: a writer
    that failed removes its temporary directory, one that was killed leaves a dead pid.
    """
    try:
        pid_text, _, tmp_name = claim.read_text().partition(" ")
        pid, tmp = int(pid_text), claim.parent / tmp_name.strip()
    except (OSError, ValueError):
        return None
    return (pid, tmp) if tmp_name.strip() and tmp.is_dir() and _pid_alive(pid) else None


def _claim(out: Path, tmp: Path, overwrite: bool) -> None:
    """Take the exclusive claim on ``out`` for the writer of ``tmp``: ``.<out>.claim``.

    Two writers started on the same new output would otherwise both pass the emptiness
    check and the second to finish would silently replace the first one's output. The
    claim file is created with O_EXCL; a stale one (dead writer, or its temporary
    directory gone) is taken over.
    """
    claim = _claim_path(out)
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _claim_holder(claim)
            if holder is not None:
                raise ExportError(
                    f"another run (process {holder[0]}) is writing {out} right now; wait for "
                    "it to finish or choose another output directory (--overwrite replaces a "
                    "finished output, never one being written)"
                ) from None
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {tmp.name}")
        return
    raise ExportError(f"could not claim the output directory {out}; try again")


def _release(out: Path, tmp: Path) -> None:
    """Drop the claim on ``out`` if it is ours (the one naming ``tmp``)."""
    claim = _claim_path(out)
    try:
        if claim.read_text().partition(" ")[2].strip() == tmp.name:
            claim.unlink()
    except OSError:
        pass


def discard_out_dir(tmp: Path, out: Path) -> None:
    """Remove an unfinished temporary directory and drop its claim on ``out``."""
    shutil.rmtree(tmp, ignore_errors=True)
    _release(out, tmp)


def commit_out_dir(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Move a finished temporary directory into place (replacing ``out`` if present).

    With ``overwrite=False`` an ``out`` that became non-empty while this writer ran
    (someone else wrote there) is not replaced: :class:`ExportError`, and the finished
    output stays in ``tmp`` for the caller to keep or remove.
    """
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ExportError(
            f"{out} was written by someone else while this run was working; it was left "
            "as it is and this run's output was discarded. Choose a new output directory, "
            "or pass --overwrite (overwrite=True) to replace an existing output."
        )
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
    tmp.rename(out)
    _release(out, tmp)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # as huggingface_hub


def check_shard_size(max_shard_size: Any) -> int:
    """``max_shard_size`` as bytes: a positive int or a string like ``"5GB"`` / ``"500MB"``."""
    n = -1
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        n = max_shard_size
    elif isinstance(max_shard_size, str) and (m := _SIZE.match(max_shard_size)):
        n = int(float(m[1]) * _SIZE_UNITS[m[2].upper()])
    if n <= 0:
        raise ExportError(
            f"max_shard_size={max_shard_size!r} is not a size; use a positive number of bytes "
            "or a string such as '5GB', '500MB' or '200KB'"
        )
    return n


def export_hf(
    pair_or_side: ModelPair | ModelSide,
    out_dir: str | Path,
    manifest: Manifest | dict[str, Any] | None = None,
    overwrite: bool = False,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the target (or a side) as an HF directory; returns its path.

    ``manifest`` defaults to the manifests of the transplants applied to the
    pair (all of them, in order, and those active in a ``with transplant(...)``
    block, marked ``reversible_context``), or an empty record if none were. The
    mask files of weight-level transplants are written next to the manifest.
    """
    side = _side_of(pair_or_side)
    if side.offloaded:
        raise ExportError(
            f"{side.name!r} was loaded with a device_map that offloads {len(side.offloaded)} "
            f"tensors (e.g. {side.offloaded[0]}) to cpu/disk, so they are not in memory to "
            "export. Save the transplant manifest and run `tl-transplant apply` "
            "(apply_manifest_out_of_core) on the checkpoints instead."
        )
    patches = patch_activations.active_on(side.hf)
    if patches:
        raise ExportError(
            f"export_hf inside an active {patches[0]!r} context: activation patching changes "
            "no weights, so the export would be the unedited target with an empty manifest. "
            "Make a weight transplant (transplant / apply_transplant) and export that, outside "
            "the patch_activations block."
        )
    shard_bytes = check_shard_size(max_shard_size)
    out, tmp = prepare_out_dir(out_dir, overwrite, inputs=_input_dirs(pair_or_side))
    try:
        write_safetensors(side.state_dict(), tmp, max_shard_size=shard_bytes)
        side.config.save_pretrained(tmp)
        gen = getattr(side.hf, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):  # invalid generation flags on tiny configs
                pass
        side.tokenizer.save_pretrained(tmp)
        write_manifest(tmp / MANIFEST_NAME, _manifest_record(pair_or_side, manifest))
        commit_out_dir(tmp, out, overwrite)
    except BaseException:
        discard_out_dir(tmp, out)
        raise
    return out


def _input_dirs(obj: Any) -> list[Any]:
    """The local directories the exported models were read from (never to be overwritten)."""
    sides = [obj.source, obj.target] if isinstance(obj, ModelPair) else [obj]
    return [s.identity.get("name") for s in sides if s.identity.get("source") == "local"]


def _manifest_record(obj: Any, manifest: Manifest | dict[str, Any] | None) -> Any:
    """The given manifest, else the pair's applied (and active) transplants, in order,
    with the weight masks of weight-level ones (to be written beside the JSON)."""
    if manifest is not None:
        return manifest
    if not isinstance(obj, ModelPair):
        return {"transplants": []}
    records = [m.to_dict() for m in obj.applied]
    masks = {m.mask.sha256: m.mask for m in obj.applied if getattr(m, "mask", None) is not None}
    for t in obj.active:  # exported from inside a `with transplant(...)` block
        m = t.manifest()
        records.append({**m.to_dict(), "reversible_context": True})
        if m.mask is not None:
            masks[m.mask.sha256] = m.mask
    return ManifestDoc(records, masks=masks)
