"""Shared fixtures: tiny offline models of every model type in the layout table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tl_transplant.layouts import supported_model_types  # noqa: E402
from tl_transplant.testing import tiny_pair_dirs, word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_root: Path) -> Path:
    word_tokenizer(tiny_root / "tok")
    return tiny_root / "tok"


@pytest.fixture(scope="session")
def pair_dirs(tiny_root: Path):
    """Factory: (source_dir, target_dir) for a family, built once per session."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cache[family] = tiny_pair_dirs(family, tiny_root / family)
        return cache[family]

    return get


@pytest.fixture(params=supported_model_types())
def family(request: pytest.FixtureRequest) -> str:
    """Every model type in the layout table: a new FamilyLayout entry is tested with no
    other change (its tiny config comes from the entry's ``tiny``)."""
    return request.param
