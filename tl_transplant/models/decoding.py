"""Greedy decoding with a working KV cache over the bridged model's own weights.

Under transformer-lens 4.3 with transformers 5.x, booting a ``TransformerBridge``
rewires the HF model it is given: each wrapped module is replaced by a bridge
component that holds the original under ``._original_component``. The bridge's
attention ignores the KV cache that ``generate()`` passes, so cached decoding
through the wrapped model is wrong and uncached decoding recomputes the whole
prefix at every step (cost grows with the square of the output length).

:func:`plain_model` builds the *unwrapped* HF module tree: a shallow copy of
every module on the path to a wrapped one, with each bridge component replaced
by its original. Leaf modules (``Linear``, norms, embeddings, rotary) are the
very same objects, so every parameter and buffer is shared with the bridged
model, never copied: transplant edits write the HF tensors in place and this
tree sees them at once. (The bridge's own copies, e.g. GPT-NeoX's split q/k/v,
are not used here; the HF ``query_key_value`` they are derived from is.) The
check in :func:`plain_model` refuses any tree whose parameters are not exactly
the wrapped model's HF tensors.

TransformerLens hooks live on the bridge components, which this tree skips, so
:func:`greedy_generate` falls back to the wrapped model (uncached, the
reference path) whenever a forward/backward hook is registered anywhere in the
model (the bridge's hook points all live in its module tree) or globally, e.g.
inside :func:`~tl_transplant.edit.patching.patch_activations`; the bridge's own
wiring hooks do not count. It also falls back for models dispatched by
accelerate (``device_map``), whose hooks the copy would not see.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from transformers import GenerationConfig

_ORIG = "_original_component"
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
#: The hooks that run with a forward/backward (the other dicts hold flags or state_dict hooks).
_RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)

#: Unwrapped trees, built once per wrapped model (dropped with it).
_PLAIN: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = (
    weakref.WeakKeyDictionary()
)


class DecodingError(TLTransplantError, RuntimeError):
    """The unwrapped module tree would not compute with the bridged model's tensors."""


def _is_wrapped(m: torch.nn.Module) -> bool:
    return isinstance(getattr(m, "_modules", {}).get(_ORIG), torch.nn.Module)


def _has_wrapped(m: torch.nn.Module) -> bool:
    return any(_is_wrapped(x) for x in m.modules())


def _unwrap(m: torch.nn.Module, memo: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """``m`` with every bridge component replaced by its original; shares all leaves."""
    key = id(m)
    if key in memo:
        return memo[key]
    if _is_wrapped(m):
        out = _unwrap(m._modules[_ORIG], memo)  # type: ignore[arg-type]  # checked non-None
    elif not _has_wrapped(m):
        out = m  # nothing below is wrapped: the very same module
    else:
        out = copy.copy(m)  # shallow: same _parameters/_buffers dicts (same tensors)
        for name in _HOOK_DICTS:  # hooks belong to the wrapped tree, not this copy
            if name in out.__dict__:
                out.__dict__[name] = OrderedDict()
        out.__dict__["_modules"] = OrderedDict(
            (k, None if c is None else _unwrap(c, memo)) for k, c in m._modules.items()
        )
    memo[key] = out
    return out


def _check_shared(plain: torch.nn.Module, wrapped: torch.nn.Module) -> None:
    """Every parameter and buffer of ``plain`` must be one of ``wrapped``'s, under its name."""
    params = {
        n.replace(f".{_ORIG}", ""): p for n, p in wrapped.named_parameters(remove_duplicate=False)
    }
    buffers = {
        n.replace(f".{_ORIG}", ""): b for n, b in wrapped.named_buffers(remove_duplicate=False)
    }
    for kind, have, want in (
        ("parameter", dict(plain.named_parameters()), params),
        ("buffer", dict(plain.named_buffers()), buffers),
    ):
        for n, t in have.items():
            if want.get(n) is not t:
                raise DecodingError(
                    f"the unwrapped HF model's {kind} {n!r} is not the bridged model's tensor "
                    "of that name, so cached decoding would not see transplant edits (the "
                    "installed transformer-lens wraps models differently)"
                )
    if _has_wrapped(plain):
        raise DecodingError("the unwrapped HF model still contains bridge components")


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model without its bridge components, sharing every tensor (built once).

    A model that was never wrapped is returned as is; a ``TransformerBridge`` gives
    the plain tree of the HF model it wraps (``original_model``).
    """
    inner = getattr(model, "original_model", None)
    if isinstance(inner, torch.nn.Module) and inner is not model:
        model = inner
    if not _has_wrapped(model):
        return model
    plain = _PLAIN.get(model)
    if plain is None:
        plain = _unwrap(model, {})
        _check_shared(plain, model)
        _PLAIN[model] = plain
    return plain


def _internal_hooks(root: torch.nn.Module) -> set[tuple[int, int]]:
    """(hook dict, key) of the bridge's own wiring hooks (``BlockBridge`` capture hooks).

    TransformerLens registers them on bridge components (never on the original
    modules the unwrapped tree runs) to feed its hook points; they change nothing
    unless a hook point has a hook, which :func:`hooks_active` sees by itself.
    """
    out: set[tuple[int, int]] = set()
    for m in root.modules():
        for h in getattr(m, "_capture_hook_handles", None) or ():
            ref = getattr(h, "hooks_dict_ref", None)
            d = ref() if callable(ref) else None
            if d is not None:
                out.add((id(d), int(h.id)))
    return out


def hooks_active(*modules: Any) -> bool:
    """Whether a hook is registered under ``modules`` (or globally in torch).

    Counts every forward/backward (pre-)hook, TransformerLens hook points included,
    except the bridge's own wiring hooks (:func:`_internal_hooks`).
    """
    import torch.nn.modules.module as mm

    if any(getattr(mm, g, None) for g in _GLOBAL_HOOKS):
        return True
    for root in modules:
        if not isinstance(root, torch.nn.Module):
            continue
        internal = _internal_hooks(root)
        for m in root.modules():
            for h in _RUN_HOOKS:
                d = m.__dict__.get(h)
                if d and any((id(d), k) not in internal for k in d):
                    return True
    return False


def _dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed the model (``device_map``): its hooks move tensors."""
    return bool(getattr(model, "hf_device_map", None)) or any(
        hasattr(m, "_hf_hook") for m in model.modules()
    )


def can_cache(model: torch.nn.Module) -> bool:
    """Whether :func:`greedy_generate` with ``kv_cache=True`` will take the cached path."""
    return not hooks_active(model) and not _dispatched(model)


def greedy_generate(
    model: Any,
    input_ids: Int[torch.Tensor, "batch seq"],
    attention_mask: Int[torch.Tensor, "batch seq"],
    config: GenerationConfig,
    *,
    kv_cache: bool = True,
) -> tuple[Int[torch.Tensor, "batch total"], bool]:
    """``model.generate`` with ``config``; returns (ids, whether the KV cache was used).

    ``kv_cache=True`` decodes with the unwrapped model (:func:`plain_model`) and a
    KV cache, unless a hook is active on ``model`` (a bridged model's HF tree holds
    all of the bridge's hook points), accelerate dispatches it, or (with a warning)
    :func:`plain_model` refuses it. Then, and with ``kv_cache=False``, it runs
    ``model.generate`` uncached: every step recomputes the prefix through the
    bridge components, hooks firing. A ``TransformerBridge`` stands for the HF
    model it wraps.
    """
    inner = getattr(model, "original_model", None)
    if isinstance(inner, torch.nn.Module) and inner is not model:
        model = inner  # a TransformerBridge: its generate() takes TL arguments, not HF ones
    cfg = copy.copy(config)
    plain = None
    if kv_cache and can_cache(model):
        try:
            plain = plain_model(model)
        except DecodingError as e:
            warnings.warn(f"{e}; decoding uncached instead", stacklevel=2)
    if plain is not None:
        cfg.use_cache = True
        out = plain.generate(  # type: ignore[operator]  # HF GenerationMixin
            input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg
        )
        return out, True
    cfg.use_cache = False
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg)
    return out, False


__all__ = ["DecodingError", "can_cache", "greedy_generate", "hooks_active", "plain_model"]
