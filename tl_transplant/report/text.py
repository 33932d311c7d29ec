"""The text summaries of a sweep and of a run: one module, one set of number formats.

* :func:`format_sweep_summary` is ``SweepResult.summary()``: a few lines with the
  dev baselines, the configuration chosen on dev and its test numbers with CIs.
* :func:`format_table` is ``RunResult.table()`` (what ``tl-transplant run`` and
  ``demo`` print): the run's ``results.json`` as a table, with each method's best.

Both read their inputs by attribute/key only (no imports from the rest of the
package), so :mod:`tl_transplant.sweeps.protocol` and :mod:`tl_transplant.pipeline.runner` use
them without importing each other or the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tl_transplant.sweeps.protocol import SweepResult

NO_CHOICE = "no configuration met the retention constraint"
COMPARISON_NOTE = "choice made on dev; test shown for every cell"


def _value_ci(v: float | None, ci: Sequence[float] | None) -> str:
    """``0.512 [0.4, 0.61]`` (3 significant digits), ``undefined`` for None."""
    if v is None:
        return "undefined"
    return f"{v:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


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
    searched = getattr(result, "searched", None) or {}
    if searched.get("text"):
        lines.append(f"searched: {searched['text']}")
    alpha = f"alpha={b.alpha:g}" + (f" (x{b.alpha_scale:.3g} = {b.effective_alpha:.3g}, "
                                      "extrapolating)" if b.alpha_scale != 1.0 else "")
    lines.append(
        f"best on dev: {b.method} {_size(b)} {alpha} -> {b.metric:.4g} "
        f"(max control drop {b.max_drop:.3g})"
    )
    trust = getattr(result, "trust", None)
    if trust is not None:
        lines.append(f"selection: {trust.text()}")
    if b.test is not None and t:
        m = b.test.metrics
        lines.append(
            f"test: source {m.source:.4g}, target {m.target:.4g}, transplanted "
            f"{m.transplanted:.4g}; delta {_value_ci(m.delta, m.ci.get('delta'))}, TIR "
            f"{_value_ci(m.tir, m.ci.get('tir'))}, recovery "
            f"{_value_ci(m.recovery, m.ci.get('recovery'))}"
        )
        for r in b.test.retention:
            lines.append(f"  retention {r.task}: {r.before:.4g} -> {r.after:.4g}")
    verdict = getattr(result, "verdict", None) or {}
    lines += format_controls({k: v.to_dict() for k, v in verdict.items()})
    if trust is not None and trust.warning:
        lines.append(f"warning: {trust.warning}")
    return "\n".join(lines + format_comparison(result))


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.3g}%"


def _size(row: Any) -> str:
    """``K=3 (2.08% of block params, 21.4% of units)``: parameters first, then units."""
    if getattr(row, "mask", None) is not None:
        return (f"{row.size} ({_pct(row.pct_params)} of block params, {row.n_params} single "
                "weights)")
    what = f"K={row.k}" if row.budget is None else f"{row.size} (K={row.k})"
    return f"{what} ({_pct(row.pct_params)} of block params, {_pct(row.pct_units)} of units)"


def format_controls(controls: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The verdict's control lines from ``results.json``'s ``controls`` (both sizes, the
    control's test figures, and chosen minus control with its CI)."""
    if not controls:
        return []
    first = next(iter(controls.values()))
    lines = []
    if first.get("chosen_pct_params") is not None:
        lines.append(f"controls, each filled to the chosen configuration's "
                     f"{first.get('chosen_n_params')} weights ({_pct(first['chosen_pct_params'])} "
                     "of block params), on test:")
    for name, c in controls.items():
        size = ""
        if c.get("pct_params") is not None:
            a, ea = c.get("alpha"), c.get("effective_alpha")
            alpha = "" if a is None else f", alpha {_fmt(a, 3)}"
            if ea is not None and a is not None and abs(ea - a) > 1e-12:
                alpha += f" x{ea / a:.3g} = {_fmt(ea, 3)}"
            size = f"{_pct(c['pct_params'])} params ({c.get('n_params')} weights){alpha}" + (
                " (extrapolating control)" if c.get("extrapolates") else "") + ": "
        lines.append(
            f"control {name:<14} {size}test {_fmt(c['test'])}  recovery {_fmt(c['recovery'])}  "
            f"best-control {_fmt(c['best_minus_control'])} CI {_fmt(c['best_minus_control_ci'])}"
        )
        note = c.get("note")
        if note and not c.get("extrapolates"):
            lines.append(f"  ({note})")
    return lines


def format_comparison(result: SweepResult) -> list[str]:
    """The comparison table's lines (empty without ``compare_on_test``)."""
    cells = getattr(result, "comparison", None)
    if not cells:
        return []
    lines = [f"comparison ({COMPARISON_NOTE}):",
             "  method               size            %params  %units  alpha  test recovery [CI]"
             "          ret.drop  dev rec."]
    for c in cells:
        d = c.to_dict()
        vs = "".join(
            f"  -{k}{'(x)' if v.get('extrapolates') else ''} {_value_ci(v['diff'], v['ci'])}"
            for k, v in d["vs"].items()
        )
        drop = d["retention_drop"]
        name = d["method"] + (" (x)" if d.get("extrapolates") else "")
        lines.append(
            f"  {name:<20} {d['size']:<15} {_pct(d['pct_params']):>7}  "
            f"{_units_pct(d['pct_units'], d.get('grain')):>6}  {d['alpha']:>5g}  "
            f"{_value_ci(d['test_recovery'], d['test_recovery_ci']):<26}  "
            f"{'n/a' if drop is None else f'{drop:.3g}':>8}  "
            f"{'n/a' if d['dev_recovery'] is None else format(d['dev_recovery'], '.3g'):>8}"
            + ("" if d["feasible"] else "  (above the largest budget: not selectable)"
               if c.row.over_budget and c.row.max_drop <= _limit(result) else
               "  (infeasible on dev)")
            + ("" if d.get("grain") != "dense" or d.get("recovery_per_pct_params") is None
               else f"  (test recovery per % of params {d['recovery_per_pct_params']:.3g})")
            + vs
        )
    lines.append("  -X: this cell minus control X filled to the cell's own parameter count at "
                 "its alpha (dense: at its dev retention cost), paired CI; (x): an "
                 "extrapolating control (alpha x 1/p, DARE)")
    return lines


def _limit(result: Any) -> float:
    lim = result.config.get("max_retention_drop")
    return float("inf") if lim is None else float(lim) + 1e-12


def _units_pct(v: float | None, grain: str | None) -> str:
    """% of units, ``n/a`` for weight masks and dense (they are not unit sets)."""
    return "n/a" if grain in ("weight", "dense") else _pct(v)


def _fmt(v: Any, nd: int = 3) -> str:
    """Fixed ``nd`` decimals for floats, ``[lo, hi]`` for a CI pair, ``n/a`` for None."""
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{_fmt(v[0], nd)}, {_fmt(v[1], nd)}]"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def format_table(results: dict[str, Any], sweep_result: SweepResult | None = None) -> str:
    """``RunResult.table()`` (what the CLI prints), from the run's ``results.json`` dict.

    Baselines; best K and alpha per method; test TIR, recovery with CI, and retention.
    """
    b = results["baselines"]
    lines = [
        "baselines           dev      test",
        f"  source        {_fmt(b['source']['dev']):>8}  {_fmt(b['source']['test']):>8}",
        f"  target        {_fmt(b['target']['dev']):>8}  {_fmt(b['target']['test']):>8}",
    ]
    if sweep_result is not None and sweep_result.best_by_method:
        lines.append("best per method (chosen on dev)  %params  %units     K  alpha   dev    "
                     "test  recovery")
        for meth, r in sweep_result.best_by_method.items():
            t = r.test.metrics if r.test is not None else None
            k = "-" if r.grain != "unit" else str(r.k)
            label = meth + (" (extrapolating)" if r.extrapolates else "")
            lines.append(
                f"  {label:<30} {_pct(r.pct_params):>7}  {_units_pct(r.pct_units, r.grain):>6}  "
                f"{k:>4}  "
                f"{r.alpha:>5.2f}  {r.metric:.3f}  "
                f"{_fmt(t.transplanted if t else None)}  {_fmt(t.recovery if t else None)}"
            )
    best = results.get("best")
    if not best:
        lines.append(NO_CHOICE)
        return "\n".join(lines)
    t = results["test"]
    ci = t["ci"]
    size = f"K={best['k']}"
    b = best.get("budget")
    if best.get("mask") is not None:
        size = (f"budget {b if isinstance(b, str) else f'{100 * b:.4g}%'}  "
                f"{best['mask']['n_params']} single weights")
    elif b is not None:
        size = f"budget {b if isinstance(b, str) else f'{100 * b:.4g}%'}  {size}"
    alpha = f"alpha={best['alpha']:g}"
    if best.get("extrapolates"):
        alpha += f" (effective {best['effective_alpha']:.3g}, extrapolating)"
    fu = results.get("fraction_units")
    searched = results.get("searched") or {}
    sel = results.get("selection") or {}
    if searched.get("text"):
        lines.append(f"searched: {searched['text']}")
    lines += [
        f"chosen: {best['method']}  {size}  {alpha}  "
        f"({results['fraction_params']:.2%} of block parameters"
        + ("" if fu is None else f", {fu:.1%} of units searched") + ")",
    ]
    if sel.get("text"):
        lines.append(f"selection: {sel['text']}")
    lines.append(
        f"test: transplanted {_fmt(t['transplanted'])}  TIR {_fmt(t['tir'])} "
        f"{_fmt(ci.get('tir'))}  recovery {_fmt(t['recovery'])} {_fmt(ci.get('recovery'))}")
    lines += format_controls(results["controls"])
    if sel.get("warning"):
        lines.append(f"warning: {sel['warning']}")
    ret = results.get("retention_control") or {}
    if ret.get("mode") in ("generic", "none"):
        lines.append(f"retention control: {ret.get('description')}")
    for r in results["retention"]:
        lines.append(f"retention {r['task']}: {_fmt(r['before'])} -> {_fmt(r['after'])} "
                     f"(drop {_fmt(r['drop'])})")
    if sweep_result is not None:
        lines += format_comparison(sweep_result)
    return "\n".join(lines)


__all__ = ["COMPARISON_NOTE", "NO_CHOICE", "format_comparison", "format_controls",
           "format_sweep_summary", "format_table"]
