"""The text summary of a sweep (``SweepResult.summary()``) and the lines it shares with a
run's table (:func:`tl_transplant.report.text.format_table`): one set of number formats.

Everything here reads the typed records of :mod:`tl_transplant.sweeps.records` (or the
sweep's own rows) by attribute; nothing runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tl_transplant.sweeps.records import ControlRecord
    from tl_transplant.sweeps.result import SweepResult

NO_CHOICE = "no configuration met the retention constraint"
COMPARISON_NOTE = "choice made on dev; test shown for every cell"


def value_ci(v: float | None, ci: Sequence[float] | None) -> str:
    """``0.512 [0.4, 0.61]`` (3 significant digits), ``undefined`` for None."""
    if v is None:
        return "undefined"
    return f"{v:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def pct(v: float | None) -> str:
    """``2.08%`` (3 significant digits), ``?`` when unknown."""
    return "?" if v is None else f"{100 * v:.3g}%"


def units_pct(v: float | None, grain: str | None) -> str:
    """% of units, ``n/a`` for weight masks and dense (they are not unit sets)."""
    return "n/a" if grain in ("weight", "dense") else pct(v)


def fmt(v: Any, nd: int = 3) -> str:
    """Fixed ``nd`` decimals for floats, ``[lo, hi]`` for a CI pair, ``n/a`` for None."""
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{fmt(v[0], nd)}, {fmt(v[1], nd)}]"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def format_sweep_summary(result: SweepResult) -> str:
    """``SweepResult.summary()``: baselines on dev, the choice on dev, and its test numbers."""
    d, t = result.baselines["dev"], result.baselines.get("test", {})
    lines = [
        f"task {result.task.get('name')!r} ({result.metric}), prepend_bos="
        f"{result.config.get('prepend_bos')}: dev n={result.config.get('n_dev')}, "
        f"test n={result.config.get('n_test')}",
        f"dev: source {d['source'].mean:.4g}, target {d['target'].mean:.4g}",
    ]
    if result.best is None:
        lines.append(NO_CHOICE)
        return "\n".join(lines)
    ret = result.config.get("retention", {})
    if ret.get("mode") == "generic":
        lines.append(f"control: {ret.get('description')}")
    b = result.best
    if result.searched is not None and result.searched.text:
        lines.append(f"searched: {result.searched.text}")
    alpha = f"alpha={b.alpha:g}" + (f" (x{b.alpha_scale:.3g} = {b.effective_alpha:.3g}, "
                                      "extrapolating)" if b.alpha_scale != 1.0 else "")
    lines.append(
        f"best on dev: {b.method} {_size(b)} {alpha} -> {b.metric:.4g} "
        f"(max control drop {b.max_drop:.3g})"
    )
    trust = result.trust
    if trust is not None:
        lines.append(f"selection: {trust.text()}")
    if b.test is not None and t:
        m = b.test.metrics
        lines.append(
            f"test: source {m.source:.4g}, target {m.target:.4g}, transplanted "
            f"{m.transplanted:.4g}; delta {value_ci(m.delta, m.ci.get('delta'))}, TIR "
            f"{value_ci(m.tir, m.ci.get('tir'))}, recovery "
            f"{value_ci(m.recovery, m.ci.get('recovery'))}"
        )
        for r in b.test.retention:
            lines.append(f"  retention {r.task}: {r.before:.4g} -> {r.after:.4g}")
    lines += format_controls(result.control_records())
    if trust is not None and trust.warning:
        lines.append(f"warning: {trust.warning}")
    return "\n".join(lines + format_comparison(result))


def _size(row: Any) -> str:
    """``K=3 (2.08% of block params, 21.4% of units)``: parameters first, then units."""
    if getattr(row, "mask", None) is not None:
        return (f"{row.size} ({pct(row.pct_params)} of block params, {row.n_params} single "
                "weights)")
    what = f"K={row.k}" if row.budget is None else f"{row.size} (K={row.k})"
    return f"{what} ({pct(row.pct_params)} of block params, {pct(row.pct_units)} of units)"


def format_controls(controls: Mapping[str, ControlRecord]) -> list[str]:
    """The verdict's control lines (both sizes, the control's test figures, and chosen minus
    control with its CI)."""
    if not controls:
        return []
    first = next(iter(controls.values()))
    lines = []
    if first.chosen_pct_params is not None:
        lines.append(f"controls, each filled to the chosen configuration's "
                     f"{first.chosen_n_params} weights ({pct(first.chosen_pct_params)} "
                     "of block params), on test:")
    for name, c in controls.items():
        size = ""
        if c.pct_params is not None:
            a, ea = c.alpha, c.effective_alpha
            alpha = f", alpha {fmt(a, 3)}"
            if abs(ea - a) > 1e-12:
                alpha += f" x{ea / a:.3g} = {fmt(ea, 3)}"
            size = f"{pct(c.pct_params)} params ({c.n_params} weights){alpha}" + (
                " (extrapolating control)" if c.extrapolates else "") + ": "
        lines.append(
            f"control {name:<14} {size}test {fmt(c.test)}  recovery {fmt(c.recovery)}  "
            f"best-control {fmt(c.best_minus_control)} CI {fmt(c.best_minus_control_ci)}"
        )
        if c.note and not c.extrapolates:
            lines.append(f"  ({c.note})")
    return lines


def format_comparison(result: SweepResult) -> list[str]:
    """The comparison table's lines (empty without ``compare_on_test``)."""
    if not result.comparison:
        return []
    lines = [f"comparison ({COMPARISON_NOTE}):",
             "  method               size            %params  %units  alpha  test recovery [CI]"
             "          ret.drop  dev rec."]
    limit = _limit(result)
    for c in result.comparison:
        d = c.record()
        vs = "".join(
            f"  -{k}{'(x)' if v.extrapolates else ''} {value_ci(v.diff, v.ci)}"
            for k, v in d.vs.items()
        )
        drop = d.retention_drop
        name = d.method + (" (x)" if d.extrapolates else "")
        lines.append(
            f"  {name:<20} {d.size:<15} {pct(d.pct_params):>7}  "
            f"{units_pct(d.pct_units, d.grain):>6}  {d.alpha:>5g}  "
            f"{value_ci(d.test_recovery, d.test_recovery_ci):<26}  "
            f"{'n/a' if drop is None else f'{drop:.3g}':>8}  "
            f"{'n/a' if d.dev_recovery is None else format(d.dev_recovery, '.3g'):>8}"
            + ("" if d.feasible else "  (above the largest budget: not selectable)"
               if c.row.over_budget and c.row.max_drop <= limit else
               "  (infeasible on dev)")
            + ("" if d.grain != "dense" or d.recovery_per_pct_params is None
               else f"  (test recovery per % of params {d.recovery_per_pct_params:.3g})")
            + vs
        )
    lines.append("  -X: this cell minus control X filled to the cell's own parameter count at "
                 "its alpha (dense: at its dev retention cost), paired CI; (x): an "
                 "extrapolating control (alpha x 1/p, DARE)")
    return lines


def _limit(result: SweepResult) -> float:
    lim = result.config.get("max_retention_drop")
    return float("inf") if lim is None else float(lim) + 1e-12


__all__ = ["COMPARISON_NOTE", "NO_CHOICE", "fmt", "format_comparison", "format_controls",
           "format_sweep_summary", "pct", "units_pct", "value_ci"]
