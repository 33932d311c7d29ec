"""``attribution_ig``: integrated gradients along the path from the target to the patched target.

All scored units are patched *together*, with a common strength ``a``: the
target runs with ``a * delta_all`` added at the write hooks, where ``delta_all``
is the sum of every scored unit's patch ``delta_u`` (:mod:`tl_transplant.scoring.effects`).
``f(a)`` is the task metric of that forward; ``f(0)`` is the clean target and
``f(1)`` the target with every scored unit's source activation patched in (the
joint patching effect is ``f(1) - f(0)``). Per unit, EAP-IG style::

    score_u = mean over prompts of sum over positions
              < mean_{k=1..steps} grad f(a_k), delta_u >

with ``grad f(a)`` the gradient of the metric with respect to the activations at
the write hooks of the forward at ``a`` (so ``<grad f(a), delta_all> = f'(a)``),
and the points ``a_k`` given by ``rule``:

* ``"midpoint"`` (default): ``a_k = (k - 1/2) / steps``, second-order accurate in
  ``steps`` (on the tiny test pairs 30-100x closer to completeness than ``"right"``
  at the same cost);
* ``"right"`` (EAP-IG's): ``a_k = k / steps``;
* ``"left"``: ``a_k = (k - 1) / steps``; with ``steps=1`` the only point is the
  clean target and the score *is* ``attribution`` (same gradients, same ``delta_u``).

Completeness: ``sum_u score_u`` is a Riemann sum of ``integral_0^1 f'(a) da = f(1) - f(0)``,
so the scores add up to the joint patching effect as ``steps`` grows (plain
attribution is the ``a = 0`` tangent, exact only for a linear metric). Scoring a
single unit, the path moves only that unit and the score tends to its exact
``activation_patch`` effect. Units that overlap (a head and its layer's
``o_proj``) both enter ``delta_all``, each once. The run also records
``meta["path_effect"]``, the mean over prompts of ``f(1) - f(0)``, to compare
``sum_u score_u`` against. Signed: positive means the transplant should help.

Cost per batch: one forward of the source and one of the target (no
gradients), one of the fully patched target (``f(1)``, unless ``a = 1`` is a path
point), then ``steps`` forwards and backwards of the target (activations
only, never weights); ``steps_per_pass`` path points share one forward by
replicating the batch (faster on small models, ``steps_per_pass`` times the
activation memory; ``"auto"``, the default, takes as many as a rough estimate
of the forward+backward's activations fits in ``max_pass_mb``: all 5 steps on
the zoo models, one at a time on SmolLM2-135M at batch 8 and 64 tokens).
About ``(3 * steps + 3) / 4`` times ``attribution`` in forward-equivalents; on
small models, where each forward costs about the same whatever its batch, the
replicas bring it close to 3x.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from tl_transplant.arch.units import Unit
from tl_transplant.models.hooks import Handler, HookRunner, capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.effects import Effects
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    register,
)
from tl_transplant.scoring.tensors import rows_that_fit, work
from tl_transplant.tasks.tokens import Encoded

Rule = Literal["right", "left", "midpoint"]


#: The most path points ``steps`` may ask for: each is a forward and a backward of every
#: batch, and the points are listed up front (a billion would not fit in memory).
MAX_STEPS = 1000


def path_points(steps: int, rule: Rule) -> list[float]:
    """The strengths ``a_1 .. a_steps`` at which the gradient is taken (see the module doc)."""
    shift = {"right": 0.0, "left": 1.0, "midpoint": 0.5}[rule]
    return [(k - shift) / steps for k in range(1, steps + 1)]


def total_delta(effects: Effects) -> dict[str, torch.Tensor]:
    """``delta_all`` per write hook: the sum of ``effects.delta(u)`` over every unit of the table,
    formed one (kind, layer) block at a time. Tensors are ``[batch, pos, ...]`` like the hook."""
    table, layout = effects.table, effects.layout
    hook = layout.hook
    out: dict[str, torch.Tensor] = {}

    def add(name: str, d: torch.Tensor) -> None:
        out[name] = out[name] + d if name in out else d

    for layer in table.layers("head"):
        sel = torch.tensor(table.selected("head", layer), dtype=torch.long, device=effects.dev)
        z = hook("head", layer)
        d = (torch.einsum("bphd,hdD->bpD", effects.s(z)[:, :, sel],
                          effects.weight("source", "head", layer)[sel])
             - torch.einsum("bphd,hdD->bpD", effects.t(z)[:, :, sel],
                            effects.weight("target", "head", layer)[sel]))
        add(hook("attn_out", layer), d)
    for layer in table.layers("kv_head"):
        for n in (hook("kv_k", layer), hook("kv_v", layer)):
            diff = effects.s(n) - effects.t(n)  # [b, p, KV, dh]
            mask = torch.zeros(diff.shape[2], dtype=diff.dtype, device=diff.device)
            mask[table.selected("kv_head", layer)] = 1.0
            add(n, diff * mask[:, None])
    for layer in table.layers("neuron"):
        sel = torch.tensor(table.selected("neuron", layer), dtype=torch.long, device=effects.dev)
        post = hook("neuron", layer)
        w_s = effects.weight("source", "neuron", layer)[sel, 0]
        w_t = effects.weight("target", "neuron", layer)[sel, 0]
        add(hook("mlp_out", layer), effects.s(post)[:, :, sel] @ w_s
            - effects.t(post)[:, :, sel] @ w_t)
    for layer in table.layers("linear"):
        for hooks in table.linear_hooks(layer).values():
            for h in hooks:
                add(h, effects.s(h) - effects.t(h))
    return out


@register
class AttributionIG(Scorer):
    """Integrated gradients along target -> target + delta_all, dotted with each delta_u."""

    name = "attribution_ig"
    default_kinds = ("head", "neuron")
    needs_answers = True
    signed = True

    class Options(ScorerOptions):
        #: Number of path points (gradient evaluations per prompt), at most MAX_STEPS.
        steps: Annotated[int, Field(
            ge=1, le=MAX_STEPS,
            description=f"an int >= 1, at most {MAX_STEPS} (each step is a forward and a backward "
            "of every batch; 5 to 50 is usual, the midpoint rule converges fast)")] = 5
        #: Where on each of the ``steps`` sub-intervals of [0, 1] the gradient is taken.
        rule: Rule = "midpoint"
        #: Path points evaluated in one forward (the batch is replicated this many times).
        steps_per_pass: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
        #: Memory budget of one replicated forward+backward when ``steps_per_pass="auto"``.
        max_pass_mb: Annotated[int, Field(ge=1)] = 1024

    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        pair, layout = self.ctx.pair, self.ctx.layout
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        vals, writes = table.value_hooks(), table.write_hooks()
        names = list(dict.fromkeys(vals + writes))
        points = path_points(self.opts.steps, self.opts.rule)
        per_pass = 0
        effect_sum = 0.0
        with self.ctx.hooks(names) as runner:
            for enc, _ in self.ctx.batches(data, answers=True, desc=self.name):
                b = len(enc)
                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    runner.run(pair.source, enc.input_ids,
                               {n: capturer(src, n) for n in vals}, table.max_layer())
                    clean = runner.run(pair.target, enc.input_ids,
                                       {n: capturer(tgt, n) for n in vals})
                    assert clean is not None
                    f0 = self.ctx.metric_fn()(clean, enc.to(clean.device)).double().cpu()
                    del clean
                    effects = Effects(pair, table, src, tgt)
                    delta = total_delta(effects)
                grads = {n: torch.zeros_like(delta[n]) for n in writes}
                per_pass = per_pass or self._steps_per_pass(len(points), enc)
                f1: torch.Tensor | None = None
                for i in range(0, len(points), per_pass):
                    chunk = points[i : i + per_pass]
                    g, metric = self._path(runner, enc, delta, writes, chunk)
                    for n in writes:
                        grads[n] += g[n]
                    if chunk[-1] == 1.0:
                        f1 = metric[-1]
                if f1 is None:
                    with torch.no_grad():
                        f1 = self._path(runner, enc, delta, writes, [1.0], grad=False)[1][0]
                with torch.no_grad():
                    mean_grads = {n: grads[n] / len(points) for n in writes}
                    per = acc.new_batch(b)
                    effects.attribution(mean_grads, per)
                effect_sum += float((f1 - f0).sum())
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(b)
        meta: dict[str, object] = {"steps": self.opts.steps, "rule": self.opts.rule,
                                   "points": points,
                                   "path_effect": effect_sum / max(1, acc.count),
                                   "steps_per_pass": per_pass}
        return RawScores(acc.mean("score"), acc.consistency(), meta=meta)

    def _steps_per_pass(self, steps: int, enc: Encoded) -> int:
        """``steps_per_pass``, or for "auto" as many replicas of the first batch as fit in
        ``max_pass_mb``: per token, the logits and their log-softmax plus a rough count of the
        activations every layer keeps for the backward."""
        per = self.opts.steps_per_pass
        if per != "auto":
            return min(int(per), steps)
        b, seq = enc.input_ids.shape
        rows = rows_that_fit(
            self.ctx.pair, self.ctx.layout, self.opts.max_pass_mb, seq,
            lambda d, vocab: 3 * vocab + d.n_layers * (6 * d.I + 16 * d.D + 3 * d.H * seq),
        )
        return max(1, min(steps, rows // max(1, b)))

    def _path(
        self, runner: HookRunner, enc: Encoded, delta: dict[str, torch.Tensor],
        writes: list[str], alphas: list[float], grad: bool = True,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One forward (and with ``grad``, backward) of the target with ``a * delta_all`` added,
        for each ``a`` in ``alphas`` (replica ``r`` of the batch carries ``alphas[r]``). Returns
        the gradients at the write hooks summed over the replicas ``[batch, pos, ...]`` (empty
        without ``grad``) and the metric per replica and prompt ``[replicas, batch]``."""
        pair = self.ctx.pair
        n_rep, b = len(alphas), len(enc)
        graph: dict[str, torch.Tensor] = {}

        def patcher(name: str) -> Handler:
            d = delta[name]
            a = torch.tensor(alphas, dtype=d.dtype, device=d.device).view(
                n_rep, *([1] * d.dim()))

            def h(t: torch.Tensor) -> torch.Tensor:
                add = (a * d[None]).to(t.dtype).reshape(n_rep * b, *t.shape[1:])
                out = t + add.to(t.device)
                if grad and not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                graph[name] = out
                return out

            return h

        rep = Encoded(enc.input_ids.repeat(n_rep, 1), enc.prompt_len.repeat(n_rep),
                      enc.answer_len.repeat(n_rep), enc.pad_id)
        with torch.set_grad_enabled(grad):
            logits = runner.run(pair.target, rep.input_ids,
                                {n: patcher(n) for n in writes})
            assert logits is not None
            metric = self.ctx.metric_fn()(logits, rep.to(logits.device))
            if not grad:
                return {}, metric.double().cpu().view(n_rep, b)
            total = metric.sum()
            if not total.requires_grad:
                raise ScoringError(f"{self.name}: the metric does not depend on the logits")
            missing = [n for n in writes if n not in graph]
            if missing:
                raise RuntimeError(f"write hook {missing[0]} did not fire")
            g = torch.autograd.grad(total, [graph[n] for n in writes], allow_unused=True)
        out: dict[str, torch.Tensor] = {}
        for n, gi in zip(writes, g):
            gi = torch.zeros_like(graph[n]) if gi is None else gi
            out[n] = work(gi.detach()).view(n_rep, b, *gi.shape[1:]).sum(0)
        return out, metric.detach().double().cpu().view(n_rep, b)


__all__ = ["MAX_STEPS", "AttributionIG", "path_points", "total_delta"]
