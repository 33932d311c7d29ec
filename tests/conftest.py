"""Shared fixtures: tiny offline models of every model type in the layout table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from tl_transplant import ModelPair, ModelSide  # noqa: E402
from tl_transplant.arch.registry import supported_model_types  # noqa: E402
from tl_transplant.testing import tiny_model, tiny_pair_dirs, word_tokenizer  # noqa: E402


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


def argmax_next(side: ModelSide, prompts: list[str]) -> list[int]:
    """The side's argmax token id after each ``<bos> prompt``: one forward per prompt length
    (no padding, so each row is computed exactly as alone)."""
    bos = side.tokenizer.bos_token_id
    rows = [[bos, *side.tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    out = [0] * len(rows)
    for n in sorted({len(r) for r in rows}):
        idx = [i for i, r in enumerate(rows) if len(r) == n]
        with torch.inference_mode():
            top = side.bridge(torch.tensor([rows[i] for i in idx]))[:, -1].argmax(-1).tolist()
        for i, t in zip(idx, top):
            out[i] = int(t)
    return out


@pytest.fixture(scope="session")
def engineered_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPair, object]:
    """A llama pair equal except L1.mlp.down_proj and L1.attn.o_proj, and its word tokenizer.

    Built once per session and shared by test_evaluate and test_sweep: tests only read it or
    edit it inside a transplant (which restores it, as those tests assert)."""
    tok = word_tokenizer(tmp_path_factory.mktemp("eng_tok"))
    target = tiny_model("llama", seed=0)
    source = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer = source.model.layers[1]
        for mod in (layer.mlp.down_proj, layer.self_attn.o_proj):
            mod.weight.copy_(0.5 * torch.randn(mod.weight.shape, generator=g))
    return ModelPair.load((source, tok), (target, tok)), tok


@pytest.fixture(scope="session")
def next_ids() -> Callable[[ModelSide, list[str]], list[int]]:
    return argmax_next
