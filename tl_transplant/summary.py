"""The text summaries of a sweep and of a run: one module, one set of number formats.

* :func:`format_sweep_summary` is ``SweepResult.summary()``: a few lines with the
  dev baselines, the configuration chosen on dev and its test numbers with CIs.
* :func:`format_table` is ``RunResult.table()`` (what ``tl-transplant run`` and
  ``demo`` print): the run's ``results.json`` as a table, with each method's best.

Both read their inputs by attribute/key only (no imports from the rest of the
package), so :mod:`tl_transplant.sweeps` and :mod:`tl_transplant.pipeline` use
them without importing each other or the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tl_transplant.sweeps import SweepResult

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
    lines.append(
        f"best on dev: {b.method} {_size(b)} alpha={b.alpha:g} -> {b.metric:.4g} "
        f"(max control drop {b.max_drop:.3g})"
    )
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
    return "\n".join(lines + format_comparison(result))


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.3g}%"


def _size(row: Any) -> str:
    """``K=3 (2.08% of block params, 21.4% of units)``: parameters first, then units."""
    what = f"K={row.k}" if row.budget is None else f"{row.size} (K={row.k})"
    return f"{what} ({_pct(row.pct_params)} of block params, {_pct(row.pct_units)} of units)"


def format_comparison(result: SweepResult) -> list[str]:
    """The comparison table's lines (empty without ``compare_on_test``)."""
    cells = getattr(result, "comparison", None)
    if not cells:
        return []
    lines = [f"comparison ({COMPARISON_NOTE}):",
             "  method          size            %params  %units  alpha  test recovery [CI]"
             "          ret.drop  dev rec."]
    for c in cells:
        d = c.to_dict()
        vs = "".join(
            f"  -{k} {_value_ci(v['diff'], v['ci'])}" for k, v in d["vs"].items()
        )
        drop = d["retention_drop"]
        lines.append(
            f"  {d['method']:<15} {d['size']:<15} {_pct(d['pct_params']):>7}  "
            f"{_pct(d['pct_units']):>6}  {d['alpha']:>5g}  "
            f"{_value_ci(d['test_recovery'], d['test_recovery_ci']):<26}  "
            f"{'n/a' if drop is None else f'{drop:.3g}':>8}  "
            f"{'n/a' if d['dev_recovery'] is None else format(d['dev_recovery'], '.3g'):>8}"
            + ("" if d["feasible"] else "  (infeasible on dev)") + vs
        )
    return lines


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
            lines.append(
                f"  {meth:<30} {_pct(r.pct_params):>7}  {_pct(r.pct_units):>6}  {r.k:>4}  "
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
    if best.get("budget") is not None:
        b = best["budget"]
        size = f"budget {b if isinstance(b, str) else f'{100 * b:.4g}%'}  {size}"
    lines += [
        f"chosen: {best['method']}  {size}  alpha={best['alpha']:g}  "
        f"({results['fraction_params']:.2%} of block parameters, "
        f"{results['fraction_units']:.1%} of units searched)",
        f"test: transplanted {_fmt(t['transplanted'])}  TIR {_fmt(t['tir'])} "
        f"{_fmt(ci.get('tir'))}  recovery {_fmt(t['recovery'])} {_fmt(ci.get('recovery'))}",
    ]
    for name, c in results["controls"].items():
        lines.append(
            f"control {name:<10} test {_fmt(c['test'])}  recovery {_fmt(c['recovery'])}  "
            f"best-control {_fmt(c['best_minus_control'])} CI {_fmt(c['best_minus_control_ci'])}"
        )
    ret = results.get("retention_control") or {}
    if ret.get("mode") in ("generic", "none"):
        lines.append(f"retention control: {ret.get('description')}")
    for r in results["retention"]:
        lines.append(f"retention {r['task']}: {_fmt(r['before'])} -> {_fmt(r['after'])} "
                     f"(drop {_fmt(r['drop'])})")
    if sweep_result is not None:
        lines += format_comparison(sweep_result)
    return "\n".join(lines)


__all__ = ["COMPARISON_NOTE", "NO_CHOICE", "format_comparison", "format_sweep_summary",
           "format_table"]
