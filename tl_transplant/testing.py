"""Tiny offline model builders for tests, docs and benchmarks.

Everything here is built from configs and a word-level tokenizer saved to disk
and reloaded (a tokenizer that exists only in memory trips the bridge), so no
hub access is ever needed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tl_transplant.arch.registry import supported_model_types, tiny_config_kwargs
from tl_transplant.arch.schema import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.arch.units import Unit
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

_M = TypeVar("_M", bound=torch.nn.Module)

#: Every supported HF model type: each has a tiny config in its FamilyLayout's ``tiny``.
#: Derived from the layout table at import; :func:`tiny_model_types` sees later registrations.
TINY_FAMILIES: tuple[str, ...] = tuple(supported_model_types())


def tiny_model_types() -> list[str]:
    """Every model type with a layout table (and so a tiny config), now."""
    return supported_model_types()


def word_tokenizer(
    path: str | Path, words: list[str] | None = None, n_words: int = 92
) -> PreTrainedTokenizerBase:
    """A whitespace word-level fast tokenizer, saved to ``path`` and reloaded from there.

    Ids 0-3 are ``<pad> <bos> <eos> <unk>``; then ``words`` (default ``w0 .. w{n-1}``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = words if words is not None else [f"w{i}" for i in range(n_words)]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    path = Path(path)
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tiny_config(family: str, vocab_size: int = 96, **overrides: Any) -> PretrainedConfig:
    """A 2-layer config of an HF model type, from its layout table's ``tiny`` entry
    (GQA with 4 query / 2 KV heads where the architecture supports it)."""
    from transformers import AutoConfig

    try:
        kwargs = dict(tiny_config_kwargs(family))
    except UnsupportedArchitectureError:
        raise ValueError(
            f"no tiny config for {family!r}; choose from {', '.join(tiny_model_types())}"
        ) from None
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = AutoConfig.for_model(family, **{**common, **kwargs})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (float32, eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # What save_pretrained records, and what TransformerLens picks its adapter by: without
    # it, model types missing from TL's model_type fallback (gemma3_text, olmo2, granite)
    # fail to boot from an in-memory model.
    model.config.architectures = model.config.architectures or [type(model).__name__]
    # Random biases / norm weights so that every tensor matters in equality tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def perturbed_copy(model: _M, scale: float = 0.05, seed: int = 1) -> _M:
    """A copy of ``model`` with every floating tensor nudged by Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def save_tiny(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path
) -> Path:
    """Save a model and tokenizer as an HF directory (safetensors)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_pair_dirs(family: str, root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a (source, target) pair of tiny models of one family under ``root``."""
    root = Path(root)
    tok = word_tokenizer(root / "tokenizer")
    target = tiny_model(family, seed=seed)
    source = perturbed_copy(target, scale=0.2, seed=seed + 1)
    return save_tiny(source, tok, root / "source"), save_tiny(target, tok, root / "target")


def tiny_run_dir(d: str | Path) -> Path:
    """A run's inputs under ``d``: a tiny llama pair (``source/``, ``target/``, a word
    tokenizer in ``tok/``) and two 24-item successor tasks (``task.jsonl``,
    ``control.jsonl``, seeds 0 and 1) as JSONL files."""
    import json

    from tl_transplant.tasks.builtin import builtin_task

    d = Path(d)
    tok = word_tokenizer(d / "tok")
    target = tiny_model("llama", seed=5)
    save_tiny(perturbed_copy(target, scale=0.3, seed=6), tok, d / "source")
    save_tiny(target, tok, d / "target")
    for name, seed in (("task", 0), ("control", 1)):
        t = builtin_task("successor", n=24, seed=seed, prepend_bos=True)
        with (d / f"{name}.jsonl").open("w") as f:
            for p, a in zip(t.prompts, t.answers):
                f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return d


def snapshot_side(side: ModelSide) -> dict[str, torch.Tensor]:
    """Clones of a side's HF tensors and its bridge's state (to prove bit-exact restores)."""
    snap = {f"p:{k}": v.detach().clone() for k, v in side.params.items()}
    snap.update({f"b:{k}": v.detach().clone() for k, v in side.bridge.state_dict().items()})
    return snap


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when two snapshots hold the same names and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def restore_target(pair: ModelPair, snap: dict[str, torch.Tensor]) -> ModelPair:
    """Put back the target's weights from :func:`snapshot_side` and forget every transplant
    record, so a session-scoped pair starts each test as loaded (checked bit for bit)."""
    with torch.no_grad():
        for k, v in pair.target.params.items():
            v.data.copy_(snap[f"p:{k}"])
    pair.target.refresh_mirrors()
    pair.applied.clear()
    pair.active.clear()
    assert same_state(snapshot_side(pair.target), snap)
    return pair


def check_family(model_type: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """The per-family checks, runnable on any registered model type (e.g. a new table entry).

    Builds two tiny models of ``model_type`` that differ only inside unit slices,
    loads them as a pair (which checks the table against the booted bridge and
    its mirrors), then checks that every head/KV/neuron unit covers only its own
    weights: moving all of them with alpha 1 turns the target's logits into the
    source's, alpha 0 changes nothing, the revert is bit-exact, and together
    the units cover every element of every linear (but the output projections'
    biases, which belong to no head or neuron). Raises
    ``AssertionError`` (or the loader's clear error) naming what does not hold.
    """
    from tl_transplant.edit.edits import transplant
    from tl_transplant.models.pair import ModelPair

    kinds = ("head", "kv_head", "neuron")
    pair = ModelPair.load(
        (tiny_model(model_type, seed=3), tokenizer), (tiny_model(model_type, seed=3), tokenizer)
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for u in pair.units(kinds):
            for s in pair.layout.slices(u):
                view = pair.source.params[s.param].narrow(s.dim, s.start, s.size)
                view.add_(0.3 * torch.randn(view.shape, generator=gen))
    pair.source.refresh_mirrors()
    _check_coverage(pair.layout, pair.units(kinds), model_type)
    ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41]])

    def logits(side: ModelSide) -> torch.Tensor:
        with torch.no_grad():
            return side.bridge(ids, return_type="logits")

    base, src = logits(pair.target), logits(pair.source)
    snap = snapshot_side(pair.target)
    assert (base - src).abs().max() > 1e-2, f"{model_type}: perturbing the units changed nothing"
    with transplant(pair, pair.units(kinds), alpha=0.0):
        assert torch.equal(logits(pair.target), base), f"{model_type}: alpha=0 changed logits"
    with transplant(pair, pair.units(kinds), alpha=1.0):
        got = logits(pair.target)
        assert torch.allclose(got, src, atol=1e-5, rtol=1e-5), (
            f"{model_type}: moving every unit did not give the source's logits (max diff "
            f"{(got - src).abs().max():.2e}); some weight a unit should cover is missing "
            "from its table pieces"
        )
    assert same_state(snap, snapshot_side(pair.target)), f"{model_type}: revert was not exact"


def _check_coverage(layout: ModelLayout, units: list[Unit], model_type: str) -> None:
    """Every element of every unit tensor lies in some unit's slice (output biases aside)."""
    exempt = {
        layout.param_name(layer, layout.output_linear(k) + ".bias")
        for layer in range(layout.n_layers)
        for k in ("head", "neuron")
    }
    masks = {n: torch.zeros(layout.shapes[n], dtype=torch.bool) for n in layout.unit_tensors()}
    for u in units:
        for s in layout.slices(u):
            masks[s.param].narrow(s.dim, s.start, s.size).fill_(True)
    for n, m in masks.items():
        if n not in exempt and not bool(m.all()):
            raise AssertionError(
                f"{model_type}: {int((~m).sum())} element(s) of {n} belong to no head, KV "
                "group or neuron; a piece is missing from the family's table"
            )
