"""One loaded model: its Hugging Face module, TransformerLens bridge, tokenizer and the
canonical tensors that edits change.

A :class:`ModelSide` keeps three views of one model:

* ``hf``: the real Hugging Face model (after booting, TransformerLens has
  wrapped its modules, so its own ``state_dict`` keys gain
  ``._original_component``);
* ``bridge``: the ``TransformerBridge`` (raw, unprocessed weights) used for
  everything that reads activations;
* ``params``: the HF tensors under their *clean* HF names, captured before the
  bridge was booted. They are the one source of truth: transplants edit them,
  the export writes them, and the few tensors the bridge copies (GPT-NeoX's
  split q/k/v: the ``mirrors``) are re-derived from them after each edit.

How a spec is turned into an HF model and tokenizer (dtype, local directory or hub id,
pickles, corrupt files, finite weights) is :mod:`tl_transplant.models.loading`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tl_transplant.arch.bridge import check_bridge
from tl_transplant.arch.model_layout import ModelLayout, TensorSlice, bind_layout
from tl_transplant.arch.schema import LayoutMismatchError
from tl_transplant.errors import ModelLoadError
from tl_transplant.models.gguf import is_gguf, load_gguf
from tl_transplant.models.loading import (
    ModelSpec,
    check_device,
    check_finite_weights,
    load_hf,
    load_tokenizer,
    quiet_loading,
    resolve_dtype,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def _strip(name: str) -> str:
    return name.replace("._original_component", "")


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    if t.device.type == "meta":  # offloaded by accelerate: every meta storage has address 0
        return ("meta", id(t))
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # meta or exotic tensors
        return (str(t.device), id(t))


def gather_slices(params: dict[str, torch.Tensor], parts: list[TensorSlice]) -> torch.Tensor:
    """Concatenate HF slices (all along one dim) into one tensor."""
    dim = parts[0].dim
    return torch.cat([params[p.param].narrow(p.dim, p.start, p.size) for p in parts], dim=dim)


@dataclass
class ModelSide:
    """One loaded model: HF module, TransformerBridge, tokenizer and canonical tensors."""

    name: str
    hf: PreTrainedModel
    bridge: TransformerBridge
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    params: dict[str, torch.Tensor]
    layout: ModelLayout
    mirrors: list[tuple[torch.Tensor, list[TensorSlice]]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)

    # ---- loading --------------------------------------------------------------
    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        trust_remote_code: bool = False,
        use_safetensors: bool | None = True,
        revision: str | None = None,
        check_finite: bool = True,
        role: str = "model",
        allow_pickle: bool = False,
    ) -> ModelSide:
        """Load ``spec``: hub id, local dir, ``.gguf`` file (dequantized to ``dtype``, default
        float32, tokenizer from the same file), in-memory model, or ``(model, tokenizer)``."""
        if isinstance(spec, ModelSide):
            return spec
        check_device(device, role)  # "gpu", or cuda on a machine without: before loading
        if isinstance(spec, tuple) and len(spec) == 2:
            spec, tokenizer = spec
        gguf_identity: dict[str, Any] | None = None
        if is_gguf(spec):
            if device_map is not None:
                raise ModelLoadError(
                    f"{role}: device_map is not supported for .gguf files; convert it once with "
                    "export_hf (or save_pretrained) and load that directory with device_map"
                )
            want = resolve_dtype(dtype)
            spec, gguf_tok, gguf_identity = load_gguf(
                spec, dtype=torch.float32 if want == "auto" else want
            )
            tokenizer = gguf_tok if tokenizer is None else tokenizer
            dtype = None
        with quiet_loading():
            hf, name, identity = load_hf(
                spec,
                device=device,
                dtype=dtype,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
                use_safetensors=use_safetensors,
                revision=revision,
                role=role,
                allow_pickle=allow_pickle,
            )
            tok = load_tokenizer(spec, hf, tokenizer, trust_remote_code, revision, role)
        if gguf_identity is not None:
            identity, name = gguf_identity, gguf_identity["name"]
        return cls.from_hf(
            hf,
            tok,
            name=name,
            identity=identity,
            device=device,
            check_finite=check_finite,
            role=role,
        )

    @classmethod
    def from_hf(
        cls,
        hf: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        identity: dict[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        check_finite: bool = True,
        role: str = "model",
    ) -> ModelSide:
        """Wrap an already-loaded HF causal LM (not yet booted) in a bridge."""
        from transformer_lens.model_bridge import TransformerBridge

        if any("._original_component" in k for k, _ in hf.named_parameters()):
            raise ModelLoadError(
                f"{role} {name!r} was already wrapped by a TransformerBridge; pass the bridge's "
                "ModelSide, or load a fresh copy of the HF model."
            )
        hf.eval()
        config = copy.deepcopy(hf.config)
        params: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in hf.state_dict(keep_vars=True).items():
            if id(v) in seen:  # tied weights (e.g. lm_head = embed): keep the first name
                continue
            seen.add(id(v))
            params[k] = v
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        layout = bind_layout(config, shapes)
        check_finite_weights(params, layout.unit_tensors(), name, role,
                             warn_only=not check_finite)  # unchecked: a note, not silence
        identity = dict(identity or {})
        identity.setdefault("name", name)
        identity["model_type"] = layout.model_type
        identity["family"] = layout.family.family
        identity["dtype"] = str(next(iter(params.values())).dtype).replace("torch.", "")
        identity["n_params"] = int(sum(v.numel() for v in params.values()))

        boot_device = (
            None
            if getattr(hf, "hf_device_map", None)
            else str(device or next(iter(params.values())).device)
        )
        if not getattr(hf.config, "architectures", None):
            # TransformerLens picks its adapter by config.architectures, which a model built
            # in memory (from_config) lacks; save_pretrained would write exactly this.
            hf.config.architectures = [type(hf).__name__]
        with contextlib.redirect_stdout(None), quiet_loading():
            bridge = TransformerBridge.boot_transformers(
                f"tl_transplant/{role}",
                hf_model=hf,
                tokenizer=tokenizer,
                device=boot_device,
                dtype=next(iter(params.values())).dtype,
            )
        side = cls(
            name=name,
            hf=hf,
            bridge=bridge,
            tokenizer=tokenizer,
            config=config,
            params=params,
            layout=layout,
            identity=identity,
        )
        check_bridge(layout, bridge)
        side._find_mirrors()
        return side

    def _find_mirrors(self) -> None:
        """Find tensors the bridge copied; check each is one we know how to re-derive."""
        canon_ids = {id(v) for v in self.params.values()}
        canon_storage = {_storage_key(v) for v in self.params.values()}
        declared: dict[str, list[TensorSlice]] = {}
        for layer in range(self.layout.n_layers):
            for path, mirror_parts in self.layout.mirror_slices(layer):
                declared[path] = mirror_parts
        found: dict[int, tuple[torch.Tensor, list[TensorSlice]]] = {}
        for raw, p in self.hf.named_parameters(remove_duplicate=False):
            if id(p) in canon_ids or id(p) in found or _storage_key(p) in canon_storage:
                continue
            if p.device.type == "meta":
                # Offloaded by a device_map: accelerate's hooks swap in fresh (meta) tensor
                # objects; there is no data here to keep in sync.
                continue
            clean = _strip(raw)
            parts = declared.get(clean)  # a Mirror's path or one of its aliases
            if parts is None:
                raise LayoutMismatchError(
                    f"the TransformerBridge holds its own copy of {clean!r}, which the "
                    f"{self.layout.family.family} layout does not declare as a mirror, so edits "
                    "could not be kept in sync with it. Add a Mirror entry (or an alias of one) "
                    "to its FamilyLayout (tl_transplant/arch/families/)."
                )
            if any(self.params[x.param].device.type == "meta" for x in parts):
                # Its HF tensor was offloaded by a device_map (cpu/disk offload): transplants
                # refuse offloaded tensors, so this copy never needs re-deriving.
                continue
            if not torch.equal(p.detach(), gather_slices(self.params, parts).to(p.device)):
                raise LayoutMismatchError(
                    f"the bridge's copy {clean!r} does not equal the slices the layout derives it "
                    "from; the installed transformer-lens splits this tensor differently."
                )
            found[id(p)] = (p, parts)
        self.mirrors = list(found.values())

    # ---- edits ----------------------------------------------------------------
    @torch.no_grad()
    def refresh_mirrors(self, touched: Iterable[str] | None = None) -> None:
        """Re-derive the bridge's copies of the given HF tensors (all if None)."""
        touched_set = None if touched is None else set(touched)
        for mirror, parts in self.mirrors:
            if touched_set is None or parts[0].param in touched_set:
                mirror.copy_(gather_slices(self.params, parts).to(mirror.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The clean HF state dict (tied duplicates removed), detached, as live tensors."""
        return {k: v.detach() for k, v in self.params.items()}

    @property
    def offloaded(self) -> list[str]:
        """HF tensors that a ``device_map`` offloaded (held on the meta device by accelerate).

        The hooked forward still runs (accelerate streams them in), but their
        values cannot be edited or exported from memory.
        """
        return [k for k, v in self.params.items() if v.device.type == "meta"]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def prepend_bos(self) -> bool:
        """Whether the hooked model prepends BOS by default for this architecture."""
        return bool(getattr(self.bridge.cfg, "default_prepend_bos", True))

    def __repr__(self) -> str:
        d = self.layout.dims
        return (
            f"ModelSide({self.name!r}, family={self.layout.family.family}, layers={d.n_layers},"
            f" heads={d.H}, kv_heads={d.KV}, d_mlp={d.I})"
        )


__all__ = ["ModelSide", "gather_slices"]
