"""Activation-level preview of a transplant: the target run with the source's activations.

>>> with patch_activations(pair, ["L1.H2", "L0.N7"]):          # doctest: +SKIP
...     logits = pair.target.bridge(tokens)
>>> evaluate(pair.target, task, intervention=patch_activations(pair, units))  # doctest: +SKIP
>>> sweep(pair, task, scores, edit=patch_activations)          # doctest: +SKIP

No weight changes. While the context is active, *every* forward of the target
(``bridge(...)``, ``run_with_cache``, ``run_with_hooks``, the HF module's own
forward and ``hf.generate``) first runs the source on exactly the same inputs
(same ids, attention mask, positions) and records the activations of the
patched units; the target's TransformerLens hooks then substitute them (hook
names from :mod:`tl_transplant.models.hooks`, i.e. the layout's named points):

* head ``Lℓ.Hh``: layer ℓ's ``attn.hook_z[:, :, h]``;
* KV group ``Lℓ.KVg``: layer ℓ's ``attn.hook_k`` / ``hook_v`` ``[:, :, g]``;
* neuron ``Lℓ.Ni``: layer ℓ's ``mlp.hook_post[:, :, i]``;
* whole linear: its output hook(s) (e.g. ``attn.q.hook_out``).

With ``alpha`` the patched value is ``(1 - alpha) * target + alpha * source``.

``mode="activation"`` (default) substitutes the activation only; the target's
own output projection (``W_O`` column block of a head, ``W_out`` row of a
neuron) then writes it. ``mode="output"`` substitutes the unit's *write* to the
residual stream instead, ``W_O`` / ``W_out`` included (at ``attn.o.hook_out`` /
``mlp.out.hook_out``), which is what a weight transplant moves and the
definition that ``score(..., method="activation_patch")`` uses. KV groups and
linears are the same in both modes. ``kv="group"`` also patches each head's KV
group (as ``transplant(..., kv="group")`` copies its k/v rows).

Why it works with ``evaluate`` and ``sweep``: the source run is triggered by a
forward pre-hook on the target's HF module, through which the bridge forward
and HF generation both pass, so the context needs no batch up front; pass it as
``intervention=`` (entered once) or use ``edit=patch_activations`` in
:func:`~tl_transplant.sweeps.protocol.sweep` (called as ``edit(pair, units, alpha)``).

Generation: TransformerLens hooks fire inside ``hf.generate`` (checked in the
tests): the prefill step sees the whole prompt, each decode step only the new
token(s) with a KV cache. The source is run in lockstep with its *own* cache
object (created when the target's cache is fresh), so at every step it sees
what the target sees. Beam search (which reorders caches) is not supported.
:func:`~tl_transplant.evaluation.evaluator.evaluate` itself decodes without a cache while a
patch is active: :mod:`tl_transplant.models.decoding` falls back to the uncached bridged
path whenever any hook is registered, so patched tokens equal the reference path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from jaxtyping import Float

from tl_transplant.arch.units import (
    Head,
    KVHead,
    Linear,
    Neuron,
    Unit,
    UnitKind,
    parse_units,
    unit_sort_key,
)
from tl_transplant.errors import TLTransplantError
from tl_transplant.models.hooks import kind_hooks, require_hooks

if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig

    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

PatchMode = Literal["activation", "output"]
#: A TransformerLens forward hook: ``hook(activation, hook=HookPoint)`` -> activation.
HookFn = Callable[..., torch.Tensor]
_CACHE_KEYS = ("cache", "past_key_values")


class PatchError(TLTransplantError, ValueError):
    """An activation patch that cannot be set up as asked."""


class _StopSource(Exception):
    """Raised from a source hook once every activation needed has been recorded."""


def _out_rows(
    side: ModelSide, layout: ModelLayout, unit: Head | Neuron
) -> Float[torch.Tensor, "size D"]:
    """The unit's block of its output projection as ``[size, D]`` (float32 or wider)."""
    s = layout.output_slice(unit)
    w = side.params[s.param].detach()
    if w.device.type == "meta":
        raise PatchError(
            f"{side.name}: {s.param} is offloaded by a device_map; mode='output' needs it in memory"
        )
    block = layout.output_block(w, s)
    return block.to(torch.promote_types(block.dtype, torch.float32))


class patch_activations:  # noqa: N801 - a context manager that reads like a function
    """Context manager: run the target with the source's activations for ``units``.

    ``alpha`` blends ``(1 - alpha) * target + alpha * source``; ``mode`` and
    ``kv`` are described in the module docstring. Not reentrant; hooks and the
    pre-hook are removed on exit (also by an exception).
    """

    def __init__(
        self,
        pair: ModelPair,
        units: Iterable[Unit | str] | str | Unit,
        alpha: float = 1.0,
        *,
        mode: PatchMode = "activation",
        kv: Literal["none", "group"] = "none",
    ) -> None:
        if isinstance(alpha, bool) or type(alpha).__name__ == "bool_":  # True is not 1.0
            raise PatchError(f"alpha must be a number, got {alpha!r}")
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise PatchError(f"alpha must be a finite number, got {alpha}")
        if mode not in ("activation", "output"):
            raise PatchError(f"mode must be 'activation' or 'output', got {mode!r}")
        if kv not in ("none", "group"):
            raise PatchError(f"kv must be 'none' or 'group', got {kv!r}")
        self.pair = pair
        self.alpha = alpha
        self.mode = mode
        self.kv = kv
        requested = list(dict.fromkeys(pair.validate(u) for u in parse_units(units)))
        if kv == "group":
            for u in list(requested):
                if isinstance(u, Head):
                    g = pair.layout.kv_group_of(u)
                    if g not in requested:
                        requested.append(g)
        self.units: list[Unit] = sorted(requested, key=unit_sort_key)
        self._plan()
        self._stack: contextlib.ExitStack | None = None
        self._src: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        self._caches: dict[int, tuple[Cache, Cache]] = {}
        self._in_source = False
        self._may_stop = False
        self.n_source_runs = 0  # how many source forwards fed the target (for checks)

    # ---- planning ------------------------------------------------------------------------
    def _plan(self) -> None:
        """Group units by hook point: index sets to substitute, and output-mode weights."""
        heads: dict[int, list[int]] = {}
        groups: dict[int, list[int]] = {}
        neurons: dict[int, list[int]] = {}
        linear_hooks: list[str] = []
        for u in self.units:
            if isinstance(u, Head):
                heads.setdefault(u.layer, []).append(u.head)
            elif isinstance(u, KVHead):
                groups.setdefault(u.layer, []).append(u.group)
            elif isinstance(u, Neuron):
                neurons.setdefault(u.layer, []).append(u.index)
            else:
                assert isinstance(u, Linear)
                linear_hooks += list(self.pair.layout.linear_hooks(u))
        self._heads, self._groups, self._neurons = heads, groups, neurons
        self._linear_hooks = list(dict.fromkeys(linear_hooks))
        # source hook -> index (None = the whole tensor) along the unit axis
        subst: dict[str, list[int] | None] = {}
        for layer, g in groups.items():
            for n in kind_hooks(self.pair.layout, "kv_head", layer):
                subst[n] = sorted(g)
        for n in self._linear_hooks:
            subst[n] = None
        if self.mode == "activation":
            for layer, h in heads.items():
                subst[self._act("head", layer)] = sorted(h)
            for layer, i in neurons.items():
                subst[self._act("neuron", layer)] = sorted(i)
        self._subst = subst
        self._capture = list(subst)
        if self.mode == "output":
            self._capture += [self._act("head", layer) for layer in heads]
            self._capture += [self._act("neuron", layer) for layer in neurons]
        # every unit's hooks sit in its own layer, so the source may stop after the last one
        self._last_layer = max((u.layer for u in self.units), default=-1)

    def _act(self, kind: UnitKind, layer: int) -> str:
        """The hook carrying a head's (``hook_z``) or neuron's (``hook_post``) activation."""
        return kind_hooks(self.pair.layout, kind, layer)[0]

    def _write(self, kind: UnitKind, layer: int) -> str:
        """The hook where a head's (o-projection) or neuron's (down projection) write lands."""
        return kind_hooks(self.pair.layout, kind, layer, write=True)[0]

    def _output_weights(self) -> None:
        """Per layer, the patched units' output-projection blocks of both models."""
        pair, layout = self.pair, self.pair.layout
        self._w: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        dev = pair.target.device
        for kind, table, cls in (("head", self._heads, Head), ("neuron", self._neurons, Neuron)):
            for layer, idx in table.items():
                units = [cls(layer, i) for i in sorted(idx)]
                ws = torch.stack([_out_rows(pair.source, layout, u) for u in units]).to(dev)
                wt = torch.stack([_out_rows(pair.target, layout, u) for u in units]).to(dev)
                self._w[(kind, layer)] = (ws, wt)

    # ---- hooks ---------------------------------------------------------------------------
    def _recorder(self, name: str) -> HookFn:
        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            if self._in_source:
                self._src[name] = t.detach()
            return t

        return hook

    def _stopper(self, t: torch.Tensor, hook: object = None) -> torch.Tensor:
        """After the last layer read, end the source forward (unless it fills a cache)."""
        if self._in_source and self._may_stop:
            raise _StopSource
        return t

    def _source_value(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self._src:
            raise RuntimeError(
                f"patch_activations: no source activation for {name}; the target ran a forward "
                "the pre-hook did not see (a start_at_layer or inputs_embeds call?)"
            )
        s = self._src[name]
        if s.shape != like.shape:
            raise RuntimeError(
                f"patch_activations: source activation {name} has shape {tuple(s.shape)} but the "
                f"target's is {tuple(like.shape)}; the two forwards did not see the same input"
            )
        return s.to(device=like.device, dtype=like.dtype)

    def _substituter(self, name: str, idx: list[int] | None) -> HookFn:
        a = self.alpha

        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            if self._in_source:
                return t
            s = self._source_value(name, t)
            if idx is None:
                return s if a == 1.0 else t + a * (s - t)
            out = t.clone()
            sel = torch.tensor(idx, device=t.device)
            ts, ss = t.index_select(2, sel), s.index_select(2, sel)
            out[:, :, idx] = ss if a == 1.0 else ts + a * (ss - ts)
            return out

        return hook

    def _live_recorder(self, name: str) -> HookFn:
        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            if not self._in_source:
                self._live[name] = t
            return t

        return hook

    def _writer(self, kind: UnitKind, layer: int) -> HookFn:
        """Output mode: add alpha * (source write - live target write) of the layer's units."""
        act = self._act(kind, layer)
        idx = sorted(self._heads[layer] if kind == "head" else self._neurons[layer])

        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            if self._in_source:
                return t
            live = self._live.get(act)
            if live is None:
                raise RuntimeError(f"patch_activations: {act} did not fire before {kind} output")
            src = self._source_value(act, live)
            ws, wt = self._w[(kind, layer)]
            wdt = ws.dtype
            sel = torch.tensor(idx, device=t.device)
            s_a, t_a = src.index_select(2, sel).to(wdt), live.index_select(2, sel).to(wdt)
            if kind == "head":  # [b, p, n, dh] x [n, dh, D]
                delta = torch.einsum("bpnd,ndD->bpD", s_a, ws) - torch.einsum(
                    "bpnd,ndD->bpD", t_a, wt
                )
            else:  # [b, p, n] x [n, 1, D]
                delta = s_a @ ws[:, 0, :] - t_a @ wt[:, 0, :]
            return (t.to(wdt) + self.alpha * delta).to(t.dtype)

        return hook

    def _pre_forward(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Before each target HF forward: run the source on the same inputs and record."""
        if self._in_source:
            return
        src_kwargs = dict(kwargs)
        cached = False
        for key in _CACHE_KEYS:
            c = kwargs.get(key)
            if c is not None:
                src_kwargs[key] = self._source_cache(c)
                cached = True
        self._src = {}
        self._live = {}
        self._may_stop = not cached  # a cached source must run every layer to fill its cache
        self._in_source = True
        try:
            with torch.no_grad():
                self.pair.source.hf(*args, **src_kwargs)
        except _StopSource:
            pass
        finally:
            self._in_source = False
        self.n_source_runs += 1

    def _source_cache(self, target_cache: Cache) -> Cache:
        key = id(target_cache)
        if key in self._caches and self._caches[key][0] is target_cache:
            return self._caches[key][1]
        if _cache_len(target_cache) != 0:
            raise PatchError(
                "patch_activations was entered in the middle of a cached generation (the "
                "target's KV cache is not empty); enter it before generate() starts"
            )
        src = _fresh_cache(target_cache, self.pair.source.hf.config)
        self._caches[key] = (target_cache, src)
        return src

    @staticmethod
    def active_on(module: torch.nn.Module) -> list[patch_activations]:
        """The patch_activations contexts now active on ``module`` (a side's ``hf``): each
        registers a forward pre-hook there while it is entered."""
        hooks = getattr(module, "_forward_pre_hooks", {}) or {}
        found = [getattr(h, "__self__", None) for h in hooks.values()]
        return [p for p in found if isinstance(p, patch_activations)]

    # ---- context -------------------------------------------------------------------------
    def __enter__(self) -> patch_activations:
        if self._stack is not None:
            raise PatchError("this patch_activations context is already active")
        pair = self.pair
        names = set(self._capture) | set(self._subst)
        if self.mode == "output":
            names |= {self._write("head", layer) for layer in self._heads}
            names |= {self._write("neuron", layer) for layer in self._neurons}
        for side in pair.sides():
            require_hooks(side, names, why="patch_activations", error=PatchError)
        if self.mode == "output":
            self._output_weights()
        src_hooks = [(n, self._recorder(n)) for n in self._capture]
        stop = pair.layout.hook("resid_post", self._last_layer)
        if self._last_layer < pair.layout.n_layers - 1 and stop in pair.source.bridge.hook_dict:
            src_hooks.append((stop, self._stopper))
        tgt_hooks: list[tuple[str, HookFn]] = [
            (n, self._substituter(n, idx)) for n, idx in self._subst.items()
        ]
        if self.mode == "output":
            by_kind: tuple[tuple[UnitKind, dict[int, list[int]]], ...] = (
                ("head", self._heads),
                ("neuron", self._neurons),
            )
            for kind, layers in by_kind:
                for layer in layers:
                    act = self._act(kind, layer)
                    tgt_hooks.append((act, self._live_recorder(act)))
                    tgt_hooks.append((self._write(kind, layer), self._writer(kind, layer)))
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(pair.source.bridge.hooks(fwd_hooks=src_hooks))
            stack.enter_context(pair.target.bridge.hooks(fwd_hooks=tgt_hooks))
            handle = pair.target.hf.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self._src, self._live, self._caches = {}, {}, {}

    def __repr__(self) -> str:
        shown = ", ".join(str(u) for u in self.units[:6]) + (" ..." if len(self.units) > 6 else "")
        return (
            f"patch_activations([{shown}], alpha={self.alpha:g}, mode={self.mode!r}, "
            f"kv={self.kv!r})"
        )


def _cache_len(cache: Cache) -> int:
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError, IndexError):
        return 0


def _fresh_cache(like: Cache, config: PretrainedConfig) -> Cache:
    """An empty cache of the same kind as ``like`` for the source model."""
    try:
        return cast(Any, type(like))(config=config)  # DynamicCache(config=...) and kin
    except TypeError:
        import copy

        return copy.deepcopy(like)


__all__ = ["PatchError", "PatchMode", "patch_activations"]
