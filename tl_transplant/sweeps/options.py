"""The settings of a sweep, in one typed object (:class:`SweepOptions`).

:func:`tl_transplant.sweeps.protocol.sweep` takes them as keyword arguments (its public
API); the stages (:mod:`tl_transplant.sweeps.stages`) take this object. What a sweep is
*about* (the pair, the task, the scores, the control tasks and the verdict's controls)
is not a setting and is passed beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tl_transplant.edit.budget import check_fraction
from tl_transplant.evaluation.stats import DEFAULT_GAP_TOL, DEFAULT_N_BOOT
from tl_transplant.sweeps.search import Kinds, SweepError, resolve_ks
from tl_transplant.sweeps.selection import DEFAULT_CV_FOLDS

if TYPE_CHECKING:
    from tl_transplant.edit.edits import KVMode
    from tl_transplant.evaluation.evaluator import EditFactory, EvalResult

#: One dev evaluation of a configuration: the task's result and the control tasks' means.
DevEval = tuple["EvalResult", dict[str, float]]


class DevStore(Protocol):
    """Where a sweep keeps its finished dev evaluations across runs (a resumed run's
    staging area, :class:`tl_transplant.pipeline.resume.RunStore`); keys are
    :func:`~tl_transplant.sweeps.search.selection_key` s."""

    def get_eval(self, key: tuple[Any, ...]) -> DevEval | None: ...

    def put_eval(self, key: tuple[Any, ...], value: DevEval) -> bool: ...


@dataclass(frozen=True)
class SweepOptions:
    """How to sweep: sizes and alphas, the split, retention, statistics, and running.

    Fields are the keyword arguments of :func:`~tl_transplant.sweeps.protocol.sweep` (see
    its docstring). :meth:`checked` returns the options with ``ks``, ``budgets`` and
    ``alphas`` resolved (``ks=None`` -> the default counts unless budgets are given) and
    checked.
    """

    ks: Sequence[int] | None = None
    alphas: Sequence[float] = (1.0,)
    dev_fraction: float = 0.5
    units: Kinds = None
    max_retention_drop: float | None = None
    seed: int = 0
    budgets: Sequence[float] = ()
    compare_on_test: bool = False
    kv: KVMode = "group"
    prepend_bos: bool | str | None = None
    batch_size: int = 16
    progress: bool = True
    n_boot: int = DEFAULT_N_BOOT
    level: float = 0.95
    gap_tol: float = DEFAULT_GAP_TOL
    report_each_method: bool = True
    edit: EditFactory | None = None
    retention_kwargs: Mapping[str, Any] | None = field(default=None, compare=False)
    cv_folds: int = DEFAULT_CV_FOLDS
    #: Keeps/reuses the dev evaluations of the configurations (a resumed run's), or None.
    dev_store: DevStore | None = field(default=None, compare=False)

    def checked(self) -> SweepOptions:
        """Sizes resolved and checked: distinct budget fractions in (0, 1], K >= 0, at least
        one size and one alpha (a :class:`~tl_transplant.sweeps.search.SweepError` otherwise)."""
        from dataclasses import replace

        for what, xs in (("alpha", self.alphas), ("K", self.ks or ())):
            bad = [x for x in xs if isinstance(x, bool) or type(x).__name__ == "bool_"]
            if bad:  # True would silently become 1.0 / K=1
                raise SweepError(f"each {what} must be a number, got {bad[0]!r}")
        alphas = tuple(float(a) for a in self.alphas)
        try:
            fracs = tuple(dict.fromkeys(check_fraction(b, "each budget") for b in self.budgets))
        except ValueError as e:
            raise SweepError(str(e)) from None
        ks = tuple(resolve_ks(None if self.ks is None else list(self.ks), fracs))
        if (not ks and not fracs) or not alphas:
            raise SweepError("give at least one K (ks) or budget (budgets), and a non-empty alphas")
        if any(k < 0 for k in ks):
            raise SweepError(f"ks must be >= 0, got {list(ks)}")
        if ks and not any(ks) and not fracs:
            raise SweepError(
                "ks=[0] sweeps nothing: K=0 is the target itself (every sweep reports it as "
                "its baseline); give at least one K >= 1 or a budget"
            )
        return replace(self, ks=ks, alphas=alphas, budgets=fracs)


__all__ = ["SweepOptions"]
