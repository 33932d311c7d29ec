"""Shared machinery for scorers: the registry, data batching, hooks and accumulators.

A scorer is one file in this package that subclasses :class:`Scorer` and is
decorated with :func:`register`; :mod:`tl_transplant.scoring` imports every
module here, so adding a scorer is adding a file.

Streaming: prompts are tokenized batch by batch (the shared rule of
:mod:`tl_transplant.tokens`), hooks are installed once per bridge for the
whole stream, only the hook points a scorer names are touched, per-prompt
statistics are reduced to per-unit sums right away, and a forward that needs no
logits is stopped after the last layer it reads. Peak memory therefore depends
on the batch size and model, not on the number of prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tl_transplant.layouts import TensorSlice
from tl_transplant.tokens import Encoded, answer_logprobs, encode
from tl_transplant.units import (
    UNIT_KINDS,
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitKind,
)

#: ``f(logits, encoded batch) -> per-example metric``, differentiable in the logits.
MetricFn = Callable[
    [Float[torch.Tensor, "batch seq vocab"], Encoded], Float[torch.Tensor, " batch"]
]


class ScoringError(ValueError):
    """A scoring request that cannot be carried out (bad method, units, data or option)."""


# ---- registry -------------------------------------------------------------------------

SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available to :func:`score` under ``cls.name``."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise TypeError(f"two scorers are named {cls.name!r}")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(method: str) -> type[Scorer]:
    """The scorer class registered as ``method``, or an error listing the valid names."""
    if not isinstance(method, str) or method not in SCORERS:
        raise ScoringError(
            f"unknown scoring method {method!r}; valid methods are: {', '.join(sorted(SCORERS))}"
        )
    return SCORERS[method]


@dataclass
class RawScores:
    """What a scorer returns: one value per unit, in the order of the units it was given."""

    values: Float[torch.Tensor, " n"]
    consistency: Float[torch.Tensor, " n"] | None = None
    columns: dict[str, Float[torch.Tensor, " n"]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Base class. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    #: Unit kinds this scorer can score, and the ones it scores when ``units=None``.
    kinds: ClassVar[tuple[UnitKind, ...]] = UNIT_KINDS
    default_kinds: ClassVar[tuple[UnitKind, ...]] = ("head", "neuron")
    needs_data: ClassVar[bool] = True
    needs_answers: ClassVar[bool] = False
    #: Signed scores (positive = the transplant should help) vs magnitudes.
    signed: ClassVar[bool] = False
    #: Scorer-specific keyword options and their defaults.
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.opts = ctx.options

    def check(self) -> None:
        """Validate options before any model runs (override to add checks)."""

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        raise NotImplementedError

    def combine(self, task: RawScores, contrast: RawScores, lam: float) -> RawScores:
        """Retention-aware score: ``task - lam * contrast`` (consistency from the task)."""
        cols = {f"{k}_task": v for k, v in task.columns.items()}
        cols.update({f"{k}_contrast": v for k, v in contrast.columns.items()})
        cols["score_task"] = task.values
        cols["score_contrast"] = contrast.values
        return RawScores(task.values - lam * contrast.values, task.consistency, cols, task.meta)


# ---- data -----------------------------------------------------------------------------


@dataclass
class ScoringData:
    """Prompts (and answers, if any) with the resolved BOS rule."""

    name: str
    prompts: list[str]
    answers: list[str] | None
    prepend_bos: bool

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Context:
    """Everything a scorer run needs besides its units and data."""

    pair: Any
    batch_size: int
    progress: bool
    options: dict[str, Any]
    metric: MetricFn | None = None

    @property
    def layout(self) -> Any:
        return self.pair.layout

    def batches(
        self, data: ScoringData, *, answers: bool, desc: str
    ) -> Iterator[tuple[Encoded, int]]:
        """Yield ``(encoded batch, start index)``, tokenized lazily, with a progress bar."""
        if answers and data.answers is None:
            raise ScoringError(f"{desc} needs answers; pass a Task rather than plain prompts")
        n = len(data)
        tok = self.pair.target.tokenizer
        bar = tqdm(total=n, desc=f"{desc} [{data.name}]", unit="prompt",
                   disable=not self.progress, leave=False)
        try:
            for i in range(0, n, self.batch_size):
                j = min(n, i + self.batch_size)
                ans = data.answers[i:j] if answers and data.answers is not None else None
                yield encode(tok, data.prompts[i:j], ans, prepend_bos=data.prepend_bos), i
                bar.update(j - i)
        finally:
            bar.close()

    def metric_fn(self) -> MetricFn:
        """The differentiable per-example task metric (default: answer log-prob)."""
        return self.metric or answer_logprobs


# ---- unit bookkeeping -----------------------------------------------------------------


def unit_index(u: Unit, layout: Any) -> int:
    """Index of a unit within its layer and kind (a linear's position in the layer's list)."""
    if isinstance(u, Head):
        return u.head
    if isinstance(u, KVHead):
        return u.group
    if isinstance(u, Neuron):
        return u.index
    return layout.linear_names().index(u.name)


class UnitTable:
    """Where each (kind, layer) block of per-layer results goes in the output vector."""

    def __init__(self, units: Sequence[Unit], layout: Any) -> None:
        self.units = list(units)
        self.layout = layout
        groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for pos, u in enumerate(self.units):
            sel, out = groups.setdefault((u.kind, u.layer), ([], []))
            sel.append(unit_index(u, layout))
            out.append(pos)
        self.groups = {
            k: (torch.tensor(s, dtype=torch.long), torch.tensor(o, dtype=torch.long))
            for k, (s, o) in groups.items()
        }
        self.kind_pos: dict[str, Int[torch.Tensor, " m"]] = {}
        for kind in UNIT_KINDS:
            idx = [i for i, u in enumerate(self.units) if u.kind == kind]
            if idx:
                self.kind_pos[kind] = torch.tensor(idx, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.units)

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.groups

    def layers(self, kind: str | None = None) -> list[int]:
        return sorted({layer for (k, layer) in self.groups if kind is None or k == kind})

    def kinds(self) -> list[str]:
        return [k for k in UNIT_KINDS if k in self.kind_pos]

    def max_layer(self) -> int:
        return max(layer for (_, layer) in self.groups)

    def selected(self, kind: str, layer: int) -> list[int]:
        return self.groups[(kind, layer)][0].tolist()

    def put(
        self, out: Float[torch.Tensor, "batch n"], kind: str, layer: int,
        vals: Float[torch.Tensor, "batch per_layer"],
    ) -> None:
        """Write one layer's per-prompt values (all units of the kind) into ``out``."""
        sel, pos = self.groups[(kind, layer)]
        out[:, pos] = vals.detach().to(device=out.device, dtype=out.dtype)[:, sel]


class Accumulator:
    """Online per-unit sums of per-prompt values, plus the consistency counts.

    Consistency: the fraction of prompts on which a unit's per-prompt score is
    strictly above the (lower) median per-prompt score of all scored units of the
    same kind on that prompt. 1.0 means "above the typical unit on every prompt".
    """

    def __init__(self, table: UnitTable) -> None:
        self.table = table
        n = len(table)
        self.sums: dict[str, torch.Tensor] = {}
        self.above = torch.zeros(n, dtype=torch.float64)
        self.count = 0

    def new_batch(self, b: int) -> Float[torch.Tensor, "batch n"]:
        """A zeroed per-prompt matrix for one batch."""
        return torch.zeros(b, len(self.table), dtype=torch.float64)

    def add(self, name: str, per_prompt: Float[torch.Tensor, "batch n"]) -> None:
        s = per_prompt.sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def add_consistency(self, per_prompt: Float[torch.Tensor, "batch n"]) -> None:
        for pos in self.table.kind_pos.values():
            block = per_prompt[:, pos]
            med = block.median(dim=1, keepdim=True).values
            self.above[pos] += (block > med).sum(0).to(torch.float64)

    def done(self, b: int) -> None:
        self.count += b

    def mean(self, name: str) -> Float[torch.Tensor, " n"]:
        return self.sums[name] / max(1, self.count)

    def consistency(self) -> Float[torch.Tensor, " n"]:
        return self.above / max(1, self.count)


# ---- hooks ----------------------------------------------------------------------------

Handler = Callable[[torch.Tensor], torch.Tensor | None]


class _Stop(Exception):
    """Raised from a hook to end a forward whose remaining layers nobody reads."""


class HookRunner:
    """Dispatching hooks, installed once per bridge for a whole stream.

    ``run(side, ids, handlers, stop_layer)`` sets the handlers for one forward;
    hooks on points without a handler pass the activation through untouched.
    A handler may return a replacement tensor (a patch); capture handlers
    return ``None``, and the original tensor flows on (and stays in the graph).
    """

    def __init__(self, pair: Any, names: Iterable[str]) -> None:
        self.pair = pair
        self.names = sorted(set(names))
        self._handlers: dict[str, Handler] = {}
        self._stop_layer: int | None = None
        self._stack = contextlib.ExitStack()

    def _dispatch(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(t: torch.Tensor, hook: Any = None) -> torch.Tensor:
            h = self._handlers.get(name)
            if h is None:
                return t
            out = h(t)
            return t if out is None else out

        return hook

    def _stopper(self, layer: int) -> Callable[..., torch.Tensor]:
        def hook(t: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if self._stop_layer is not None and layer >= self._stop_layer:
                raise _Stop
            return t

        return hook

    def __enter__(self) -> HookRunner:
        try:
            self._install()
        except BaseException:
            self._stack.close()  # never leave hooks behind on a half-installed pair
            raise
        return self

    def _install(self) -> None:
        bridges = []
        for side in self.pair.sides():
            if all(side.bridge is not b for b in bridges):
                bridges.append(side.bridge)
        for b in bridges:
            available = b.hook_dict
            missing = [n for n in self.names if n not in available]
            if missing:
                raise ScoringError(
                    f"the TransformerBridge has no hook point {missing[0]!r}; scoring needs "
                    "the standard TransformerLens 4 hook names"
                )
            fwd = [(n, self._dispatch(n)) for n in self.names]
            n_layers = self.pair.layout.n_layers
            fwd += [
                (f"blocks.{layer}.hook_resid_post", self._stopper(layer))
                for layer in range(n_layers)
                if f"blocks.{layer}.hook_resid_post" in available
            ]
            self._stack.enter_context(b.hooks(fwd_hooks=fwd))

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def run(
        self,
        side: Any,
        ids: Int[torch.Tensor, "batch seq"],
        handlers: dict[str, Handler],
        stop_layer: int | None = None,
    ) -> Float[torch.Tensor, "batch seq vocab"] | None:
        """One forward of ``side`` with ``handlers``; stops after ``stop_layer`` if given."""
        unknown = set(handlers) - set(self.names)
        if unknown:  # a scorer bug, not a user error
            raise RuntimeError(f"handlers for hooks that were not installed: {sorted(unknown)}")
        self._handlers = handlers
        self._stop_layer = stop_layer
        try:
            return side.bridge(ids.to(side.device), return_type="logits")
        except _Stop:
            return None
        finally:
            self._handlers = {}
            self._stop_layer = None


# ---- hook names and weights -----------------------------------------------------------


def head_z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.attn.o.hook_out"


def kv_k(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_k"


def kv_v(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_v"


def mlp_post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.mlp.out.hook_out"


def linear_hooks_for(table: UnitTable, layout: Any, layer: int) -> dict[str, tuple[str, ...]]:
    """For the scored linears of one layer: name -> the bridge hooks making up its output."""
    if not table.has("linear", layer):
        return {}
    names = layout.linear_names()
    return {
        names[i]: layout.linear_hooks(Linear(layer, names[i]))
        for i in table.selected("linear", layer)
    }


def _require_loaded(side: Any, name: str, why: str) -> torch.Tensor:
    t = side.params[name]
    if t.device.type == "meta":
        raise ScoringError(
            f"{side.name}: tensor {name} is offloaded (device_map); {why} needs it in memory"
        )
    return t


def out_weight(side: Any, layout: Any, kind: str, layer: int) -> Float[torch.Tensor, "n size D"]:
    """Each head's (or neuron's) slice of its output projection, as ``[n, size, D]``.

    Read from the HF tensor through the layout's slices, so fused or transposed
    (Conv1D) layouts need no special case here.
    """
    cls = Head if kind == "head" else Neuron
    n = layout.dims.H if kind == "head" else layout.dims.I
    first: TensorSlice = layout.output_slice(cls(layer, 0))
    size = first.size
    if n > 1:
        step = layout.output_slice(cls(layer, 1)).start - first.start
        last = layout.output_slice(cls(layer, n - 1))
        affine = last.start == first.start + (n - 1) * step and last.size == size
    else:
        step, affine = size, True
    if affine:
        starts = first.start + step * torch.arange(n)
    else:  # pragma: no cover - every shipped layout is affine
        starts = torch.tensor([layout.output_slice(cls(layer, i)).start for i in range(n)])
    w = _require_loaded(side, first.param, "this scorer").detach()
    idx = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1).to(w.device)
    cols = work(w.index_select(first.dim, idx))
    if first.dim == 1:  # nn.Linear [D, in]
        return cols.T.reshape(n, size, -1)
    return cols.reshape(n, size, -1)  # Conv1D [in, D]


def work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a working precision of at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def take_positions(
    x: torch.Tensor, pos: Int[torch.Tensor, " batch"]
) -> torch.Tensor:
    """``x[b, pos[b]]`` for each row, keeping a length-1 position axis."""
    b = x.shape[0]
    return x[torch.arange(b, device=x.device), pos.to(x.device)].unsqueeze(1)


def check_options(scorer: type[Scorer], options: dict[str, Any]) -> dict[str, Any]:
    """Merge user options with a scorer's defaults; unknown names are an error."""
    unknown = sorted(set(options) - set(scorer.options))
    if unknown:
        valid = ", ".join(sorted(scorer.options)) or "none"
        raise ScoringError(
            f"{scorer.name} does not take option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {valid}"
        )
    return {**scorer.options, **options}


__all__ = [
    "SCORERS",
    "Accumulator",
    "Context",
    "HookRunner",
    "MetricFn",
    "RawScores",
    "Scorer",
    "ScoringData",
    "ScoringError",
    "UnitTable",
    "get_scorer",
    "register",
]


# ---- capture helpers shared by the activation scorers ---------------------------------


def capturer(
    store: dict[str, torch.Tensor],
    name: str,
    *,
    graph: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Handler:
    """A handler that records the activation at ``name`` into ``store``.

    ``graph=True`` keeps the tensor in the autograd graph (for gradients at this
    point); if nothing upstream requires grad it is swapped for an equal leaf
    that does, so the gradient exists either way.
    """

    def h(t: torch.Tensor) -> torch.Tensor | None:
        if graph:
            if not t.requires_grad:
                t = t.detach().requires_grad_(True)
                store[name] = t
                return t
            store[name] = t
            return None
        store[name] = (transform(t) if transform is not None else t).detach()
        return None

    return h


def value_hooks(table: UnitTable, layout: Any) -> list[str]:
    """Hook points whose values define each scored unit's activation."""
    names: list[str] = []
    for layer in table.layers("head"):
        names.append(head_z(layer))
    for layer in table.layers("kv_head"):
        names += [kv_k(layer), kv_v(layer)]
    for layer in table.layers("neuron"):
        names.append(mlp_post(layer))
    for layer in table.layers("linear"):
        for hooks in linear_hooks_for(table, layout, layer).values():
            names += list(hooks)
    return list(dict.fromkeys(names))


def write_hooks(table: UnitTable, layout: Any) -> list[str]:
    """Hook points where each scored unit's effect enters the forward (gradients, patches).

    A head writes through ``attn.o`` (its term ``z_h @ W_O[h]``), a neuron
    through ``mlp.out`` (``post_i * W_out[i]``), a KV group through ``hook_k``
    and ``hook_v``, a whole linear through its own output hooks.
    """
    names: list[str] = []
    for layer in table.layers("head"):
        names.append(attn_out(layer))
    for layer in table.layers("kv_head"):
        names += [kv_k(layer), kv_v(layer)]
    for layer in table.layers("neuron"):
        names.append(mlp_out(layer))
    for layer in table.layers("linear"):
        for hooks in linear_hooks_for(table, layout, layer).values():
            names += list(hooks)
    return list(dict.fromkeys(names))
