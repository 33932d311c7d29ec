"""Load a GGUF checkpoint as an ordinary float Hugging Face causal LM.

GGUF files (llama.cpp's format) hold quantized weights, the config and the
tokenizer in one file. ``transformers`` dequantizes them with the ``gguf``
package; this module wraps that so the result is a plain float model with
eager attention (what the TransformerBridge needs), a tokenizer saved to and
reloaded from a real directory (the bridge reloads tokenizers by
``name_or_path``), and an identity record naming the file, its SHA-256 and its
quantization, so a manifest says which checkpoint a transplant came from.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from tl_transplant.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"


def is_gguf(spec: object) -> bool:
    """True when ``spec`` names a GGUF file: a path ending in ``.gguf``, or a file with its magic.

    A missing path ending in ``.gguf`` counts (so loading it reports the missing
    file instead of falling through to a hub lookup).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        return False
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    try:
        with p.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (never holds the file in memory)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _require_gguf_package() -> ModuleType:
    try:
        import gguf
    except ImportError as e:
        raise ModelLoadError(
            "loading a .gguf file needs the `gguf` package (transformers dequantizes with it); "
            "install it with `pip install gguf`."
        ) from e
    return gguf


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} is a directory, not a GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "pass a llama.cpp .gguf file, or a Hugging Face model directory."
        )


def _field_value(reader: GGUFReader, key: str) -> Any:
    """One scalar metadata value of a GGUFReader (str for strings), or None if absent."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Architecture, file type and tensor quantization counts of a GGUF file (no weights read)."""
    gguf = _require_gguf_package()
    path = Path(path).expanduser()
    _check_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on corrupt files
        raise ModelLoadError(f"{str(path)!r} could not be read as GGUF: {e}") from e
    arch = _field_value(reader, "general.architecture")
    ftype = _field_value(reader, "general.file_type")
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    if ftype is not None:
        try:
            quant = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"file_type={ftype}"
    else:  # older files: name the most common type among the 2-D (weight matrix) tensors
        mats = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
        quant = mats.most_common(1)[0][0] if mats else "unknown"
    return {
        "architecture": arch,
        "quantization": quant,
        "tensor_types": dict(sorted(types.items())),
        "n_tensors": len(reader.tensors),
        "name": _field_value(reader, "general.name"),
    }


def _check_architecture(arch: str | None, path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{str(path)!r} holds a {arch!r} model, which the installed transformers cannot load "
            f"from GGUF (it can: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}). Convert it to "
            "a Hugging Face directory with llama.cpp's tools, or upgrade transformers."
        )


def _tokenizer_in_dir(
    tokenizer: PreTrainedTokenizerBase, out_dir: Path | None
) -> PreTrainedTokenizerBase:
    """Save the tokenizer and reload it, so ``name_or_path`` is a real directory."""
    from transformers import AutoTokenizer

    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="tl_transplant_gguf_tok_"))
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def load_gguf(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Dequantize a GGUF file into ``(model, tokenizer, identity)``.

    ``model`` is an ordinary ``PreTrainedModel`` in ``dtype`` with eager
    attention and no quantization config left on it (so ``save_pretrained``
    writes a plain float checkpoint). ``tokenizer`` comes from the same file,
    saved to ``tokenizer_dir`` (a temporary directory removed at exit if None)
    and reloaded from there. ``identity`` records ``gguf_file``,
    ``gguf_sha256``, ``gguf_quantization`` and ``source: "gguf"``.
    """
    path = Path(path).expanduser().resolve()
    meta = gguf_metadata(path)  # checks the file, its magic and the gguf package
    _check_architecture(meta["architecture"], path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name}
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=dtype, attn_implementation="eager", **kwargs
        )
        tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"could not load {str(path)!r} as a causal LM: {e}") from e
    except RuntimeError as e:  # transformers: a tensor whose shape the config contradicts
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "ignore_mismatched_sizes" in first:  # transformers' advice, not ours to give
            first = "transformers found tensors of the wrong size"
        raise ModelLoadError(
            f"could not load {str(path)!r}: its tensor shapes contradict its own metadata "
            f"(the model it describes); the file is damaged or was written by a broken "
            f"converter. Re-convert it (llama.cpp's convert_hf_to_gguf.py) or use the Hugging "
            f"Face directory. ({first})"
        ) from e
    # Dequantized weights are plain floats: drop the GGUF marker so saving and reloading
    # gives an ordinary checkpoint rather than one that asks for the .gguf file again.
    for obj in (hf.config, getattr(hf, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if getattr(hf, "hf_quantizer", None) is not None:
        # marks it quantized, which save_pretrained refuses (nn.Module.__setattr__ is typed
        # for tensors and modules only)
        hf.hf_quantizer = None  # type: ignore[assignment]
    hf.config._name_or_path = str(path)
    hf.eval()
    tok = _tokenizer_in_dir(tok, None if tokenizer_dir is None else Path(tokenizer_dir))
    identity = {
        "name": str(path),
        "source": "gguf",
        "gguf_file": str(path),
        "gguf_sha256": file_sha256(path),
        "gguf_quantization": meta["quantization"],
        "gguf_tensor_types": meta["tensor_types"],
        "gguf_architecture": meta["architecture"],
    }
    return hf, tok, identity
