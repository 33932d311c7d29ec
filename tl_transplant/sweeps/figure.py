"""The sweep's figure: dev metric vs size, one line per alpha, one panel per method.

``SweepResult.plot()`` draws it; :func:`tl_transplant.report.views.sweep_plot` builds the report's
figure on it. It imports only matplotlib (nothing above the sweep) and reads the result
by attribute, so the sweep module stays free of plotting code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

#: (label, marker, which rows) of the plotted series.
_SERIES: tuple[tuple[str, str, Any], ...] = (
    ("K", "o", lambda r: r.budget is None),
    ("budget", "s", lambda r: isinstance(r.budget, float)),
    ("suggested", "*", lambda r: r.budget == "suggested"),
    ("dense", "P", lambda r: r.budget == "dense"),
)


def plot_sweep(result: Any, ax: Axes | None = None) -> Figure | SubFigure:
    """Dev metric vs K, one line per alpha (one panel per method), with baselines.

    With budget rows the x axis is % of block parameters for every row (K rows as
    circles, budget rows as squares, a scorer's suggested set as stars, dense as
    pluses). Uses matplotlib's object API with the Agg canvas (no pyplot, no global
    backend change). Returns the Figure (or the given axes' figure).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.rows
    methods = result.methods
    fig: Figure | SubFigure
    if ax is None:
        fig = Figure(figsize=(4.2 * len(methods) + 0.8, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(methods), sharey=True, squeeze=False)[0]
    else:
        fig, axes = ax.figure, [ax] * len(methods)  # a Figure, or a SubFigure's
    alphas = sorted({r.alpha for r in rows})
    colors = [f"C{i}" for i in range(10)]
    dev = result.baselines["dev"]
    # With budget rows, x is % of block parameters for every row (K rows included).
    by_params = any(r.budget is not None for r in rows) and all(
        r.pct_params is not None for r in rows
    )

    def x_of(r: Any) -> float:
        return 100 * float(r.pct_params or 0.0) if by_params else float(r.k)

    for a_i, (m, a) in enumerate(zip(methods, axes)):
        for j, alpha in enumerate(alphas):
            for s_name, marker, keep in _SERIES:
                pts = sorted(
                    (x_of(r), r.metric) for r in rows
                    if r.method == m and r.alpha == alpha and keep(r)
                )
                if not pts:
                    continue
                label = f"alpha={alpha:g}" + ("" if s_name == "K" else f" ({s_name})")
                a.plot(
                    *zip(*pts),
                    marker=marker,
                    color=colors[j % 10],
                    label=label,
                    linestyle="-" if ax is None else ["-", "--", ":", "-."][a_i % 4],
                )
        a.axhline(dev["source"].mean, color="green", linestyle="--", linewidth=1, label="source")
        a.axhline(dev["target"].mean, color="red", linestyle=":", linewidth=1, label="target")
        b = result.best_by_method.get(m)
        if b is not None:
            a.plot([x_of(b)], [b.metric], marker="*", markersize=14, color="gold",
                   markeredgecolor="black", linestyle="none", label="chosen")
        if by_params:
            xs = sorted({x_of(r) for r in rows})
            if xs and xs[0] <= 0:
                a.set_xscale("symlog", linthresh=max(1e-3, min((x for x in xs if x > 0),
                                                               default=1.0)))
            elif len(xs) > 1:
                a.set_xscale("log")
            a.set_xlabel("% of block parameters transplanted")
        else:
            if any(r.k == 0 for r in rows):
                a.set_xscale("symlog", linthresh=1)
            elif len({r.k for r in rows}) > 1:
                a.set_xscale("log", base=2)
            k_vals = sorted({r.k for r in rows})
            a.set_xticks(k_vals, [str(k) for k in k_vals], minor=False)
            a.set_xticks([], minor=True)
            a.set_xlabel("K (units transplanted)")
        a.set_title(m if ax is None else f"{result.task.get('name')}")
    axes[0].set_ylabel(f"dev {result.metric}")
    axes[0].legend(fontsize="small")
    return fig


__all__ = ["plot_sweep"]
