"""Run the target's bridge with replacement HF tensors, without writing any parameter.

:class:`FunctionalTarget` binds a set of the target's HF tensors (by name) to the
bridge parameters that are views of them or copies derived from them (GPT-NeoX's
split q/k/v, GPT-2's split views; declared as mirrors in the layout table), so a
forward with *other values* for those tensors is one
:func:`torch.func.functional_call`. Scorers that need gradients with respect to
weights (weight-level attribution) or relaxed weights (learned masks) use it: the
replacement tensors are leaves (or functions of leaves) and gradients flow back to
them through the re-derived copies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from tl_transplant.scoring.registry import ScoringError

if TYPE_CHECKING:
    from tl_transplant.models.pair import ModelPair


class FunctionalTarget:
    """The target's bridge as a function of some of its HF tensors (``names``)."""

    def __init__(self, pair: ModelPair, names: Iterable[str]) -> None:
        self.pair = pair
        side = pair.target
        self.names = list(dict.fromkeys(names))
        self.device = side.device
        wanted = set(self.names)
        storage: dict[tuple[str, int], str] = {}
        for n in self.names:
            p = side.params[n]
            if p.device.type == "meta":
                raise ScoringError(
                    f"{side.name}: tensor {n} is offloaded (device_map); this scorer needs the "
                    "block tensors in memory"
                )
            storage[(str(p.device), p.untyped_storage().data_ptr())] = n
        mirrors = {id(m): parts for m, parts in side.mirrors}
        self.views: list[tuple[str, str, tuple[int, ...], tuple[int, ...], int]] = []
        self.copies: list[tuple[str, list[Any]]] = []
        for bname, p in param_slots(side.bridge):
            parts = mirrors.get(id(p))
            if parts is not None:
                if parts[0].param in wanted:
                    self.copies.append((bname, parts))
                continue
            base = storage.get((str(p.device), p.untyped_storage().data_ptr()))
            if base is None:
                continue
            off = int(p.storage_offset() - side.params[base].storage_offset())
            self.views.append((bname, base, tuple(p.shape), tuple(p.stride()), off))
        if not self.views and not self.copies and self.names:
            raise ScoringError("no bridge parameter uses the requested HF tensors")

    def bridge_params(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The bridge's parameter names -> tensors derived from ``tensors`` (HF name -> value):
        views re-strided, copies (fused-tensor splits) re-concatenated."""
        out: dict[str, torch.Tensor] = {}
        for bname, base, size, stride, off in self.views:
            w = tensors[base]
            if size == tuple(w.shape) and stride == tuple(w.stride()) and off == 0:
                out[bname] = w
            else:
                out[bname] = w.as_strided(size, stride, w.storage_offset() + off)
        for bname, parts in self.copies:
            out[bname] = torch.cat(
                [tensors[p.param].narrow(p.dim, p.start, p.size) for p in parts],
                dim=parts[0].dim,
            )
        return out

    def logits(
        self, ids: Int[torch.Tensor, "batch seq"], params: dict[str, torch.Tensor]
    ) -> Float[torch.Tensor, "batch seq vocab"]:
        """A forward of the target's bridge with ``params`` (from :meth:`bridge_params`)."""
        bridge = self.pair.target.bridge
        out = torch.func.functional_call(
            bridge, params, (ids.to(self.device),), {"return_type": "logits"},
            tie_weights=False, strict=False,
        )
        assert isinstance(out, torch.Tensor)
        return out

    def forward(
        self, ids: Int[torch.Tensor, "batch seq"], tensors: dict[str, torch.Tensor]
    ) -> Float[torch.Tensor, "batch seq vocab"]:
        """:meth:`logits` with the bridge parameters derived from ``tensors``."""
        return self.logits(ids, self.bridge_params(tensors))


def param_slots(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """One name per (module, attribute) slot holding a parameter.

    The bridge reaches the same module by several paths; swapping one slot twice
    (under two names) would make ``functional_call`` restore the wrong tensor.
    """
    out = []
    for mname, mod in module.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


__all__ = ["FunctionalTarget", "param_slots"]
