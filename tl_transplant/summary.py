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
    b = result.best
    lines.append(
        f"best on dev: {b.method} K={b.k} alpha={b.alpha:g} -> {b.metric:.4g} "
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
    return "\n".join(lines)


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
        lines.append("best per method (chosen on dev)     K  alpha   dev    test  recovery")
        for meth, r in sweep_result.best_by_method.items():
            t = r.test.metrics if r.test is not None else None
            lines.append(
                f"  {meth:<30} {r.k:>4}  {r.alpha:>5.2f}  {r.metric:.3f}  "
                f"{_fmt(t.transplanted if t else None)}  {_fmt(t.recovery if t else None)}"
            )
    best = results.get("best")
    if not best:
        lines.append(NO_CHOICE)
        return "\n".join(lines)
    t = results["test"]
    ci = t["ci"]
    lines += [
        f"chosen: {best['method']}  K={best['k']}  alpha={best['alpha']:g}  "
        f"({results['fraction_units']:.1%} of units searched, "
        f"{results['fraction_params']:.2%} of block parameters)",
        f"test: transplanted {_fmt(t['transplanted'])}  TIR {_fmt(t['tir'])} "
        f"{_fmt(ci.get('tir'))}  recovery {_fmt(t['recovery'])} {_fmt(ci.get('recovery'))}",
    ]
    for name, c in results["controls"].items():
        lines.append(
            f"control {name:<10} test {_fmt(c['test'])}  recovery {_fmt(c['recovery'])}  "
            f"best-control {_fmt(c['best_minus_control'])} CI {_fmt(c['best_minus_control_ci'])}"
        )
    for r in results["retention"]:
        lines.append(f"retention {r['task']}: {_fmt(r['before'])} -> {_fmt(r['after'])} "
                     f"(drop {_fmt(r['drop'])})")
    return "\n".join(lines)


__all__ = ["NO_CHOICE", "format_sweep_summary", "format_table"]
