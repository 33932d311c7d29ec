"""Export the (transplanted) target back to a Hugging Face directory.

The written directory loads with plain ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained``. It holds safetensors weights written
from the same HF tensors the bridge evaluated (not from the bridge's own
state dict, whose keys and fused layouts differ), the config captured before
the bridge was booted, the tokenizer, and ``transplant_manifest.json``.

Writing goes to a hidden temporary sibling that is renamed into place, so an
interrupted export never leaves a half-written directory.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from tl_transplant.manifest import MANIFEST_NAME as MANIFEST_NAME  # re-exported
from tl_transplant.manifest import Manifest, write_manifest
from tl_transplant.pair import ModelPair, ModelSide


class ExportError(ValueError):
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


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """Check ``out_dir`` and return (final path, fresh temporary sibling)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out} is not empty; choose a new directory or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return out, tmp


def commit_out_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place (replacing ``out`` if present)."""
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


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
    pair (all of them, in order), or an empty record if none were.
    """
    side = _side_of(pair_or_side)
    if side.offloaded:
        raise ExportError(
            f"{side.name!r} was loaded with a device_map that offloads {len(side.offloaded)} "
            f"tensors (e.g. {side.offloaded[0]}) to cpu/disk, so they are not in memory to "
            "export. Save the transplant manifest and run `tl-transplant apply` "
            "(apply_manifest_out_of_core) on the checkpoints instead."
        )
    out, tmp = prepare_out_dir(out_dir, overwrite)
    try:
        write_safetensors(side.state_dict(), tmp, max_shard_size=max_shard_size)
        side.config.save_pretrained(tmp)
        gen = getattr(side.hf, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):  # invalid generation flags on tiny configs
                pass
        side.tokenizer.save_pretrained(tmp)
        write_manifest(tmp / MANIFEST_NAME, _manifest_record(pair_or_side, manifest))
        commit_out_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _manifest_record(obj: Any, manifest: Manifest | dict[str, Any] | None) -> Any:
    """The given manifest, else the pair's applied (and active) transplants, in order."""
    if manifest is not None:
        return manifest
    if not isinstance(obj, ModelPair):
        return {"transplants": []}
    records = [m.to_dict() for m in obj.applied]
    for t in obj.active:  # exported from inside a `with transplant(...)` block
        records.append({**t.manifest().to_dict(), "reversible_context": True})
    return {"transplants": records}
