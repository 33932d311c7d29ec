"""The text summary of a run: :func:`format_table` is ``RunResult.table()`` (what
``tl-transplant run`` and ``demo`` print), read from the run's typed
:class:`~tl_transplant.sweeps.records.Results` (its ``results.json``).

The sweep's own summary (``SweepResult.summary()``) and the lines both share (controls,
comparison) live beside the sweep's result, in :mod:`tl_transplant.sweeps.summary`; their
names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tl_transplant.sweeps.records import Results
from tl_transplant.sweeps.summary import (
    COMPARISON_NOTE,
    NO_CHOICE,
    fmt,
    format_comparison,
    format_controls,
    format_sweep_summary,
    pct,
    units_pct,
)

if TYPE_CHECKING:
    from tl_transplant.sweeps.result import SweepResult


def format_table(results: Results | Mapping[str, Any],
                 sweep_result: SweepResult | None = None) -> str:
    """``RunResult.table()`` (what the CLI prints), from a run's :class:`Results` (a
    ``results.json`` mapping is read into one first).

    Baselines; best K and alpha per method (from ``sweep_result``, when given); what was
    searched, the choice, how much to trust it, its test TIR and recovery with CIs, the
    parameter-matched controls, retention, and the comparison.
    """
    r = results if isinstance(results, Results) else Results.model_validate(dict(results))
    b = r.baselines
    lines = [
        "baselines           dev      test",
        f"  source        {fmt(b.source.dev):>8}  {fmt(b.source.test):>8}",
        f"  target        {fmt(b.target.dev):>8}  {fmt(b.target.test):>8}",
    ]
    if sweep_result is not None and sweep_result.best_by_method:
        lines.append("best per method (chosen on dev)  %params  %units     K  alpha   dev    "
                     "test  recovery")
        for meth, row in sweep_result.best_by_method.items():
            m = row.test.metrics if row.test is not None else None
            k = "-" if row.grain != "unit" else str(row.k)
            label = meth + (" (extrapolating)" if row.extrapolates else "")
            lines.append(
                f"  {label:<30} {pct(row.pct_params):>7}  "
                f"{units_pct(row.pct_units, row.grain):>6}  {k:>4}  "
                f"{row.alpha:>5.2f}  {row.metric:.3f}  "
                f"{fmt(m.transplanted if m else None)}  {fmt(m.recovery if m else None)}"
            )
    best = r.best
    if best is None or r.test is None:
        lines.append(NO_CHOICE)
        return "\n".join(lines)
    t = r.test
    ci = t.ci
    size = f"K={best.k}"
    bud = best.budget
    if best.mask is not None:
        size = (f"budget {bud if isinstance(bud, str) else f'{100 * (bud or 0):.4g}%'}  "
                f"{best.mask.n_params} single weights")
    elif bud is not None:
        size = f"budget {bud if isinstance(bud, str) else f'{100 * bud:.4g}%'}  {size}"
    alpha = f"alpha={best.alpha:g}"
    if best.extrapolates:
        alpha += f" (effective {best.effective_alpha:.3g}, extrapolating)"
    fu = r.fraction_units
    if r.searched is not None and r.searched.text:
        lines.append(f"searched: {r.searched.text}")
    lines += [
        f"chosen: {best.method}  {size}  {alpha}  "
        f"({r.fraction_params:.2%} of block parameters"
        + ("" if fu is None else f", {fu:.1%} of units searched") + ")",
    ]
    sel = r.selection
    if sel is not None and sel.text:
        lines.append(f"selection: {sel.text}")
    lines.append(
        f"test: transplanted {fmt(t.transplanted)}  TIR {fmt(t.tir)} "
        f"{fmt(ci.get('tir'))}  recovery {fmt(t.recovery)} {fmt(ci.get('recovery'))}")
    lines += format_controls(r.controls)
    if sel is not None and sel.warning:
        lines.append(f"warning: {sel.warning}")
    ret = r.retention_control
    if ret is not None and ret.mode in ("generic", "none"):
        lines.append(f"retention control: {ret.description}")
    for x in r.retention:
        lines.append(f"retention {x.task}: {fmt(x.before)} -> {fmt(x.after)} "
                     f"(drop {fmt(x.drop)})")
    if sweep_result is not None:
        lines += format_comparison(sweep_result)
    return "\n".join(lines)


__all__ = ["COMPARISON_NOTE", "NO_CHOICE", "format_comparison", "format_controls",
           "format_sweep_summary", "format_table"]
