"""The family table is the one home of per-architecture knowledge, and every entry is tested."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tl_transplant import ModelPair
from tl_transplant.arch.bridge import check_bridge
from tl_transplant.arch.families import FAMILIES
from tl_transplant.arch.model_layout import (
    ModelLayout,
    TensorSlice,
    bind_checkpoint_layout,
    bind_layout,
)
from tl_transplant.arch.registry import (
    family_for,
    register_family,
    registered_families,
    supported_model_types,
    unregister_family,
)
from tl_transplant.arch.schema import (
    CheckpointAlias,
    FamilyLayout,
    LayoutMismatchError,
    UnsupportedArchitectureError,
)
from tl_transplant.arch.units import Head, Linear, Neuron
from tl_transplant.models.side import ModelSide
from tl_transplant.testing import (
    TINY_FAMILIES,
    check_family,
    tiny_config,
    tiny_model,
    tiny_model_types,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_an_architecture.md"


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Put the family registry back as it was, whatever a test registered."""
    before = registered_families()
    yield
    for fam in registered_families():
        unregister_family(fam.family)
    for fam in before:
        register_family(fam)


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _side(model_type: str, tok, seed: int = 0) -> ModelSide:
    return ModelSide.from_hf(tiny_model(model_type, seed=seed), tok, name=model_type)


# ---- every table entry is covered ------------------------------------------------------


def test_every_supported_model_type_has_a_tiny_config():
    assert set(TINY_FAMILIES) == set(supported_model_types()) == set(tiny_model_types())
    for mt in supported_model_types():
        cfg = tiny_config(mt)
        assert cfg.model_type == mt
        assert cfg.vocab_size == 96
        # TransformerLens picks its adapter by config.architectures, which only
        # save_pretrained would otherwise fill in (gemma3_text/olmo2/granite need it)
        model = tiny_model(mt)
        assert model.config.architectures == [type(model).__name__]
    with pytest.raises(ValueError, match="no tiny config for 'nope'"):
        tiny_config("nope")


def test_family_fixture_runs_over_every_model_type(request: pytest.FixtureRequest):
    """The conftest ``family`` fixture (all per-family tests) is the whole table."""
    defs = request._fixturemanager.getfixturedefs("family", request.node)  # type: ignore[attr-defined]
    assert defs, "conftest.py lost its family fixture"
    assert sorted(defs[-1].params) == supported_model_types()


def test_builtin_families_are_registered():
    assert [f.family for f in registered_families()] == [f.family for f in FAMILIES]


def test_table_matches_the_bridge(family, tok):
    side = _side(family, tok)
    check_bridge(side.layout, side.bridge)  # also run by from_hf; must stay cheap and pass
    hooks = set(side.bridge.hook_dict)
    for layer in range(side.layout.n_layers):
        for lin in side.layout.linear_names():
            assert set(side.layout.linear_hooks(Linear(layer, lin))) <= hooks
        for point in ("head", "kv_k", "kv_v", "pattern", "neuron", "resid_post"):
            assert side.layout.hook(point, layer) in hooks


# ---- orientation: output_block / output_blocks ------------------------------------------


def _old_out_weight(w: torch.Tensor, layout: ModelLayout, kind: str, layer: int) -> torch.Tensor:
    """scoring/_base.py's out_weight before the move (the dim test), as the reference."""
    cls = Head if kind == "head" else Neuron
    n = layout.dims.H if kind == "head" else layout.dims.I
    first: TensorSlice = layout.output_slice(cls(layer, 0))
    size = first.size
    step = layout.output_slice(cls(layer, 1)).start - first.start
    starts = first.start + step * torch.arange(n)
    idx = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1)
    cols = w.index_select(first.dim, idx)
    if first.dim == 1:  # nn.Linear [D, in]
        return cols.T.reshape(n, size, -1)
    return cols.reshape(n, size, -1)  # Conv1D [in, D]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "phi3"])
def test_output_blocks_match_the_old_rule(model_type, tok):
    side = _side(model_type, tok)
    lay = side.layout
    for kind in ("head", "neuron"):
        for layer in range(lay.n_layers):
            w = side.params[lay.param_name(layer, lay.output_linear(kind) + ".weight")].detach()
            blocks = lay.output_blocks(w, kind, layer)
            n, size = lay.count(kind), lay.output_slice(
                (Head if kind == "head" else Neuron)(layer, 0)
            ).size
            assert blocks.shape == (n, size, lay.dims.D)
            assert torch.equal(blocks, _old_out_weight(w, lay, kind, layer))
            for u in (0, n - 1):
                unit = (Head if kind == "head" else Neuron)(layer, u)
                one = lay.output_block(w, lay.output_slice(unit))
                assert torch.equal(one, blocks[u])
                # the old patching rule: narrow, transpose when dim == 1
                s = lay.output_slice(unit)
                old = w.narrow(s.dim, s.start, s.size)
                assert torch.equal(one, old.T if s.dim == 1 else old)
    w = side.params[lay.param_name(0, lay.output_linear("head") + ".weight")]
    with pytest.raises(LayoutMismatchError, match="pass the tensor named"):
        lay.output_blocks(w[:-1], "head", 0)
    with pytest.raises(ValueError, match="'head' or 'neuron'"):
        lay.output_blocks(w, "kv_head", 0)


# ---- checkpoint-name aliases -------------------------------------------------------------


def test_bind_checkpoint_layout_gpt2_without_base_prefix():
    model = tiny_model("gpt2")
    canonical = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layout, rename = bind_checkpoint_layout(model.config, canonical)
    assert rename == {n: n for n in canonical}
    stored = {k: tuple(v.shape) for k, v in model.transformer.state_dict().items()}
    assert "h.0.attn.c_attn.weight" in stored and "transformer.h.0.attn.c_attn.weight" not in stored
    with pytest.raises(LayoutMismatchError):
        bind_layout(model.config, stored)
    layout2, rename2 = bind_checkpoint_layout(model.config, stored)
    assert rename2["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight"
    assert set(rename2.values()) == set(stored)
    assert layout2.slices("L1.H2") == layout.slices("L1.H2")
    assert layout2.dims == layout.dims


def test_bind_checkpoint_layout_without_aliases_errors_clearly():
    model = tiny_model("llama")
    assert family_for("llama").checkpoint_aliases == ()
    stored = {k.removeprefix("model."): tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(LayoutMismatchError, match="declares no checkpoint_aliases") as e:
        bind_checkpoint_layout(model.config, stored)
    assert "model.layers.0." in str(e.value)
    with pytest.raises(UnsupportedArchitectureError):
        bind_checkpoint_layout(type("C", (), {"model_type": "nope"})(), stored)


def test_checkpoint_alias_other_prefixes(restore_registry):
    model = tiny_model("llama")
    llama = family_for("llama")
    register_family(
        dataclasses.replace(llama, checkpoint_aliases=(CheckpointAlias("model.", "base."),)),
        replace=True,
    )
    stored = {"base." + k.removeprefix("model."): tuple(v.shape) for k, v in model.state_dict().items()}
    layout, rename = bind_checkpoint_layout(model.config, stored)
    assert rename["model.layers.1.mlp.down_proj.weight"] == "base.layers.1.mlp.down_proj.weight"
    assert layout.n_layers == 2


# ---- mirrors: aliases come from the table ------------------------------------------------


def test_mirror_aliases_are_table_data(tok, restore_registry):
    side = _side("gpt_neox", tok)
    paths = {p for p, _ in side.layout.mirror_slices(0)}
    assert {"gpt_neox.layers.0.attention.q.weight", "gpt_neox.layers.0.attn.q.weight"} <= paths
    assert side.mirrors  # the bridge's split q/k/v are tracked
    neox = family_for("gpt_neox")

    def attn_named(m, aliases):  # the same copy, declared under its attn.* name
        return dataclasses.replace(m, path=m.aliases[0], aliases=aliases)

    swapped = tuple(attn_named(m, (m.path,)) for m in neox.mirrors)
    register_family(dataclasses.replace(neox, mirrors=swapped), replace=True)
    assert len(_side("gpt_neox", tok).mirrors) == len(side.mirrors)  # found through the alias
    bare = tuple(attn_named(m, ()) for m in neox.mirrors)
    register_family(dataclasses.replace(neox, mirrors=bare), replace=True)
    with pytest.raises(LayoutMismatchError, match=r"attention\.q\.weight.*does not declare"):
        _side("gpt_neox", tok)


# ---- deliberately wrong entries fail clearly ---------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "change", "message"),
    [
        (
            "gpt2",
            lambda f: {"bridge_hooks": {**f.bridge_hooks, "attn.c_proj": ("attn.out.hook_out",)}},
            r"bridge_hooks\['attn.c_proj'\] names 'blocks.0.attn.out.hook_out'.*does not have",
        ),
        (
            "llama",
            lambda f: {"hook_points": {"head": "attn.hook_zz"}},
            r"hook point 'head' is 'blocks.0.attn.hook_zz'.*set hook_points\['head'\]",
        ),
        (
            "olmo2",
            lambda f: {"joint_norms": {**f.joint_norms, "head": "attn.q_nrm.hook_out"}},
            r"joint_norms\['head'\] is 'attn.q_nrm.hook_out'.*no hook blocks.0.attn.q_nrm",
        ),
        (
            # q and o are both [32, 32] in the tiny llama, so only the adapter check can tell
            "llama",
            lambda f: {
                "linears": {
                    **f.linears,
                    "attn.q_proj": "self_attn.o_proj",
                    "attn.o_proj": "self_attn.q_proj",
                }
            },
            r"linears\['attn.q_proj'\] is 'model.layers.0.self_attn.o_proj', but the "
            r"TransformerLens adapter maps .*blocks.0.attn.q.* to 'model.layers.0.self_attn.q_proj'",
        ),
    ],
)
def test_wrong_table_entry_fails_at_load(model_type, change, message, tok, restore_registry):
    fam = family_for(model_type)
    model = tiny_model(model_type)
    register_family(dataclasses.replace(fam, **change(fam)), replace=True)
    with pytest.raises(LayoutMismatchError, match=message) as e:
        ModelSide.from_hf(model, tok, name="wrong")
    assert f"the {fam.family} FamilyLayout" in str(e.value)


def test_register_family_refuses_bad_entries(restore_registry):
    llama = family_for("llama")
    with pytest.raises(LayoutMismatchError, match="already have a layout: gemma"):
        register_family(dataclasses.replace(llama, family="llama_copy"))
    with pytest.raises(LayoutMismatchError, match="already registered"):
        register_family(llama)
    with pytest.raises(LayoutMismatchError, match="no tiny config for model type.*olmo"):
        register_family(dataclasses.replace(llama, family="x", model_types=("olmo",), tiny={}))
    with pytest.raises(LayoutMismatchError, match="'attn.nope' is not one of its linears"):
        register_family(
            dataclasses.replace(
                llama,
                family="x",
                model_types=("olmo",),
                tiny={"olmo": llama.tiny["llama"]},
                head=(dataclasses.replace(llama.head[0], tensor="attn.nope.weight"),),
            )
        )
    with pytest.raises(LayoutMismatchError, match="joint_norms keys must be.*not neuron"):
        register_family(
            dataclasses.replace(llama, joint_norms={"neuron": "mlp.hook_post"}), replace=True
        )
    with pytest.raises(LayoutMismatchError, match="no bridge_hooks for linear.*mlp.up_proj"):
        hooks = {k: v for k, v in llama.bridge_hooks.items() if k != "mlp.up_proj"}
        register_family(dataclasses.replace(llama, bridge_hooks=hooks), replace=True)
    assert family_for("llama") is llama  # a refused registration changes nothing
    with pytest.raises(UnsupportedArchitectureError, match="no family named 'nope'"):
        unregister_family("nope")


def test_registered_family_is_used_and_removed(restore_registry):
    llama = family_for("llama")
    unregister_family("llama")
    with pytest.raises(UnsupportedArchitectureError, match="docs/adding_an_architecture.md"):
        family_for("mistral")
    assert "mistral" not in supported_model_types()
    register_family(llama)
    assert family_for("mistral") is llama


# ---- the walk-through stays true ---------------------------------------------------------


def test_adding_an_architecture_doc_runs(tmp_path, restore_registry):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3, "the doc's python blocks changed; keep this test in step"
    assert "olmo" not in supported_model_types() and "starcoder2" not in supported_model_types()
    env: dict = {"workdir": tmp_path}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), env)  # noqa: S102 - our own doc
    assert family_for("olmo").family == "llama"
    assert family_for("starcoder2").family == "starcoder2"
    pair = ModelPair.load(
        (tiny_model("starcoder2", seed=1), env["word_tokenizer"](tmp_path / "t2")),
        (tiny_model("starcoder2", seed=2), env["word_tokenizer"](tmp_path / "t2")),
    )
    assert len(pair.units("head")) == 8 and len(pair.units("kv_head")) == 4
    # every name the doc mentions in backticks that looks like our API exists
    import tl_transplant.arch as layouts
    import tl_transplant.testing as testing

    for name in ("register_family", "bind_checkpoint_layout", "check_bridge", "FAMILIES",
                 "DEFAULT_HOOK_POINTS", "CheckpointAlias", "Mirror", "FamilyLayout"):
        assert name in text and hasattr(layouts, name), name
    assert "check_family" in text and hasattr(testing, "check_family")
    for field in re.findall(r"^- `(\w+)`:", text, flags=re.M):
        assert field in {f.name for f in dataclasses.fields(FamilyLayout)}, field


def test_check_family_catches_a_missing_piece(tok, restore_registry):
    """A table that forgets a weight a unit covers fails the per-family check."""
    phi = family_for("phi")
    no_bias = tuple(p for p in phi.neuron if p.tensor != "mlp.fc1.bias")
    register_family(dataclasses.replace(phi, neuron=no_bias), replace=True)
    with pytest.raises(AssertionError, match=r"48 element\(s\) of model.layers.0.mlp.fc1.bias belong"):
        check_family("phi", tok)
