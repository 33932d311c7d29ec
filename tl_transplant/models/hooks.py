"""Bridge hooks shared by scoring, activation patching and the views.

Every hook name comes from :meth:`ModelLayout.hook` (named points such as
``"head"`` -> ``blocks.{layer}.attn.hook_z``) or :meth:`ModelLayout.linear_hooks`,
so a family whose bridge names a point differently overrides it in its layout
and nothing here changes. Per unit kind:

* *value* hooks carry the unit's activation (head: ``hook_z``; KV group:
  ``hook_k``/``hook_v``; neuron: ``mlp.hook_post``; linear: its output hooks);
* *write* hooks are where the unit's effect enters the residual stream (head:
  the o-projection output; neuron: the down projection output; KV group and
  linear: their value hooks).

:class:`HookRunner` installs dispatching hooks once for a whole stream of
forwards; :func:`capture` is a one-off recording forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from tl_transplant.arch.units import UNIT_KINDS, Linear, Unit, UnitKind
from tl_transplant.errors import TLTransplantError

if TYPE_CHECKING:
    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide

#: A per-forward hook body: return a replacement tensor (a patch) or ``None`` (keep it).
Handler = Callable[[torch.Tensor], torch.Tensor | None]

#: Named hook points (see ``layouts.DEFAULT_HOOK_POINTS``) of each kind's activation.
VALUE_POINTS: Mapping[str, tuple[str, ...]] = {
    "head": ("head",),
    "kv_head": ("kv_k", "kv_v"),
    "neuron": ("neuron",),
}
#: Named hook points where each kind's effect enters the forward.
WRITE_POINTS: Mapping[str, tuple[str, ...]] = {
    "head": ("attn_out",),
    "kv_head": ("kv_k", "kv_v"),
    "neuron": ("mlp_out",),
}


class HookError(TLTransplantError, ValueError):
    """A bridge lacks a hook point that is needed (non-standard TransformerLens hook names)."""


def kind_hooks(
    layout: ModelLayout, kind: UnitKind, layer: int, *, write: bool = False
) -> tuple[str, ...]:
    """Value (or ``write=True``: write) hook names of a head/KV/neuron kind in one layer."""
    points = (WRITE_POINTS if write else VALUE_POINTS).get(kind)
    if points is None:
        raise HookError(f"kind_hooks covers head, kv_head and neuron, not {kind!r}; "
                         "use layout.linear_hooks(unit) for a whole linear")
    return tuple(layout.hook(p, layer) for p in points)


def unit_hooks(layout: ModelLayout, unit: Unit, *, write: bool = False) -> tuple[str, ...]:
    """Value (or write) hook names of one unit; a linear's are its output hooks either way."""
    if isinstance(unit, Linear):
        return tuple(layout.linear_hooks(unit))
    return kind_hooks(layout, unit.kind, unit.layer, write=write)


def _hooks(layout: ModelLayout, units: Iterable[Unit], write: bool) -> list[str]:
    groups = dict.fromkeys((u.kind, u.layer) for u in units if not isinstance(u, Linear))
    linears = [u for u in units if isinstance(u, Linear)]
    names: list[str] = []
    for kind, layer in sorted(groups, key=lambda k: (UNIT_KINDS.index(k[0]), k[1])):
        names += kind_hooks(layout, kind, layer, write=write)
    for u in sorted(linears, key=lambda u: u.layer):
        names += layout.linear_hooks(u)
    return list(dict.fromkeys(names))


def value_hooks(layout: ModelLayout, units: Iterable[Unit]) -> list[str]:
    """Hook names whose values define the activations of ``units`` (deduplicated)."""
    return _hooks(layout, list(units), write=False)


def write_hooks(layout: ModelLayout, units: Iterable[Unit]) -> list[str]:
    """Hook names where the effects of ``units`` enter the forward (gradients, patches)."""
    return _hooks(layout, list(units), write=True)


def require_hooks(side: ModelSide, names: Iterable[str], *, why: str,
                  error: type[Exception] = HookError) -> None:
    """Raise ``error`` naming the first of ``names`` that ``side``'s bridge lacks."""
    available = side.bridge.hook_dict
    missing = sorted(n for n in names if n not in available)
    if missing:
        raise error(f"{side.name}: the TransformerBridge has no hook point {missing[0]!r}; "
                    f"{why} needs the standard TransformerLens 4 hook names")


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


class _Stop(Exception):
    """Raised from a hook to end a forward whose remaining layers nobody reads."""


class HookRunner:
    """Dispatching hooks on every bridge of ``pair``, installed once for a whole stream.

    ``run(side, ids, handlers, stop_layer)`` sets the handlers for one forward;
    hooks on points without a handler pass the activation through untouched.
    A handler may return a replacement tensor (a patch); capture handlers
    return ``None``, and the original tensor flows on (and stays in the graph).
    ``error`` is the exception raised for a missing hook point.
    """

    def __init__(self, pair: ModelPair, names: Iterable[str], *,
                 error: type[Exception] = HookError) -> None:
        self.pair = pair
        self.names = sorted(set(names))
        self.error = error
        self._handlers: dict[str, Handler] = {}
        self._stop_layer: int | None = None
        self._stack = contextlib.ExitStack()

    def _dispatch(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            h = self._handlers.get(name)
            if h is None:
                return t
            out = h(t)
            return t if out is None else out

        return hook

    def _stopper(self, layer: int) -> Callable[..., torch.Tensor]:
        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
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
        sides: list[ModelSide] = []
        for side in self.pair.sides():
            if all(side.bridge is not s.bridge for s in sides):
                sides.append(side)
        layout = self.pair.layout
        for side in sides:
            require_hooks(side, self.names, why="scoring", error=self.error)
            available = side.bridge.hook_dict
            fwd = [(n, self._dispatch(n)) for n in self.names]
            for layer in range(layout.n_layers):
                stop = layout.hook("resid_post", layer)
                if stop in available:
                    fwd.append((stop, self._stopper(layer)))
            self._stack.enter_context(side.bridge.hooks(fwd_hooks=fwd))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def run(
        self,
        side: ModelSide,
        ids: Int[torch.Tensor, "batch seq"],
        handlers: dict[str, Handler],
        stop_layer: int | None = None,
    ) -> Float[torch.Tensor, "batch seq vocab"] | None:
        """One forward of ``side`` with ``handlers``; stops after ``stop_layer`` if given."""
        unknown = set(handlers) - set(self.names)
        if unknown:  # a caller bug, not a user error
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


def capture(
    side: ModelSide,
    ids: Int[torch.Tensor, "batch seq"],
    names: Iterable[str],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One inference forward of ``side``'s bridge, recording the hook points ``names``.

    Values are stored under the names asked for (TransformerLens may report an
    alias's canonical name), detached and passed through ``transform``; a hook
    that did not fire is an error.
    """
    store: dict[str, torch.Tensor] = {}

    def rec(name: str) -> Callable[..., torch.Tensor]:
        def hook(t: torch.Tensor, hook: object = None) -> torch.Tensor:
            v = t.detach()
            store[name] = transform(v) if transform is not None else v
            return t

        return hook

    names = list(dict.fromkeys(names))
    with torch.inference_mode(), side.bridge.hooks(fwd_hooks=[(n, rec(n)) for n in names]):
        side.bridge(ids.to(side.device), return_type="logits")
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"{side.name}: hook {missing[0]} did not fire")
    return store


__all__ = [
    "VALUE_POINTS",
    "WRITE_POINTS",
    "Handler",
    "HookError",
    "HookRunner",
    "capture",
    "capturer",
    "kind_hooks",
    "require_hooks",
    "unit_hooks",
    "value_hooks",
    "write_hooks",
]
