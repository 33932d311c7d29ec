"""How a model is loaded: the policy, apart from the objects it builds.

* **what** a spec names: a hub id, a local directory (a path-like spec must exist), an
  in-memory ``PreTrainedModel`` or a ``(model, tokenizer)`` tuple (``.gguf`` files are
  :mod:`tl_transplant.models.gguf`'s);
* **dtype**: ``None`` keeps the checkpoint's (``"auto"``); names like ``"bfloat16"``;
* **pickles**: a local directory with only PyTorch pickles (``pytorch_model*.bin``) is
  refused unless ``allow_pickle`` (unpickling can run code);
* **corrupt files**: a truncated or corrupt safetensors file is a :class:`ModelLoadError`
  saying so, as is any other failure of ``from_pretrained``;
* **tokenizer**: loaded from the model's directory or hub id, never fetched by
  TransformerLens; one built in memory is saved and reloaded (the bridge reloads it by
  ``name_or_path``);
* **finite weights**: NaN/inf anywhere is refused at load (:func:`check_finite_weights`);
* **quiet**: transformers' load-time warnings are hidden for the duration of a load only
  (:func:`quiet_loading`); importing the package changes no global logging or environment.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_transplant.errors import ModelLoadError, NonFiniteWeightsError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: What ``ModelSide.load`` / ``ModelPair.load`` accept: ``str | os.PathLike`` (hub id, local
#: directory or ``.gguf`` file), ``PreTrainedModel``, ``(PreTrainedModel, tokenizer)`` or an
#: already loaded ``ModelSide``.
ModelSpec = Any


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' load-time chatter (unused-weight and advisory warnings, the
    torchvision note) while the block runs; the logger's level is restored after.

    Only the default verbosity (WARNING) is raised to ERROR: a user who asked transformers
    for more (INFO, DEBUG) or less keeps it. Not thread-safe, like ``warnings.catch_warnings``.
    """
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers")  # configured once, as transformers does
    old = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        if logging.WARNING <= logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(old)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_device(device: str | torch.device | None, role: str) -> None:
    """A device that torch knows and this machine has, before anything loads (the API's
    twin of the CLI's --device check); :class:`ModelLoadError` names the valid forms."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(
            f"{role}: unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps' "
            "(a torch.device works too)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{role}: device {device!r}: CUDA is not available on this "
                                 "machine; use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"{role}: device {device!r}: this machine has {count} CUDA "
                                 f"device(s) (cuda:0..cuda:{count - 1}); pick one of those")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError(f"{role}: device {device!r}: MPS is not available on this "
                                 "machine; use device='cpu'")


def is_local_dir(spec: Any) -> bool:
    """Whether ``spec`` is a path (``str`` or path-like) of an existing directory."""
    return (
        isinstance(spec, (str, os.PathLike))
        and bool(str(spec))
        and Path(spec).expanduser().is_dir()
    )


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """``None`` -> ``"auto"`` (the checkpoint's dtype); a name -> its ``torch.dtype``."""
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


def _corrupt_file_errors() -> tuple[type[Exception], ...]:
    """safetensors' error for a corrupt or truncated file (it derives from Exception only)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        return ()
    return (SafetensorError,)


def load_hf(
    spec: ModelSpec,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    device_map: Any,
    trust_remote_code: bool,
    use_safetensors: bool | None,
    revision: str | None,
    role: str,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, str, dict[str, Any]]:
    """Load (or take) the HF causal LM ``spec`` names; returns it, its name and its identity
    record (name, source, revision, commit)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        name = getattr(spec.config, "_name_or_path", "") or f"in-memory {type(spec).__name__}"
        if dtype is not None:
            spec = spec.to(resolve_dtype(dtype))  # type: ignore[arg-type]  # HF stubs
        if device is not None and device_map is None and not getattr(spec, "hf_device_map", None):
            spec = spec.to(device)
        return spec, str(name), {"name": str(name), "source": "in-memory"}
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(
            f"{role}: expected a hub id, a local directory, a PreTrainedModel or a "
            f"(model, tokenizer) tuple, got {type(spec).__name__}"
        )
    path = str(Path(spec).expanduser()) if is_local_dir(spec) else str(spec)
    if isinstance(spec, os.PathLike) or path.startswith((".", "/", "~")):
        if not is_local_dir(spec):
            raise ModelLoadError(f"{role}: local model directory {path!r} does not exist")
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype),
        "attn_implementation": "eager",
        "trust_remote_code": trust_remote_code,
    }
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if use_safetensors is not None and is_local_dir(path):
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
    except _corrupt_file_errors() as e:
        raise ModelLoadError(
            f"{role}: the weights in {path!r} are corrupt or truncated ({one_line(e)}); "
            "re-download or re-export the checkpoint"
        ) from e
    except (OSError, ValueError, EOFError, RuntimeError) as e:
        raise ModelLoadError(
            f"{role}: could not load a causal LM from {path!r}: {one_line(e)}"
        ) from e
    except pickle.UnpicklingError as e:  # torch's weights_only loader refused the pickle
        raise ModelLoadError(
            f"{role}: the PyTorch pickle weights in {path!r} are not a loadable checkpoint: "
            "they hold objects other than tensors (possibly code), which the safe loader "
            "refused; nothing in them was run. Use a safetensors copy of the model from a "
            "source you trust."
        ) from e
    if device_map is None and device is not None:
        hf = hf.to(device)  # type: ignore[arg-type]  # HF stubs: .to is wrapped
    identity = {
        "name": path,
        "source": "local" if is_local_dir(path) else "hub",
        "revision": revision,
        "commit": getattr(hf.config, "_commit_hash", None),
    }
    return hf, path, identity


def load_tokenizer(
    spec: ModelSpec,
    hf: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None,
    trust_remote_code: bool,
    revision: str | None,
    role: str,
) -> PreTrainedTokenizerBase:
    """Return a tokenizer the bridge can use; never lets TL fetch one from the hub."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        src = (
            spec
            if isinstance(spec, (str, os.PathLike))
            else getattr(hf.config, "_name_or_path", None)
        )
        if not src or (not is_local_dir(src) and not isinstance(spec, (str, os.PathLike))):
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
    assert tokenizer is not None
    if not is_local_dir(getattr(tokenizer, "name_or_path", "") or ""):
        tokenizer = roundtrip_tokenizer(tokenizer)
    return tokenizer


def roundtrip_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Save and reload a tokenizer built in memory: the bridge reloads it by ``name_or_path``."""
    from transformers import AutoTokenizer

    d = Path(tempfile.mkdtemp(prefix="tl_transplant_tok_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    tokenizer.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounds the bool temporary to 16 MB


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds only finite values, in bounded extra memory."""
    flat = t.detach().reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all())
        for i in range(0, flat.numel(), _FINITE_CHUNK)
    )


def check_finite_weights(
    params: dict[str, torch.Tensor], names: list[str], name: str, role: str,
    *, warn_only: bool = False,
) -> None:
    """Refuse NaN/inf in any floating tensor (unit tensors first, then embeddings, norms...).

    Every tensor is checked, not just the unit tensors: a NaN in ``embed_tokens`` or a
    norm poisons every forward the scores and the sweep run. One pass over the weights,
    chunked, so it costs about as much as reading them once. ``warn_only`` (what
    ``check_finite=False`` asks for): load anyway, with one warning saying what follows.
    """
    order = list(dict.fromkeys([*names, *params]))
    for n in order:
        t = params[n]
        if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            if warn_only:
                warnings.warn(
                    f"{role} {name!r} has NaN or inf values in {n}, loaded anyway "
                    "(check_finite=False): forwards that read it give NaN logits, so the "
                    "scores of the units they touch are NaN (Scores.top() skips them) and "
                    "accuracies count those examples as wrong (0.0). Fix the checkpoint for "
                    "results that mean something.",
                    UserWarning, stacklevel=4,
                )
                return
            raise NonFiniteWeightsError(
                f"{role} {name!r} has NaN or inf values in {n}. Transplanting from or into it "
                "would spread them; fix the checkpoint, or pass check_finite=False "
                "(--no-check-finite on the command line) to load it anyway (transplants "
                "still refuse non-finite source slices)."
            )


__all__ = [
    "ModelSpec",
    "check_device",
    "check_finite_weights",
    "is_local_dir",
    "load_hf",
    "load_tokenizer",
    "quiet_loading",
    "resolve_dtype",
    "roundtrip_tokenizer",
]
