"""An lm-eval split as a :class:`~tl_transplant.tasks.task.Task` that evaluates through lm-eval.

:class:`HarnessTaskView` is what :meth:`HarnessSplit.as_task
<tl_transplant.harness.source.HarnessSplit.as_task>` returns: the documents as a plain
differentiable Task (lm-eval's contexts and continuations; ``mc_logprob`` or
``answer_logprob``) for the scorers, which also carries its lm-eval split. Evaluating it
(:func:`tl_transplant.evaluation.evaluator.evaluate`, so the sweep, the run and the controls)
goes through lm-eval's own request -> response -> filters -> ``process_results`` pipeline
(:func:`tl_transplant.harness.run.evaluate_split`) and gives lm-eval's per-document metric
(``acc``, ``acc_norm``, ``exact_match``, ``math_verify``): those per-example scores feed the
paired bootstrap, TIR, recovery and retention like any task's. The evaluator finds the
``evaluate_external`` method and calls it; nothing below the harness imports the harness.

Engines (``evaluate(..., engine=...)``):

* ``"lm_eval"``: lm-eval's ``HFLM`` over the in-memory HF modules (the very tensors an
  applied or active weight transplant edits): the numbers of a plain ``lm_eval`` run on the
  exported model.
* ``"lm_eval_bridge"``: lm-eval's pipeline answered through the TransformerLens bridge
  (:class:`~tl_transplant.harness.lm.TLLM`): hooks and activation patches apply.
* ``None`` / ``"auto"`` (default): ``"lm_eval"``, or ``"lm_eval_bridge"`` while an
  intervention is given or a hook is registered on the model.
* ``"tl_transplant"``: the evaluator's own loop on the Task view (its ``metric``).

Subsets (``view.subset``, ``view.split``, ``view.replace``) are plain Tasks: lm-eval's prompts
with the view's differentiable metric, evaluated by tl_transplant's own loop (an lm-eval split
is evaluated whole, with the documents it was loaded with).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tl_transplant.harness.errors import HarnessError

if TYPE_CHECKING:
    from tl_transplant.evaluation.evaluator import EvalResult
    from tl_transplant.harness.source import HarnessSplit

from tl_transplant.tasks.task import Task

#: ``engine`` values of an lm-eval task (see the module docstring).
VIEW_ENGINES = ("auto", "lm_eval", "lm_eval_bridge", "tl_transplant")
_HARNESS_ENGINE = {"lm_eval": "hflm", "lm_eval_bridge": "tl"}


def _hooked(model: Any, side: str | None) -> bool:
    from tl_transplant.models.decoding import hooks_active

    m = getattr(model, side) if side in ("source", "target") and hasattr(model, side) else model
    parts = [x for x in (getattr(m, "bridge", None), getattr(m, "hf", None)) if x is not None]
    return bool(parts) and hooks_active(*parts)


@dataclass
class HarnessTaskView(Task):
    """An lm-eval split as a Task (see the module docstring); ``harness`` is the split."""

    harness: HarnessSplit | None = field(default=None, repr=False, compare=False)

    def resolve_engine(self, engine: str | None, model: Any = None, side: str | None = None,
                       intervention: Any = None) -> str:
        """The harness engine (``"hflm"``/``"tl"``) or ``"tl_transplant"`` for ``engine``."""
        e = "auto" if engine is None else engine
        if e not in VIEW_ENGINES:
            raise HarnessError(
                f"engine must be one of {', '.join(VIEW_ENGINES)} for an lm-eval task, got "
                f"{engine!r}"
            )
        if e == "tl_transplant":
            return e
        if e == "auto":
            hooked = intervention is not None or (model is not None and _hooked(model, side))
            return "tl" if hooked else "hflm"
        return _HARNESS_ENGINE[e]

    def evaluate_external(
        self,
        model: Any,
        *,
        side: str | None = None,
        engine: str | None = None,
        batch_size: int = 16,
        progress: bool = False,
        intervention: Any = None,
        forward: str = "bridge",
        kv_cache: bool = True,
    ) -> EvalResult:
        """Score the split through lm-eval (what :func:`~tl_transplant.evaluation.evaluator.
        evaluate` calls for this task); the EvalResult's ``task`` is this view's name."""
        from tl_transplant.harness.run import evaluate_split

        if self.harness is None:
            raise HarnessError(f"task {self.name!r} carries no lm-eval split")
        eng = self.resolve_engine(engine, model, side, intervention)
        if eng == "tl_transplant":
            raise HarnessError("engine='tl_transplant' is the evaluator's own loop; call "
                               "evaluate() with it instead of evaluate_external")
        if intervention is not None and not isinstance(intervention,
                                                       contextlib.AbstractContextManager):
            raise HarnessError(
                "an lm-eval task takes an intervention that is a context manager entered once "
                "around the run, not a per-batch callable"
            )
        res = evaluate_split(model, self.harness, side=side, engine=eng, batch_size=batch_size,
                             intervention=intervention, forward=forward, kv_cache=kv_cache,
                             progress=progress)
        res.task = self.name
        return res


__all__ = ["VIEW_ENGINES", "HarnessTaskView"]
