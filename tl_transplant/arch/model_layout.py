"""A family table bound to one model: its dims, its tensor names and shapes, and the exact
slices every unit covers.

:func:`bind_layout` binds the table of ``config.model_type`` to a loaded model's tensors
(:class:`ModelLayout`); :func:`bind_checkpoint_layout` binds it to a saved checkpoint's
stored names, trying the family's checkpoint aliases. A :class:`ModelLayout` answers
every geometric question the rest of the package asks: a unit's :class:`TensorSlice`\\ s,
its parameter count, its bridge hooks, the output blocks of heads and neurons, and the
bridge copies to re-derive after an edit. It is also the one place that spells bridge hook
names (``blocks.{layer}.<rel>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from tl_transplant.arch.registry import family_for
from tl_transplant.arch.schema import (
    DEFAULT_HOOK_POINTS,
    FamilyLayout,
    LayoutMismatchError,
    Piece,
)
from tl_transplant.arch.units import (
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitError,
    UnitKind,
    normalize_kinds,
    parse_unit,
)


@dataclass(frozen=True)
class Dims:
    """The model dimensions that slice expressions use."""

    n_layers: int
    H: int
    KV: int
    dh: int
    D: int
    I: int  # noqa: E741 - the MLP width, named as in the slice expressions

    def env(self) -> dict[str, int]:
        return {"H": self.H, "KV": self.KV, "dh": self.dh, "D": self.D, "I": self.I}


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def dims_from_config(config: Any) -> Dims:
    """Read layer count, head counts and widths from an HF config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    D = int(_cfg(text, "hidden_size", "n_embd", "d_model"))
    H = int(_cfg(text, "num_attention_heads", "n_head"))
    KV = int(_cfg(text, "num_key_value_heads", default=H) or H)
    dh = int(_cfg(text, "head_dim", default=D // H))
    inner = _cfg(text, "intermediate_size", "n_inner")
    I = int(inner) if inner is not None else 4 * D  # noqa: E741
    n_layers = int(_cfg(text, "num_hidden_layers", "n_layer"))
    if H % KV != 0:
        raise LayoutMismatchError(f"num_attention_heads={H} is not a multiple of KV heads={KV}")
    return Dims(n_layers=n_layers, H=H, KV=KV, dh=dh, D=D, I=I)


def _eval(expr: str, env: Mapping[str, int]) -> int:
    return int(eval(expr, {"__builtins__": {}}, dict(env)))  # noqa: S307 - constant table text


@dataclass(frozen=True, order=True)
class TensorSlice:
    """``param[start:stop]`` along ``dim``: a concrete piece of one HF tensor."""

    param: str
    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "dim": self.dim, "start": self.start, "stop": self.stop}


@dataclass
class ModelLayout:
    """A family layout bound to one model's dims and parameter names/shapes."""

    family: FamilyLayout
    dims: Dims
    shapes: dict[str, tuple[int, ...]]
    model_type: str = ""
    _cache: dict[Unit, tuple[TensorSlice, ...]] = field(default_factory=dict, repr=False)

    # ---- naming -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    @property
    def group_size(self) -> int:
        return self.dims.H // self.dims.KV

    def prefix(self, layer: int) -> str:
        return self.family.layer_prefix.format(layer=layer)

    def linear_names(self) -> list[str]:
        """Unit names of the whole linears in one layer, e.g. ``attn.q_proj``."""
        return list(self.family.linears)

    def module_path(self, unit: Linear) -> str:
        """The HF module path of a whole linear, e.g. ``model.layers.3.self_attn.q_proj``."""
        self.validate(unit)
        return self.prefix(unit.layer) + self.family.linears[unit.name]

    def param_name(self, layer: int, tensor: str) -> str:
        """HF parameter name for a piece tensor like ``attn.q_proj.weight``."""
        lin, _, leaf = tensor.rpartition(".")
        return self.prefix(layer) + self.family.linears[lin] + "." + leaf

    # ---- units ----------------------------------------------------------------
    def count(self, kind: UnitKind) -> int:
        """Units of one kind per layer."""
        d = self.dims
        return {"head": d.H, "kv_head": d.KV, "neuron": d.I, "linear": len(self.family.linears)}[
            kind
        ]

    def units(self, kind: str | Iterable[str] | None = None) -> list[Unit]:
        """Every unit of the given kind(s), layer by layer."""
        out: list[Unit] = []
        for k in normalize_kinds(kind):
            for layer in range(self.n_layers):
                if k == "head":
                    out += [Head(layer, h) for h in range(self.dims.H)]
                elif k == "kv_head":
                    out += [KVHead(layer, g) for g in range(self.dims.KV)]
                elif k == "neuron":
                    out += [Neuron(layer, i) for i in range(self.dims.I)]
                else:
                    out += [Linear(layer, n) for n in self.family.linears]
        return out

    def validate(self, unit: Unit | str) -> Unit:
        """Return the parsed unit, or raise a :class:`UnitError` naming the valid range."""
        u = parse_unit(unit)
        d = self.dims
        if not 0 <= u.layer < d.n_layers:
            raise UnitError(
                f"{u}: layer {u.layer} does not exist; valid layers are 0..{d.n_layers - 1}"
            )
        if isinstance(u, Head) and not 0 <= u.head < d.H:
            raise UnitError(f"{u}: head {u.head} does not exist; valid heads are 0..{d.H - 1}")
        if isinstance(u, KVHead) and not 0 <= u.group < d.KV:
            raise UnitError(
                f"{u}: KV group {u.group} does not exist; valid groups are 0..{d.KV - 1}"
            )
        if isinstance(u, Neuron) and not 0 <= u.index < d.I:
            raise UnitError(f"{u}: neuron {u.index} does not exist; valid neurons are 0..{d.I - 1}")
        if isinstance(u, Linear) and u.name not in self.family.linears:
            raise UnitError(
                f"{u}: no linear named {u.name!r} in a {self.family.family} layer; valid names: "
                + ", ".join(self.family.linears)
            )
        return u

    def hook(self, point: str, layer: int) -> str:
        """Full bridge hook name of a named point (see :data:`DEFAULT_HOOK_POINTS`) in a layer,
        e.g. ``hook("head", 3) == "blocks.3.attn.hook_z"``."""
        rel = self.family.hook_points.get(point) or DEFAULT_HOOK_POINTS.get(point)
        if rel is None:
            raise LayoutMismatchError(
                f"unknown hook point {point!r}; known: {', '.join(DEFAULT_HOOK_POINTS)}"
            )
        return self.block_path(layer, rel)

    def block_path(self, layer: int, rel: str) -> str:
        """The bridge name of ``rel`` (a hook or component path relative to a block) in
        ``layer``: ``blocks.{layer}.{rel}``. The one place that spells it."""
        return f"blocks.{layer}.{rel}"

    def output_block(
        self, weight: torch.Tensor, s: TensorSlice
    ) -> Float[torch.Tensor, "size D"]:
        """A unit's block of its output projection as ``[size, D]`` (one write vector a row).

        ``s`` slices the projection's *input* dim; the other dim is the model dim, so
        moving the sliced dim first serves ``nn.Linear`` (``[D, in]``) and GPT-2's
        ``Conv1D`` (``[in, D]``) alike.
        """
        return weight.narrow(s.dim, s.start, s.size).movedim(s.dim, 0)

    def output_blocks(
        self, weight: torch.Tensor, kind: UnitKind, layer: int
    ) -> Float[torch.Tensor, "n size D"]:
        """Every head's (``kind="head"``) or neuron's output block in ``layer``, as
        ``[n, size, D]``: row ``r`` of block ``u`` is what unit ``u``'s ``r``-th input
        feature writes into the residual stream.

        ``weight`` is the output projection's HF tensor,
        ``self.param_name(layer, self.output_linear(kind) + ".weight")``. Its dtype is
        kept (callers promote). The blocks are one ``index_select`` when the table's
        slices are evenly spaced (every shipped layout), and the orientation is the
        same ``movedim`` as :meth:`output_block`, so ``Conv1D`` needs no special case.
        """
        if kind not in ("head", "neuron"):
            raise UnitError(f"output_blocks: kind must be 'head' or 'neuron', not {kind!r}")
        cls = Head if kind == "head" else Neuron
        n = self.count(kind)
        first = self.output_slice(cls(layer, 0))
        expect = self.shapes.get(first.param)
        if expect is not None and tuple(weight.shape) != tuple(expect):
            raise LayoutMismatchError(
                f"output_blocks: weight has shape {tuple(weight.shape)}, but {first.param} "
                f"has shape {tuple(expect)}; pass the tensor named "
                "param_name(layer, output_linear(kind) + '.weight')"
            )
        size = first.size
        if n > 1:
            step = self.output_slice(cls(layer, 1)).start - first.start
            last = self.output_slice(cls(layer, n - 1))
            affine = last.start == first.start + (n - 1) * step and last.size == size
        else:
            step, affine = size, True
        if affine:
            starts = first.start + step * torch.arange(n)
        else:  # pragma: no cover - every shipped layout is affine
            starts = torch.tensor([self.output_slice(cls(layer, i)).start for i in range(n)])
        idx = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1).to(weight.device)
        rows = weight.index_select(first.dim, idx).movedim(first.dim, 0)
        return rows.reshape(n, size, -1)

    def linear_hooks(self, unit: Linear) -> tuple[str, ...]:
        """Bridge hook names (``blocks.3.attn.q.hook_out``, ...) that together are its output."""
        u = self.validate(unit)
        assert isinstance(u, Linear)
        rel = self.family.bridge_hooks.get(u.name)
        if not rel:
            raise LayoutMismatchError(
                f"the {self.family.family} layout has no bridge hook for {u.name!r}; add it to "
                "the family's bridge_hooks table (its module in tl_transplant/arch/families/)"
            )
        return tuple(self.block_path(u.layer, h) for h in rel)

    def output_linear(self, kind: UnitKind) -> str:
        """The linear that heads (``attn.o``) or neurons (``mlp.out``) write through."""
        point = {"head": "attn_out", "neuron": "mlp_out"}.get(kind)
        want = None
        if point is not None:
            want = (self.family.hook_points.get(point) or DEFAULT_HOOK_POINTS[point],)
        for name, hooks in self.family.bridge_hooks.items():
            if want is not None and tuple(hooks) == want:
                return name
        raise LayoutMismatchError(
            f"no output projection for {kind!r} units in the {self.family.family} layout"
        )

    def output_slice(self, unit: Head | Neuron) -> TensorSlice:
        """The unit's slice of its output projection's weight (sliced along its input dim).

        ``dim == 1``: an ``nn.Linear`` weight ``[out, in]``; ``dim == 0``: a GPT-2
        ``Conv1D`` weight ``[in, out]``.
        """
        u = self.validate(unit)
        weight = self.param_name(u.layer, self.output_linear(u.kind) + ".weight")
        for s in self.slices(u):
            if s.param == weight:
                return s
        raise LayoutMismatchError(f"{u}: no slice of {weight!r} in its layout")

    def kv_group_of(self, head: Head) -> KVHead:
        """The KV group whose k/v rows query head ``head`` reads."""
        return KVHead(head.layer, head.head // self.group_size)

    def slices(self, unit: Unit | str) -> tuple[TensorSlice, ...]:
        """The exact HF tensor slices that make up ``unit``."""
        u = self.validate(unit)
        if u in self._cache:
            return self._cache[u]
        if isinstance(u, Linear):
            out = []
            for leaf in ("weight", "bias"):
                name = self.param_name(u.layer, f"{u.name}.{leaf}")
                if name in self.shapes:
                    out.append(TensorSlice(name, 0, 0, self.shapes[name][0]))
            if not out:
                raise LayoutMismatchError(f"{u}: checkpoint has no tensor {name!r}")
            res = tuple(out)
        else:
            pieces = {
                "head": self.family.head,
                "kv_head": self.family.kv_head,
                "neuron": self.family.neuron,
            }[u.kind]
            env = self.dims.env()
            env.update(h=getattr(u, "head", 0), g=getattr(u, "group", 0), i=getattr(u, "index", 0))
            res = tuple(s for p in pieces if (s := self._resolve(u.layer, p, env)) is not None)
        self._cache[u] = res
        return res

    def _resolve(self, layer: int, p: Piece, env: Mapping[str, int]) -> TensorSlice | None:
        name = self.param_name(layer, p.tensor)
        if name not in self.shapes:
            if p.optional:
                return None
            raise LayoutMismatchError(
                f"the {self.family.family} layout expects tensor {name!r}, which this checkpoint "
                "lacks; is the config's model_type right?"
            )
        start = _eval(p.start, env)
        stop = start + _eval(p.size, env)
        shape = self.shapes[name]
        if p.dim >= len(shape) or stop > shape[p.dim]:
            raise LayoutMismatchError(
                f"slice {start}:{stop} on dim {p.dim} is outside {name} with shape {shape}"
            )
        return TensorSlice(name, p.dim, start, stop)

    def n_params(self, unit: Unit | str) -> int:
        """Number of scalar weights a unit covers (a head is ~40x a neuron)."""
        total = 0
        for s in self.slices(unit):
            shape = list(self.shapes[s.param])
            shape[s.dim] = s.size
            n = 1
            for x in shape:
                n *= x
            total += n
        return total

    def unit_tensors(self) -> list[str]:
        """Every HF tensor that some unit can touch (what a compatible pair must share)."""
        names: list[str] = []
        for layer in range(self.n_layers):
            for lin in self.family.linears:
                for leaf in ("weight", "bias"):
                    n = self.param_name(layer, f"{lin}.{leaf}")
                    if n in self.shapes:
                        names.append(n)
        return names

    def mirror_slices(self, layer: int) -> list[tuple[str, list[TensorSlice]]]:
        """For each bridge copy in ``layer``: its path and the HF slices it concatenates.

        A copy the bridge exposes under several names appears once per name
        (its ``path``, then each of its ``aliases``), with the same slices.
        """
        out = []
        for m in self.family.mirrors:
            src = self.param_name(layer, m.source)
            if src not in self.shapes:
                continue
            parts = []
            for h in range(self.dims.H):
                env = {**self.dims.env(), "h": h}
                start = _eval(m.start, env)
                parts.append(TensorSlice(src, m.dim, start, start + _eval(m.size, env)))
            for path in (m.path, *m.aliases):
                out.append((self.prefix(layer) + path, parts))
        return out


def bind_layout(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout:
    """Bind the family table for ``config.model_type`` to a model's dims and tensor shapes."""
    model_type = getattr(config, "model_type", None) or ""
    fam = family_for(model_type)
    layout = ModelLayout(fam, dims_from_config(config), dict(shapes), model_type=model_type)
    # Resolve one unit of each kind per layer so a wrong table fails at load, not mid-edit.
    for layer in range(layout.n_layers):
        for u in (
            Head(layer, 0),
            KVHead(layer, 0),
            Neuron(layer, 0),
            Head(layer, layout.dims.H - 1),
            KVHead(layer, layout.dims.KV - 1),
            Neuron(layer, layout.dims.I - 1),
        ):
            layout.slices(u)
    return layout


def bind_checkpoint_layout(
    config: Any, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[ModelLayout, dict[str, str]]:
    """Bind the layout to a saved checkpoint's stored tensor names and shapes.

    Tries the canonical HF model names, then each of the family's
    ``checkpoint_aliases`` in order. Returns the layout (over HF *model* names)
    and a map model name -> stored name (the identity for canonical checkpoints).
    """
    model_type = getattr(config, "model_type", None) or ""
    fam = family_for(model_type)
    try:
        return bind_layout(config, shapes), {n: n for n in shapes}
    except LayoutMismatchError as e:
        first = e
    tried: list[str] = []
    for alias in fam.checkpoint_aliases:
        if alias.model_prefix and any(n.startswith(alias.model_prefix) for n in shapes):
            continue  # already spelled canonically: this alias is not what differs
        rename: dict[str, str] = {}
        for stored in shapes:
            model = alias.model_name(stored)
            if model is not None:
                rename[model] = stored
        tried.append(f"{alias.stored_prefix!r} for {alias.model_prefix!r}")
        if not rename:
            continue
        try:
            layout = bind_layout(config, {m: shapes[st] for m, st in rename.items()})
        except LayoutMismatchError:
            continue
        return layout, rename
    how = (
        f"also tried the stored-name aliases {', '.join(tried)}"
        if tried
        else f"the {fam.family} family declares no checkpoint_aliases"
    )
    raise LayoutMismatchError(
        f"{first} ({how}; if this checkpoint spells its tensor names differently, add a "
        f"CheckpointAlias to the {fam.family} FamilyLayout's checkpoint_aliases)"
    ) from first


__all__ = [
    "Dims",
    "ModelLayout",
    "TensorSlice",
    "bind_checkpoint_layout",
    "bind_layout",
    "dims_from_config",
]
