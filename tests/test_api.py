"""The package surface: root names vs submodules, ``__all__``, and jaxtyping shapes at runtime.

The shape annotations (``Float[torch.Tensor, "batch seq vocab"]``) are only
documentation unless something checks them. Here the key tensor APIs are
wrapped in ``jaxtyped(typechecker=beartype)`` (the wrapping is local to the
test: the package itself is not changed) and called with right and wrong
shapes: right shapes pass, wrong ones raise ``jaxtyping.TypeCheckError``.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import numpy as np
import pytest
import torch
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import tl_transplant
from tl_transplant import stats, tokens
from tl_transplant.arch.model_layout import ModelLayout, bind_layout
from tl_transplant.arch.units import Head, Neuron
from tl_transplant.scoring.accumulate import UnitTable


def checked(fn):
    """``fn`` with its jaxtyping annotations enforced (shapes shared across arguments)."""
    return jaxtyped(typechecker=beartype)(fn)


def _submodules() -> list[str]:
    """Every importable module under tl_transplant, by dotted name."""
    out = []
    for info in pkgutil.walk_packages(tl_transplant.__path__, prefix="tl_transplant."):
        out.append(info.name)
    return sorted(out)


# ---- names ----------------------------------------------------------------------------


def test_no_root_name_shadows_a_submodule():
    """``tl_transplant.X`` is the module whenever ``tl_transplant/X.py`` (or ``X/``) exists.

    (``evaluate``/``sweep``/``transplant`` are functions; their modules are
    ``evaluation``/``sweeps``/``edits``.)
    """
    direct = [m.name for m in pkgutil.iter_modules(tl_transplant.__path__)]
    assert "evaluation" in direct and "sweeps" in direct  # the walk sees the package
    for name in direct:
        mod = importlib.import_module(f"tl_transplant.{name}")
        assert getattr(tl_transplant, name) is mod, (
            f"tl_transplant.{name} is {getattr(tl_transplant, name)!r}, "
            f"not the submodule tl_transplant/{name}"
        )
    for name in dir(tl_transplant):
        attr = getattr(tl_transplant, name)
        if name in direct:
            assert isinstance(attr, types.ModuleType), name
    for fn in ("evaluate", "sweep", "transplant", "score", "run"):
        assert callable(getattr(tl_transplant, fn)) and fn not in direct


def test_subpackage_names_do_not_shadow_their_submodules():
    for modname in _submodules():
        mod = importlib.import_module(modname)
        if not hasattr(mod, "__path__"):
            continue
        for info in pkgutil.iter_modules(mod.__path__):
            sub = importlib.import_module(f"{modname}.{info.name}")
            assert getattr(mod, info.name) is sub, f"{modname}.{info.name} is not the submodule"


def test_all_names_exist_everywhere():
    assert "ModelPair" in tl_transplant.__all__
    assert len(set(tl_transplant.__all__)) == len(tl_transplant.__all__), "duplicates in __all__"
    missing = [n for n in tl_transplant.__all__ if not hasattr(tl_transplant, n)]
    assert not missing, f"tl_transplant.__all__ names missing attributes: {missing}"
    for modname in _submodules():
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        if names is None:
            continue
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{modname}.__all__ names missing attributes: {missing}"


# ---- jaxtyping shapes at runtime ---------------------------------------------------------


def _enc(batch: int = 2, seq: int = 5) -> tokens.Encoded:
    ids = torch.arange(batch * seq).reshape(batch, seq) % 7 + 1
    return tokens.Encoded(ids, torch.full((batch,), 2), torch.full((batch,), 2), 0)


def test_answer_logprobs_shapes_are_checked():
    f = checked(tokens.answer_logprobs)
    enc = _enc()
    logits = torch.randn(2, 5, 11)
    out = f(logits, enc)
    assert out.shape == (2,)
    torch.testing.assert_close(out, tokens.answer_logprobs(logits, enc))  # same function
    with pytest.raises(TypeCheckError):
        f(torch.randn(5, 11), enc)  # no batch axis
    with pytest.raises(TypeCheckError):
        f(torch.randn(2, 5, 11).long(), enc)  # not a float tensor


def test_last_prompt_logits_and_mc_scores_shapes_are_checked():
    lp = checked(tokens.last_prompt_logits)
    assert lp(torch.randn(2, 5, 11), _enc()).shape == (2, 11)
    with pytest.raises(TypeCheckError):
        lp(torch.randn(2, 5), _enc())
    batch = tokens.ChoiceBatch(_enc(4), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2)
    mc = checked(tokens.mc_scores)
    got = mc(torch.tensor([0.0, -1.0, -2.0, -0.5], dtype=torch.float64), batch, [0, 1])
    assert got.tolist() == [1.0, 1.0]
    with pytest.raises(TypeCheckError):
        mc(torch.zeros(4, 1, dtype=torch.float64), batch, [0, 1])  # rows must be 1-D


def test_bootstrap_means_shape_is_checked():
    f = checked(stats.bootstrap_means)
    out = f([np.arange(6.0), np.ones(6)], n_boot=50, seed=0)
    assert out.shape == (50, 2)
    np.testing.assert_allclose(out[:, 1], 1.0)


def test_unit_table_put_checks_the_shared_batch_axis():
    layout = _tiny_layout()
    units = [Head(0, 1), Head(0, 3), Neuron(1, 2)]
    table = UnitTable(units, layout)
    put = checked(UnitTable.put)
    out = torch.zeros(3, len(units), dtype=torch.float64)
    put(table, out, "head", 0, torch.arange(12.0).reshape(3, 4))
    assert out[:, :2].tolist() == [[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]]
    with pytest.raises(TypeCheckError):  # 2 prompts of values for a 3-prompt batch
        put(table, out, "head", 0, torch.zeros(2, 4))


def test_output_blocks_shape_is_checked():
    layout = _tiny_layout()
    f = checked(ModelLayout.output_blocks)
    name = layout.param_name(0, layout.output_linear("head") + ".weight")
    w = torch.randn(layout.shapes[name])
    blocks = f(layout, w, "head", 0)
    d = layout.dims
    assert blocks.shape == (d.H, w.shape[1] // d.H, w.shape[0])
    torch.testing.assert_close(blocks[1], layout.output_block(w, layout.output_slice(Head(0, 1))))


def _tiny_layout() -> ModelLayout:
    from tl_transplant.testing import tiny_config

    cfg = tiny_config("llama")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg)
    return bind_layout(cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})
