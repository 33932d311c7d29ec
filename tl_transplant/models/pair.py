"""Load a source/target pair of causal LMs as TransformerLens bridges.

Each side keeps three views of one model:

* ``hf``: the real Hugging Face model (after booting, TransformerLens has
  wrapped its modules, so its own ``state_dict`` keys gain
  ``._original_component``);
* ``bridge``: the ``TransformerBridge`` (raw, unprocessed weights) used for
  everything that reads activations;
* ``params``: the HF tensors under their *clean* HF names, captured before the
  bridge was booted. They are the one source of truth: transplants edit them,
  the export writes them, and the few tensors the bridge copies (GPT-NeoX's
  split q/k/v) are re-derived from them after each edit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_transplant.arch.layouts import (
    LayoutMismatchError,
    ModelLayout,
    TensorSlice,
    bind_layout,
    check_bridge,
)
from tl_transplant.arch.units import Unit
from tl_transplant.errors import IncompatiblePairError, ModelLoadError, NonFiniteWeightsError
from tl_transplant.models.gguf import is_gguf, load_gguf

log = logging.getLogger(__name__)

ModelSpec = Any  # str | os.PathLike | PreTrainedModel | (PreTrainedModel, tokenizer) | ModelSide


def _quiet_imports() -> None:
    """Silence import-time chatter from transformers/TL that is noise in notebooks."""
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


_quiet_imports()


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
    hf: Any
    bridge: Any
    tokenizer: Any
    config: Any
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
        tokenizer: Any = None,
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
        if isinstance(spec, tuple) and len(spec) == 2:
            spec, tokenizer = spec
        gguf_identity: dict[str, Any] | None = None
        if is_gguf(spec):
            if device_map is not None:
                raise ModelLoadError(
                    f"{role}: device_map is not supported for .gguf files; convert it once with "
                    "export_hf (or save_pretrained) and load that directory with device_map"
                )
            want = _resolve_dtype(dtype)
            spec, gguf_tok, gguf_identity = load_gguf(
                spec, dtype=torch.float32 if want == "auto" else want
            )
            tokenizer = gguf_tok if tokenizer is None else tokenizer
            dtype = None
        hf, name, identity = _load_hf(
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
        tok = _load_tokenizer(spec, hf, tokenizer, trust_remote_code, revision, role)
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
        hf: Any,
        tokenizer: Any,
        *,
        name: str,
        identity: dict[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        check_finite: bool = True,
        role: str = "model",
    ) -> ModelSide:
        """Wrap an already-loaded HF causal LM (not yet booted) in a bridge."""
        import copy

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
        if check_finite:
            _check_finite(params, layout.unit_tensors(), name, role)
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
        with contextlib.redirect_stdout(None):
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
                    "to its FamilyLayout in layouts.py."
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


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounds the bool temporary to 16 MB


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds only finite values, in bounded extra memory."""
    flat = t.detach().reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all())
        for i in range(0, flat.numel(), _FINITE_CHUNK)
    )


def _check_finite(params: dict[str, torch.Tensor], names: list[str], name: str, role: str) -> None:
    """Refuse NaN/inf in any floating tensor (unit tensors first, then embeddings, norms...).

    Every tensor is checked, not just the unit tensors: a NaN in ``embed_tokens`` or a
    norm poisons every forward the scores and the sweep run. One pass over the weights,
    chunked, so it costs about as much as reading them once.
    """
    order = list(dict.fromkeys([*names, *params]))
    for n in order:
        t = params[n]
        if t.is_floating_point() and t.device.type != "meta" and not _all_finite(t):
            raise NonFiniteWeightsError(
                f"{role} {name!r} has NaN or inf values in {n}. Transplanting from or into it "
                "would spread them; fix the checkpoint, or pass check_finite=False "
                "(--no-check-finite on the command line) to load it anyway (transplants "
                "still refuse non-finite source slices)."
            )


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_local_dir(spec: Any) -> bool:
    return (
        isinstance(spec, (str, os.PathLike))
        and bool(str(spec))
        and Path(spec).expanduser().is_dir()
    )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, str) and dtype != "auto":
        try:
            return getattr(torch, dtype.replace("torch.", ""))
        except AttributeError:
            raise ModelLoadError(
                f"unknown dtype {dtype!r}; use float32, bfloat16 or float16"
            ) from None
    return dtype


def _load_hf(
    spec: Any,
    *,
    device: Any,
    dtype: Any,
    device_map: Any,
    trust_remote_code: bool,
    use_safetensors: bool | None,
    revision: str | None,
    role: str,
    allow_pickle: bool = False,
) -> tuple[Any, str, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        name = getattr(spec.config, "_name_or_path", "") or f"in-memory {type(spec).__name__}"
        if dtype is not None:
            spec = spec.to(_resolve_dtype(dtype))  # type: ignore[arg-type]  # HF stubs
        if device is not None and device_map is None and not getattr(spec, "hf_device_map", None):
            spec = spec.to(device)
        return spec, str(name), {"name": str(name), "source": "in-memory"}
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"{role}: expected a hub id, a local directory, a PreTrainedModel or a "
            f"(model, tokenizer) tuple, got {type(spec).__name__}"
        )
    path = str(Path(spec).expanduser()) if _is_local_dir(spec) else str(spec)
    if isinstance(spec, os.PathLike) or path.startswith((".", "/", "~")):
        if not _is_local_dir(spec):
            raise ModelLoadError(f"{role}: local model directory {path!r} does not exist")
    kwargs: dict[str, Any] = {
        "dtype": _resolve_dtype(dtype),
        "attn_implementation": "eager",
        "trust_remote_code": trust_remote_code,
    }
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if use_safetensors is not None and _is_local_dir(path):
        has_st = any(Path(path).glob("*.safetensors"))
        pickles = any(Path(path).glob("*.bin")) and not (has_st and use_safetensors)
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"{role}: {path} has no safetensors weights, only PyTorch pickles "
                "(pytorch_model*.bin), and unpickling can run code. Pass allow_pickle=True "
                "(--allow-pickle on the command line) if you trust the files."
            )
        kwargs["use_safetensors"] = bool(use_safetensors and has_st)
        if not has_st:
            warnings.warn(
                f"{role}: {path} has no safetensors weights; loading PyTorch pickles, which can "
                "run code. Convert it with export_hf() to get safetensors.",
                stacklevel=3,
            )
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, EOFError, RuntimeError) as e:
        raise ModelLoadError(
            f"{role}: could not load a causal LM from {path!r}: {_one_line(e)}"
        ) from e
    except Exception as e:  # safetensors' SafetensorError (corrupt or truncated file)
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(
            f"{role}: the weights in {path!r} are corrupt or truncated ({_one_line(e)}); "
            "re-download or re-export the checkpoint"
        ) from e
    if device_map is None and device is not None:
        hf = hf.to(device)
    identity = {
        "name": path,
        "source": "local" if _is_local_dir(path) else "hub",
        "revision": revision,
        "commit": getattr(hf.config, "_commit_hash", None),
    }
    return hf, path, identity


def _load_tokenizer(
    spec: Any, hf: Any, tokenizer: Any, trust_remote_code: bool, revision: str | None, role: str
) -> Any:
    """Return a tokenizer the bridge can use; never lets TL fetch one from the hub."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        src = (
            spec
            if isinstance(spec, (str, os.PathLike))
            else getattr(hf.config, "_name_or_path", None)
        )
        if not src or (not _is_local_dir(src) and not isinstance(spec, (str, os.PathLike))):
            raise ModelLoadError(
                f"{role}: an in-memory model needs its tokenizer; pass (model, tokenizer) or "
                "tokenizer=... (TransformerLens would otherwise try to fetch one from the hub)."
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(src), trust_remote_code=trust_remote_code, revision=revision
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{role}: could not load a tokenizer from {src!r}: {e}") from e
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer), trust_remote_code=trust_remote_code
        )
    if not _is_local_dir(getattr(tokenizer, "name_or_path", "") or ""):
        tokenizer = _roundtrip_tokenizer(tokenizer)
    return tokenizer


def _roundtrip_tokenizer(tokenizer: Any) -> Any:
    """Save and reload a tokenizer built in memory: the bridge reloads it by ``name_or_path``."""
    from transformers import AutoTokenizer

    d = Path(tempfile.mkdtemp(prefix="tl_transplant_tok_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    tokenizer.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


# ---- compatibility ---------------------------------------------------------------


def check_compatible(source: ModelSide, target: ModelSide, *, check_tokenizer: bool = True) -> None:
    """Raise :class:`IncompatiblePairError` naming the first thing that differs."""
    fs, ft = source.layout.family.family, target.layout.family.family
    if fs != ft:
        raise IncompatiblePairError(
            f"source is a {source.layout.model_type} ({fs} family) but target is a "
            f"{target.layout.model_type} ({ft} family); transplants need the same architecture."
        )
    for n in target.layout.unit_tensors():
        if n not in source.params:
            raise IncompatiblePairError(f"source has no tensor {n!r}, which the target has")
        ss, st = tuple(source.params[n].shape), tuple(target.params[n].shape)
        if ss != st:
            raise IncompatiblePairError(
                f"tensor {n!r} has shape {ss} in source but {st} in target; the models must "
                "share layer count, head counts and widths."
            )
    extra = set(source.layout.unit_tensors()) - set(target.layout.unit_tensors())
    if extra:
        raise IncompatiblePairError(
            f"source has tensor {sorted(extra)[0]!r}, which the target lacks"
        )
    if check_tokenizer:
        vs, vt = source.tokenizer.get_vocab(), target.tokenizer.get_vocab()
        if vs != vt:
            inv_s = {i: t for t, i in vs.items()}
            inv_t = {i: t for t, i in vt.items()}
            diff = sorted(i for i in set(inv_s) | set(inv_t) if inv_s.get(i) != inv_t.get(i))
            shown = ", ".join(f"id {i}: {inv_s.get(i)!r} vs {inv_t.get(i)!r}" for i in diff[:5])
            raise IncompatiblePairError(
                f"tokenizers differ at {len(diff)} token id(s) (source vs target: {shown}). "
                "Prompts would mean different things to the two models; pass "
                "check_tokenizer=False (--no-check-tokenizer on the command line) only if you "
                "know the ids line up."
            )


class ModelPair:
    """A source (stronger) and target (weaker) model of the same architecture.

    >>> pair = ModelPair.load("path/to/source", "path/to/target")   # doctest: +SKIP
    >>> pair.units("head")[:2]                                        # doctest: +SKIP
    [Head('L0.H0'), Head('L0.H1')]
    """

    def __init__(self, source: ModelSide, target: ModelSide, *, check_tokenizer: bool = True):
        check_compatible(source, target, check_tokenizer=check_tokenizer)
        self.source = source
        self.target = target
        self.applied: list[Any] = []  # manifests of permanent transplants, in order
        self.active: list[Any] = []  # transplant contexts currently applied (reversible)

    @classmethod
    def load(
        cls,
        source: ModelSpec,
        target: ModelSpec,
        *,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        source_tokenizer: Any = None,
        target_tokenizer: Any = None,
        check_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_safetensors: bool | None = True,
        check_finite: bool = True,
        allow_pickle: bool = False,
    ) -> ModelPair:
        """Load both models and check they can be transplanted between.

        ``source``/``target``: a hub id, a local HF directory, an in-memory
        ``PreTrainedModel`` (with ``*_tokenizer``) or a ``(model, tokenizer)`` tuple.
        ``device_map`` is handed to HF/accelerate for models too big for one device.
        A local directory with only PyTorch pickles (``pytorch_model*.bin``) is refused
        unless ``allow_pickle=True`` (unpickling can run code), as in ``apply``.
        """
        common = dict(
            device=None if device_map is not None else device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors,
            check_finite=check_finite,
            allow_pickle=allow_pickle,
        )
        src = ModelSide.load(source, tokenizer=source_tokenizer, role="source", **common)
        tgt = ModelSide.load(target, tokenizer=target_tokenizer, role="target", **common)
        return cls(src, tgt, check_tokenizer=check_tokenizer)

    # ---- conveniences -------------------------------------------------------------
    @property
    def layout(self) -> ModelLayout:
        return self.target.layout

    def units(self, kind: str | Iterable[str] | None = None) -> list[Unit]:
        """All units of the given kind(s): ``"head"``, ``"kv_head"``, ``"neuron"``, ``"linear"``."""
        return self.layout.units(kind)

    def validate(self, unit: Unit | str) -> Unit:
        return self.layout.validate(unit)

    def n_params(self, unit: Unit | str) -> int:
        return self.layout.n_params(unit)

    def sides(self) -> Iterator[ModelSide]:
        yield self.source
        yield self.target

    def __repr__(self) -> str:
        return (
            f"ModelPair(source={self.source.name!r}, target={self.target.name!r}, "
            f"family={self.layout.family.family})"
        )
