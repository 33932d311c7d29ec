"""``activation_patch``: the exact effect on the metric of patching each unit, one at a time.

``score_u = mean over prompts of metric(target with alpha * delta_u added) - metric(target)``,
with ``delta_u`` as in :mod:`tl_transplant.scoring.effects` (the source's
activation of the unit put into the target, at every position). It is the
ground truth that ``attribution`` approximates to first order; as ``alpha -> 0``
``score / alpha`` tends to the attribution score.

Cost: per batch of ``b`` prompts, one clean forward of each model, then one
patched forward of the target *per unit*: about ``n_units + 2`` forwards of the
target over the data, against about 4 for ``attribution``. Several units are
patched in one forward by replicating the batch (``units_per_pass``: replica
``r`` carries unit ``r``'s patch; ``"auto"`` fills a memory budget of
``max_pass_mb``), which on small models removes most of the per-forward
overhead. Replicas are independent rows, so the scores do not depend on
``units_per_pass`` or ``batch_size`` (up to float rounding).

Large models: patch a shortlist with ``candidates=``:

* ``candidates={"method": "attribution", "top": 200}``: the top 200 units of
  each scored kind by another method (run first, on the same data; its options
  in ``"options"``), or ``{"scores": some_scores, "top": 200}`` for scores you
  already have;
* ``candidates=["L3.H1", "L5.N17", ...]`` (or a :class:`Scores`, meaning every
  unit it scored): exactly these units.

Units outside the candidates are *not scored*: their score and consistency are
NaN, which :meth:`Scores.top` / :meth:`Scores.bottom` skip. With ``contrast=``
the candidates are chosen once, on the task. A run over more than
:data:`FULL_NEURON_LIMIT` neurons without candidates is refused unless
``allow_full=True``. Before a long run the expected cost is reported (log
record ``tl_transplant.scoring``, and on stderr when ``progress=True``), then
re-estimated from the measured time of the first batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tl_transplant.arch.units import Head, KVHead, Linear, Neuron, Unit, parse_unit
from tl_transplant.models.hooks import Handler, HookRunner, capturer
from tl_transplant.scoring.accumulate import Accumulator, UnitTable, unit_index
from tl_transplant.scoring.data import ScoringData
from tl_transplant.scoring.effects import Effects, units_in_order
from tl_transplant.scoring.registry import (
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    check_options,
    get_scorer,
    register,
)
from tl_transplant.scoring.scores import Scores
from tl_transplant.scoring.tensors import rows_that_fit
from tl_transplant.tasks.tokens import Encoded

#: Neuron-level runs over more neurons than this need ``candidates=`` or ``allow_full=True``.
FULL_NEURON_LIMIT = 4096
#: Runs estimated at more target forwards per prompt than this report their cost up front.
LONG_RUN_FORWARDS = 32
#: Forwards of the target over the data that ``attribution`` costs (source fwd, target fwd+bwd).
ATTRIBUTION_FORWARDS = 4.0

#: One replica's patches at one hook: (first replica, end replica, tensor [replicas, batch, ...]).
_Patch = tuple[int, int, torch.Tensor]


class CandidateRule(BaseModel):
    """``candidates={"method": ..., "top": N}``: the top N units of each kind by another method."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: The method that ranks the units (run on the same data first).
    method: str = "attribution"
    #: How many units of each scored kind to patch.
    top: Annotated[int, Field(ge=1)]
    #: That method's options.
    options: dict[str, Any] = Field(default_factory=dict)


def _unit_strings(units: Sequence[Any]) -> list[str]:
    try:
        return [str(parse_unit(u)) for u in units]
    except (ValueError, TypeError) as e:
        raise ScoringError(f"candidates holds something that is not a unit ({e})") from None


def _normalize_candidates(v: Any) -> Any:
    """Candidates as JSON-friendly data: ``None``, unit names or a :class:`CandidateRule`."""
    if v is None or isinstance(v, CandidateRule):
        return v
    if isinstance(v, Scores):
        return [str(u) for u, x in v if not math.isnan(x)]
    if isinstance(v, dict):
        if "scores" in v:
            extra = sorted(set(v) - {"scores", "top"})
            s, top = v["scores"], v.get("top")
            if extra or not isinstance(s, Scores):
                raise ScoringError(
                    "{'scores': <Scores>, 'top': N} takes a Scores object and an int "
                    f"top, and nothing else{f' (got {extra})' if extra else ''}")
            if isinstance(top, bool) or not isinstance(top, int) or top < 1:
                raise ScoringError(f"candidates 'top' must be an int >= 1, got {top!r}")
            return [str(u) for k in s.kinds for u in s.top(top, kinds=k)]
        return CandidateRule(**v)
    if isinstance(v, str):
        v = [p for p in v.replace(" ", "").split(",") if p]
    elif isinstance(v, (Head, KVHead, Neuron, Linear)):
        v = [v]
    if isinstance(v, (list, tuple)):
        if not v:
            raise ScoringError("candidates is empty")
        return list(dict.fromkeys(_unit_strings(v)))
    raise ScoringError(
        "candidates must be a list of units, a Scores, {'method': 'attribution', 'top': N} "
        f"or {{'scores': <Scores>, 'top': N}}, got {type(v).__name__}"
    )


@register
class ActivationPatch(Scorer):
    """metric(target with the unit's source activation) - metric(target), per unit."""

    name = "activation_patch"
    default_kinds = ("head",)
    needs_answers = True
    signed = True

    class Options(ScorerOptions):
        #: Patch strength: ``alpha * delta_u`` is added.
        alpha: Annotated[float, Field(allow_inf_nan=False)] = 1.0
        #: Units patched in one forward (the batch is replicated this many times), or "auto".
        units_per_pass: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
        #: Memory budget of one patched forward when ``units_per_pass="auto"``.
        max_pass_mb: Annotated[int, Field(ge=1)] = 1024
        #: Only these units are patched (see the module docstring); the others get NaN.
        candidates: Annotated[list[str] | CandidateRule | None, Field(description=(
            "a list of units, a Scores, {'method': 'attribution', 'top': N} or "
            "{'scores': <Scores>, 'top': N}"))] = None
        #: Patch every neuron even when there are more than FULL_NEURON_LIMIT of them.
        allow_full: bool = False

        @field_validator("candidates", mode="before")
        @classmethod
        def _candidates(cls, v: Any) -> Any:
            return _normalize_candidates(v)

    def check(self) -> None:
        rule = self.opts.candidates
        if isinstance(rule, CandidateRule):
            if rule.method == self.name:
                raise ScoringError("candidates: ranking by activation_patch itself is circular; "
                                   "use e.g. {'method': 'attribution', 'top': N}")
            ranker = get_scorer(rule.method)
            check_options(ranker, rule.options)
        self._chosen: list[int] | None = None

    # ---- candidates and cost ----------------------------------------------------------------
    def _candidates(self, units: list[Unit], data: ScoringData) -> list[int]:
        """Positions (into ``units``) of the units to patch; chosen once per scorer run."""
        if getattr(self, "_chosen", None) is not None:
            return self._chosen  # type: ignore[return-value]
        rule = self.opts.candidates
        if rule is None:
            n_neurons = sum(isinstance(u, Neuron) for u in units)
            if n_neurons > FULL_NEURON_LIMIT and not self.opts.allow_full:
                raise ScoringError(
                    f"activation_patch over {n_neurons} neurons would run about {n_neurons} "
                    f"patched forwards per prompt (~{(n_neurons + 2) / ATTRIBUTION_FORWARDS:.0f}x "
                    "attribution); patch a shortlist with candidates={'method': 'attribution', "
                    f"'top': 200}} (or candidates=scores.top(200)), or pass allow_full=True to "
                    f"patch all of them (the limit is {FULL_NEURON_LIMIT} neurons)"
                )
            chosen = list(range(len(units)))
        elif isinstance(rule, CandidateRule):
            ranker = get_scorer(rule.method)
            if not all(k in ranker.kinds for k in {u.kind for u in units}):
                raise ScoringError(f"candidates: {rule.method} cannot rank all of the unit kinds "
                                   f"scored here; it scores {', '.join(ranker.kinds)}")
            raw = ranker(self.ctx, check_options(ranker, rule.options)).run(units, data)
            ranked = Scores(units, raw.values, method=rule.method)
            pos = {u: i for i, u in enumerate(units)}
            chosen = sorted(pos[u] for k in ranked.kinds for u in ranked.top(rule.top, kinds=k))
        else:
            pos = {u: i for i, u in enumerate(units)}
            wanted = [parse_unit(u) for u in rule]
            missing = [str(u) for u in wanted if u not in pos]
            if missing:
                raise ScoringError(
                    f"candidates {missing[:5]} are not among the units being scored; pass them in "
                    "units= too (or units=their kinds)"
                )
            chosen = sorted(pos[u] for u in wanted)
        self._chosen = chosen
        return chosen

    def _units_per_pass(self, n_units: int, b: int, seq: int) -> int:
        """``units_per_pass``, or for "auto" as many as fit in ``max_pass_mb``."""
        per = self.opts.units_per_pass
        if per != "auto":
            return min(int(per), max(1, n_units))
        # live activations per token of one layer + logits and their log-softmax
        rows = rows_that_fit(self.ctx.pair, self.ctx.layout, self.opts.max_pass_mb, seq,
                             lambda d, vocab: 2 * vocab + 6 * d.I + 12 * d.D + 2 * d.H * seq)
        return max(1, min(n_units, rows // max(1, b)))

    # ---- run ----------------------------------------------------------------------------------
    def run(self, units: list[Unit], data: ScoringData | None) -> RawScores:
        assert data is not None
        chosen = self._candidates(units, data)
        sub = [units[i] for i in chosen]
        values, consistency, info = self._patch(sub, data)
        n = len(units)
        full_v = torch.full((n,), math.nan, dtype=torch.float64)
        full_c = torch.full((n,), math.nan, dtype=torch.float64)
        idx = torch.tensor(chosen, dtype=torch.long)
        full_v[idx] = values
        full_c[idx] = consistency
        meta = {"alpha": float(self.opts.alpha), "n_patched": len(sub), **info}
        return RawScores(full_v, full_c, meta=meta)

    def _patch(self, units: list[Unit], data: ScoringData
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        pair, layout = self.ctx.pair, self.ctx.layout
        alpha = float(self.opts.alpha)
        table = UnitTable(units, layout)
        acc = Accumulator(table)
        vals, writes = table.value_hooks(), table.write_hooks()
        names = list(dict.fromkeys(vals + writes))
        metric_fn = self.ctx.metric_fn()
        order = units_in_order(table)
        n_batches = math.ceil(len(data) / self.ctx.batch_size)
        fwd_per_prompt = len(units) + 2
        if fwd_per_prompt > LONG_RUN_FORWARDS:
            self.ctx.note(
                f"activation_patch: {len(units)} units x {len(data)} prompts = about "
                f"{fwd_per_prompt} forwards of the target per prompt "
                f"(~{fwd_per_prompt / ATTRIBUTION_FORWARDS:.0f}x attribution); "
                "candidates={'method': 'attribution', 'top': N} patches a shortlist"
            )
        per_pass_used = 0
        t0 = time.perf_counter()
        with self.ctx.hooks(names) as runner, torch.no_grad():
            for bi, (enc, _) in enumerate(
                self.ctx.batches(data, answers=True, desc="activation_patch")
            ):
                b = len(enc)
                per_pass = self._units_per_pass(len(order), b, int(enc.input_ids.shape[1]))
                per_pass_used = max(per_pass_used, per_pass)
                src: dict[str, torch.Tensor] = {}
                tgt: dict[str, torch.Tensor] = {}
                runner.run(pair.source, enc.input_ids,
                           {n: capturer(src, n) for n in vals}, table.max_layer())
                logits = runner.run(pair.target, enc.input_ids, {n: capturer(tgt, n) for n in vals})
                assert logits is not None
                clean = metric_fn(logits, enc.to(logits.device)).double().cpu()
                del logits
                effects = Effects(pair, table, src, tgt)
                per = acc.new_batch(b)
                for start in range(0, len(order), per_pass):
                    chunk = order[start : start + per_pass]
                    patches = _chunk_patches(effects, [u for _, u in chunk])
                    patched = self._patched_metric(runner, enc, len(chunk), patches, alpha)
                    eff = patched.view(len(chunk), b) - clean[None, :]
                    per[:, [i for i, _ in chunk]] = eff.T
                del src, tgt, effects
                acc.add("score", per)
                acc.add_consistency(per)
                acc.done(b)
                if bi == 0 and n_batches > 1:
                    spent = time.perf_counter() - t0
                    left = spent * (n_batches - 1)
                    if left > 10.0 or fwd_per_prompt > LONG_RUN_FORWARDS:
                        self.ctx.note(
                            f"activation_patch: first batch took {spent:.1f}s "
                            f"({math.ceil(len(order) / per_pass)} patched forwards of "
                            f"{per_pass * b} rows); about {left:.0f}s to go"
                        )
        info = {"units_per_pass": per_pass_used}
        return acc.mean("score"), acc.consistency(), info

    def _patched_metric(self, runner: HookRunner, enc: Encoded, n_rep: int,
                        patches: dict[str, list[_Patch]], alpha: float) -> torch.Tensor:
        """The metric of ``n_rep`` replicas of the batch, each with its own unit's patch."""
        pair = self.ctx.pair
        b = len(enc)

        def patcher(items: list[_Patch]) -> Handler:
            def h(t: torch.Tensor) -> torch.Tensor:
                out = t.clone(memory_format=torch.contiguous_format)
                view = out.view(n_rep, b, *t.shape[1:])
                for r0, r1, d in items:
                    view[r0:r1] += (alpha * d).to(out.dtype)
                return out

            return h

        rep = Encoded(enc.input_ids.repeat(n_rep, 1), enc.prompt_len.repeat(n_rep),
                      enc.answer_len.repeat(n_rep), enc.pad_id)
        logits = runner.run(pair.target, rep.input_ids,
                            {n: patcher(items) for n, items in patches.items()})
        assert logits is not None
        return self.ctx.metric_fn()(logits, rep.to(logits.device)).double().cpu()


def _chunk_patches(effects: Effects, chunk: list[Unit]) -> dict[str, list[_Patch]]:
    """Patches of a chunk of units (replica r = chunk[r]), built one (kind, layer) run at a time.

    ``units_in_order`` groups units by kind and layer, so each run is a contiguous
    block of replicas and its deltas are formed in one batched op; each replica's
    delta equals :meth:`Effects.delta` of its unit.
    """
    out: dict[str, list[_Patch]] = {}
    start = 0
    while start < len(chunk):
        u0 = chunk[start]
        end = start
        while end < len(chunk) and (chunk[end].kind, chunk[end].layer) == (u0.kind, u0.layer):
            end += 1
        for name, offset, d in _group_deltas(effects, chunk[start:end]):
            r0 = start + offset
            out.setdefault(name, []).append((r0, r0 + d.shape[0], d))
        start = end
    return out


def _group_deltas(effects: Effects, group: list[Unit]
                  ) -> list[tuple[str, int, torch.Tensor]]:
    """(hook, first replica within the group, deltas [replicas, batch, ...]) for units of one
    kind and layer: one batched delta per hook, or for whole linears one per unit and hook."""
    layer, hook = group[0].layer, effects.layout.hook
    idx = torch.tensor([unit_index(u, effects.layout) for u in group], dtype=torch.long,
                       device=effects.dev)
    u0 = group[0]
    if isinstance(u0, Head):
        z = hook("head", layer)
        w_s = effects.weight("source", "head", layer)[idx]
        w_t = effects.weight("target", "head", layer)[idx]
        d = (torch.einsum("bpnd,ndD->nbpD", effects.s(z)[:, :, idx], w_s)
             - torch.einsum("bpnd,ndD->nbpD", effects.t(z)[:, :, idx], w_t))
        return [(hook("attn_out", layer), 0, d)]
    if isinstance(u0, KVHead):
        res = []
        for n in (hook("kv_k", layer), hook("kv_v", layer)):
            diff = effects.s(n) - effects.t(n)  # [b, p, KV, dh]
            onehot = torch.zeros(len(group), diff.shape[2], dtype=diff.dtype, device=diff.device)
            onehot[torch.arange(len(group)), idx] = 1.0
            res.append((n, 0, diff[None] * onehot[:, None, None, :, None]))
        return res
    if isinstance(u0, Neuron):
        post = hook("neuron", layer)
        w_s = effects.weight("source", "neuron", layer)[idx, 0]
        w_t = effects.weight("target", "neuron", layer)[idx, 0]
        d = (effects.s(post)[:, :, idx].permute(2, 0, 1)[..., None] * w_s[:, None, None, :]
             - effects.t(post)[:, :, idx].permute(2, 0, 1)[..., None] * w_t[:, None, None, :])
        return [(hook("mlp_out", layer), 0, d)]
    assert isinstance(u0, Linear)
    return [(h, j, (effects.s(h) - effects.t(h))[None])
            for j, u in enumerate(cast(list[Linear], group))  # one kind per group
            for h in effects.layout.linear_hooks(u)]


__all__ = ["FULL_NEURON_LIMIT", "ActivationPatch", "CandidateRule"]
