"""Files: checkpoints on disk (``checkpoint``), the out-of-core transplant
(``out_of_core``) and the Hugging Face export with its output-directory staging
(``export``).

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ST_INDEX": "checkpoint",
    "PT_INDEX": "checkpoint",
    "CheckpointError": "checkpoint",
    "ReadRows": "checkpoint",
    "WriteRows": "checkpoint",
    "BlendFn": "checkpoint",
    "TensorEntry": "checkpoint",
    "Checkpoint": "checkpoint",
    "read_st_header": "checkpoint",
    "resolve_checkpoint": "checkpoint",
    "tensor_bytes": "checkpoint",
    "write_safetensors_shards": "checkpoint",
    "write_pickle_shards": "checkpoint",
    "copy_other_files": "checkpoint",
    "MANIFEST_NAME": "export",
    "ExportError": "export",
    "write_safetensors": "export",
    "remove_stale_temps": "export",
    "check_not_input": "export",
    "prepare_out_dir": "export",
    "commit_out_dir": "export",
    "check_shard_size": "export",
    "export_hf": "export",
    "log": "out_of_core",
    "OutOfCoreError": "out_of_core",
    "bind_checkpoint": "out_of_core",
    "CHUNK_BYTES": "out_of_core",
    "apply_manifest_out_of_core": "out_of_core",
    "apply_out_of_core": "out_of_core",
}

if TYPE_CHECKING:
    from tl_transplant.io.checkpoint import (
        PT_INDEX as PT_INDEX,
    )
    from tl_transplant.io.checkpoint import (
        ST_INDEX as ST_INDEX,
    )
    from tl_transplant.io.checkpoint import (
        BlendFn as BlendFn,
    )
    from tl_transplant.io.checkpoint import (
        Checkpoint as Checkpoint,
    )
    from tl_transplant.io.checkpoint import (
        CheckpointError as CheckpointError,
    )
    from tl_transplant.io.checkpoint import (
        ReadRows as ReadRows,
    )
    from tl_transplant.io.checkpoint import (
        TensorEntry as TensorEntry,
    )
    from tl_transplant.io.checkpoint import (
        WriteRows as WriteRows,
    )
    from tl_transplant.io.checkpoint import (
        copy_other_files as copy_other_files,
    )
    from tl_transplant.io.checkpoint import (
        read_st_header as read_st_header,
    )
    from tl_transplant.io.checkpoint import (
        resolve_checkpoint as resolve_checkpoint,
    )
    from tl_transplant.io.checkpoint import (
        tensor_bytes as tensor_bytes,
    )
    from tl_transplant.io.checkpoint import (
        write_pickle_shards as write_pickle_shards,
    )
    from tl_transplant.io.checkpoint import (
        write_safetensors_shards as write_safetensors_shards,
    )
    from tl_transplant.io.export import (
        MANIFEST_NAME as MANIFEST_NAME,
    )
    from tl_transplant.io.export import (
        ExportError as ExportError,
    )
    from tl_transplant.io.export import (
        check_not_input as check_not_input,
    )
    from tl_transplant.io.export import (
        check_shard_size as check_shard_size,
    )
    from tl_transplant.io.export import (
        commit_out_dir as commit_out_dir,
    )
    from tl_transplant.io.export import (
        export_hf as export_hf,
    )
    from tl_transplant.io.export import (
        prepare_out_dir as prepare_out_dir,
    )
    from tl_transplant.io.export import (
        remove_stale_temps as remove_stale_temps,
    )
    from tl_transplant.io.export import (
        write_safetensors as write_safetensors,
    )
    from tl_transplant.io.out_of_core import (
        CHUNK_BYTES as CHUNK_BYTES,
    )
    from tl_transplant.io.out_of_core import (
        OutOfCoreError as OutOfCoreError,
    )
    from tl_transplant.io.out_of_core import (
        apply_manifest_out_of_core as apply_manifest_out_of_core,
    )
    from tl_transplant.io.out_of_core import (
        apply_out_of_core as apply_out_of_core,
    )
    from tl_transplant.io.out_of_core import (
        bind_checkpoint as bind_checkpoint,
    )
    from tl_transplant.io.out_of_core import (
        log as log,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
