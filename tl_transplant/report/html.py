"""``report.html``: one self-contained page summarising a transplant sweep.

>>> write_report("out/", pair=pair, task=task, sweep_result=res, scores=scores)  # doctest: +SKIP
PosixPath('out/report.html')

The page holds the pair and task summary, baselines, the sweep (plot and
table), the chosen units, score heatmaps, CircuitsVis attention and neuron
comparisons for the top units, and the retention table. It needs nothing but
the file: figures are PNG data URIs, the CircuitsVis bundle from the installed
``circuitsvis`` package is inlined once (see :mod:`tl_transplant.report.views`), there
are no links, fonts or stylesheets to fetch. :func:`save_sweep` saves a sweep's
files with its page; a run (``tl_transplant.run``, the CLI) calls :func:`write_report`
with its typed results (:class:`~tl_transplant.sweeps.records.Results`), which the page
shows as its run summary. The sweep never imports the report.
Sections that need the models (attention, neurons) or scores are skipped,
with a note, when those are not given.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from tl_transplant.arch.units import Head, Neuron, Unit, parse_units
from tl_transplant.edit.weights import WEIGHT, WeightMask
from tl_transplant.report.text import format_table
from tl_transplant.report.views import (
    CircuitsVisView,
    attention_compare,
    circuitsvis_bundle,
    figure_png,
    frame_to_html,
    js_literal,
    neuron_compare,
    score_heatmap,
    sweep_plot,
)
from tl_transplant.sweeps.records import Results
from tl_transplant.sweeps.result import SweepResult
from tl_transplant.sweeps.search import GRAIN_DENSE, TaskLike, mask_summary
from tl_transplant.sweeps.summary import COMPARISON_NOTE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tl_transplant.arch.model_layout import ModelLayout
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.scoring.scores import Scores
    from tl_transplant.scoring.weight_scores import WeightScores
    from tl_transplant.tasks.task import Task

#: ``scores=`` of :func:`write_report`: one Scores, a list, or ``{method: scores}`` (a
#: weight-level method's scores are drawn as their per-unit view).
ScoresArg: TypeAlias = (
    "Scores | Sequence[Scores] | Mapping[str, Scores | WeightScores] | None"
)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;
  background:#f6f8fa;line-height:1.4}
header{background:#24292f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px 0;font-size:22px}
header .sub{color:#c9d1d9;font-size:13px}
nav{background:#fff;border-bottom:1px solid #d0d7de;padding:8px 28px;font-size:13px;position:sticky;
  top:0;z-index:5}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
main{padding:12px 28px 40px 28px;max-width:1500px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 18px;margin:14px 0}
section h2{font-size:17px;margin:2px 0 10px 0}
section h3{font-size:14px;margin:12px 0 6px 0}
.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}
.kv div:nth-child(odd){color:#57606a}
table.tlt-table{border-collapse:collapse;font-size:12px;margin:6px 0}
table.tlt-table th,table.tlt-table td{border:1px solid #d0d7de;padding:3px 7px;text-align:left}
table.tlt-table td.num{text-align:right}
table.tlt-table th{background:#f6f8fa}
tr.best td{background:#fff8c5;font-weight:600}
.chips{display:flex;flex-wrap:wrap;gap:5px;margin:6px 0}
.chip{font-family:ui-monospace,Menlo,monospace;font-size:12px;padding:2px 7px;border-radius:10px;
  background:#ddf4ff;border:1px solid #54aeff}
.chip.kv{background:#fbefff;border-color:#c297ff}
.chip.neuron{background:#dafbe1;border-color:#4ac26b}
.chip.linear{background:#fff1e5;border-color:#fb8f44}
.fig{max-width:100%;height:auto;border:1px solid #eee;margin:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.note{color:#57606a;font-size:12px;margin:4px 0}
.metric{font-size:20px;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;min-width:140px}
.card .label{color:#57606a;font-size:12px}
code{font-family:ui-monospace,Menlo,monospace;font-size:12px;background:#f6f8fa;padding:1px 4px;
  border-radius:4px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def _ci(v: float | None, ci: Any) -> str:
    if v is None:
        return "undefined"
    s = _fmt(v, 3)
    return s + (f" [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if ci else "")


def _kv(items: Sequence[tuple[str, Any]]) -> str:
    return '<div class="kv">' + "".join(
        f"<div>{_e(k)}</div><div>{_e(_fmt(v))}</div>" for k, v in items
    ) + "</div>"


def _png(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _chips(units: Sequence[str]) -> str:
    out = []
    for s in units:
        kind = parse_units(s)[0].kind
        cls = {"head": "", "kv_head": "kv", "neuron": "neuron", "linear": "linear"}[kind]
        out.append(f'<span class="chip {cls}">{_e(s)}</span>')
    return '<div class="chips">' + "".join(out) + "</div>"


def _scores_items(scores: object, pair: ModelPair | None = None) -> list[tuple[str, Scores]]:
    """Scores to draw: unit scores as given, a weight-level method's per-unit view (needs
    ``pair``), nothing for ``dense`` (every weight scores the same)."""
    if scores is None:
        return []
    if isinstance(scores, Mapping):
        out = []
        for k, v in scores.items():
            if getattr(v, "grain", None) == GRAIN_DENSE:
                continue
            if getattr(v, "grain", None) == WEIGHT and pair is not None:
                v = v.unit_view(pair.layout, ("head", "neuron"))
            if hasattr(v, "as_grid"):
                out.append((str(k), v))
        return out
    if hasattr(scores, "as_grid"):
        return [(str(getattr(scores, "method", "scores")), cast("Scores", scores))]
    if isinstance(scores, (list, tuple)):
        return [(str(getattr(s, "method", f"scores{i}")), s) for i, s in enumerate(scores)
                if hasattr(s, "as_grid")]
    return []


def _task_parts(given: TaskLike | None) -> tuple[Task | None, Task | None]:
    """(dev, test) Tasks from a Task, Splits-like object or (dev, test) tuple; (task, None)."""
    task: Any = given  # duck-typed, as in sweeps._splits
    if task is None:
        return None, None
    if hasattr(task, "dev") and hasattr(task, "test"):
        return task.dev, task.test
    if isinstance(task, (tuple, list)) and len(task) == 2:
        return task[0], task[1]
    return task, None


def _pick(best_units: Sequence[Unit], scored: list[tuple[str, Scores]], cls: type, n: int
          ) -> list[Unit]:
    """Units of one class: those in the choice first (by score if known), then top-scored."""
    chosen = [u for u in best_units if isinstance(u, cls)]
    kind = "head" if cls is Head else "neuron"
    ranking: list[Unit] = []
    for _, s in scored:
        if kind in getattr(s, "kinds", ()):
            ranking = list(s.top(max(n, len(chosen)) + n, kinds=kind))
            break
    pos = {u: i for i, u in enumerate(ranking)}
    chosen.sort(key=lambda u: pos.get(u, len(pos)))
    out = list(dict.fromkeys(chosen + ranking))
    return out[:n]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.3g}%"


def _comparison_records(res: SweepResult) -> list[dict[str, Any]]:
    """One record per comparison cell, % of parameters first, % of units second."""
    recs = []
    for c in res.comparison:
        d = c.record()
        method = d.method + (" (extrapolating control)" if d.extrapolates else "")
        rec: dict[str, Any] = {
            "method": method, "size": d.size, "% params": _pct(d.pct_params),
            "% units": _pct(d.pct_units), "alpha (dev)": d.alpha,
            "test recovery [CI]": _ci(d.test_recovery, d.test_recovery_ci),
            "test recovery per % params": d.recovery_per_pct_params,
            f"test {res.metric}": d.test_metric, "test retention drop": d.retention_drop,
            "dev recovery": d.dev_recovery,
            "feasible on dev": d.feasible,
        }
        for ctrl, v in d.vs.items():
            rec[f"minus {ctrl} [CI]"] = _ci(v.diff, v.ci)
        recs.append(rec)
    return recs


def mask_unit_scores(mask: WeightMask, layout: ModelLayout,
                     kinds: Sequence[str] = ("head", "neuron")) -> Scores:
    """A weight mask's unit view as Scores: weights moved per head / neuron
    (:meth:`~tl_transplant.edit.weights.WeightMask.by_unit`; 0 where none), for heatmaps."""
    from tl_transplant.scoring.scores import Scores

    counts = mask.by_unit(layout, kinds)
    units = layout.units(tuple(kinds))
    return Scores(units, [float(counts.get(u, 0)) for u in units], method="weights moved",
                  meta={"grain": "mask_view", "n_params": mask.n_params})


def _control_records(res: SweepResult) -> list[dict[str, Any]]:
    recs = []
    for name, d in res.control_records().items():
        recs.append({
            "control": name, "grain": d.grain, "% params": _pct(d.pct_params),
            "weights": d.n_params, "chosen weights": d.chosen_n_params,
            "chosen % params": _pct(d.chosen_pct_params),
            "alpha": d.alpha, "effective alpha": d.effective_alpha,
            f"test {res.metric}": d.test, "test recovery [CI]": _ci(d.recovery, d.recovery_ci),
            "test retention drop": d.retention_drop,
            "chosen − control [CI]": _ci(d.best_minus_control, d.best_minus_control_ci),
            "note": ("extrapolating control; " if d.extrapolates else "") + d.note,
        })
    return recs


def verdict_html(res: SweepResult) -> str:
    """What was searched, how much to trust the choice, and the parameter-matched controls."""
    import pandas as pd

    body = ""
    if res.searched is not None and res.searched.text:
        body += f"<p><b>Searched:</b> {_e(res.searched.text)}</p>"
    t = res.trust
    if t is not None:
        body += f"<p><b>Selection:</b> {_e(t.text())}</p>"
        if t.warning:
            body += f'<p class="note" style="color:#9a6700"><b>Warning:</b> {_e(t.warning)}</p>'
    recs = _control_records(res)
    if recs:
        body += ('<p class="note">each control is filled to the chosen configuration\'s '
                 "parameter count (unit controls by the budget fill rule, at most one unit "
                 "below; weight controls exactly) at its alpha; dense is compared at the same "
                 "dev retention cost; differences are paired over the test examples.</p>"
                 + frame_to_html(pd.DataFrame(recs), 4))
    elif res.best is not None:
        body += '<div class="note">no controls were given</div>'
    return body or '<div class="note">nothing was chosen</div>'


def comparison_html(res: SweepResult) -> str:
    """The comparison table as HTML (empty string without one)."""
    import pandas as pd

    recs = _comparison_records(res)
    if not recs:
        return ""
    return (f'<p class="note">{_e(COMPARISON_NOTE)}: for every method and size the alpha '
            "is the best on dev; differences are paired over the test examples.</p>"
            + frame_to_html(pd.DataFrame(recs), 4))


def comparison_markdown(res: SweepResult) -> str:
    """The comparison table as a markdown table, with its reading note (empty without one)."""
    recs = _comparison_records(res)
    if not recs:
        return ""
    cols = list(dict.fromkeys(k for r in recs for k in r))
    lines = [f"_{COMPARISON_NOTE}_", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_report(
    out: str | Path,
    *,
    sweep_result: SweepResult,
    pair: ModelPair | None = None,
    task: TaskLike | None = None,
    scores: ScoresArg = None,
    n_heads: int = 4,
    n_neurons: int = 4,
    n_prompts: int = 2,
    prompt: str | None = None,
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
    results: Results | None = None,
) -> Path:
    """Write one self-contained ``report.html``; returns its path.

    ``out``: a directory (the file is ``out/report.html``) or a path ending in
    ``.html``. ``sweep_result``: a :class:`~tl_transplant.sweeps.protocol.SweepResult`.
    ``pair`` (the ModelPair the sweep ran on, target restored) enables the
    attention and neuron comparisons, which show the chosen transplant
    (``best.units`` at ``best.alpha``) on ``prompt`` (default: the first test
    prompt of ``task``) and the first ``n_prompts`` prompts. ``scores``: a
    Scores object, a list, or ``{name: Scores}``; gives heatmaps and ranks the
    units shown (``n_heads``, ``n_neurons``). ``results``: a run's typed results
    (:meth:`SweepResult.results <tl_transplant.sweeps.result.SweepResult.results>`), shown
    as the run summary (:func:`~tl_transplant.report.text.format_table`). ``extra``: more
    sections, title -> matplotlib Figure, CircuitsVisView, pandas DataFrame or text.
    """
    res = sweep_result
    p = Path(out)
    path = p if p.suffix.lower() in (".html", ".htm") else p / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    best = res.best
    best_units = parse_units(best.units) if best is not None else []
    best_mask = best.mask if best is not None else None
    scored = _scores_items(scores, pair)
    moved = (mask_unit_scores(best_mask, pair.layout)
             if best_mask is not None and pair is not None else None)
    if moved is not None:  # a weight-level winner: show the units its weights sit in
        best_units = [u for u in moved.top(8, kinds="head") + moved.top(8, kinds="neuron")
                      if moved[u] > 0]
    dev_task, test_task = _task_parts(task)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    views = 0

    # -- pair and task ----------------------------------------------------------------------
    pinfo = []
    for role in ("source", "target"):
        ident = dict(res.pair.get(role, {}) or {})
        if pair is not None:
            ident = dict(getattr(pair, role).identity)
        pinfo.append((role, ident))
    body = '<div class="cards">'
    for role, ident in pinfo:
        items = [(k, ident.get(k)) for k in ("name", "model_type", "family", "dtype", "n_params")
                 if ident.get(k) is not None]
        body += f'<div class="card"><div class="label">{_e(role)}</div>{_kv(items)}</div>'
    body += "</div>"
    if pair is not None:
        d = pair.layout.dims
        body += "<h3>Architecture</h3>" + _kv([
            ("layers", d.n_layers), ("query heads", d.H), ("KV heads", d.KV), ("d_head", d.dh),
            ("d_model", d.D), ("d_mlp", d.I),
        ])
    cfg = res.config
    body += "<h3>Task</h3>" + _kv([
        ("task", res.task.get("name")), ("metric", res.metric),
        ("prepend_bos", cfg.get("prepend_bos")), ("dev examples", cfg.get("n_dev")),
        ("test examples", cfg.get("n_test")), ("split", cfg.get("split")),
        ("control tasks", ", ".join(c["name"] for c in cfg.get("control_tasks", [])) or "none"),
        ("retention signal", (cfg.get("retention") or {}).get("description", "–")),
        ("max retention drop", cfg.get("max_retention_drop")), ("kv", cfg.get("kv")),
    ])
    examples = test_task if test_task is not None and len(test_task) else dev_task
    if examples is not None and len(examples):
        import pandas as pd

        k = min(5, len(examples))
        body += "<h3>Examples</h3>" + frame_to_html(pd.DataFrame(
            {"prompt": examples.prompts[:k], "answer": examples.answers[:k]}
        ))
    sections.append(("pair", "Pair and task", body))

    # -- baselines --------------------------------------------------------------------------
    rows = []
    for split, base in res.baselines.items():
        for role, r in base.items():
            rows.append({"split": split, "model": role, res.metric: r.mean, "n": r.n})
    if best is not None and best.test is not None:
        rows.append({"split": "test", "model": "transplanted (chosen)",
                     res.metric: best.test.transplanted.mean, "n": best.test.transplanted.n})
    for split, base in res.control_baselines.items():
        for name, r in base.items():
            rows.append({"split": split, "model": f"target on control {name}",
                         res.metric: r.mean, "n": r.n})
    import pandas as pd

    sections.append(("baselines", "Baselines", frame_to_html(pd.DataFrame(rows), 4)))

    # -- choice -----------------------------------------------------------------------------
    if best is None:
        body = "<p>No configuration met the retention constraint; nothing was run on test.</p>"
    else:
        body = '<div class="cards">' + "".join(
            f'<div class="card"><div class="label">{_e(k)}</div><div class="metric">'
            f"{_e(v)}</div></div>"
            for k, v in (("method", best.method), ("% of block params", _pct(best.pct_params)),
                         ("% of units", _pct(best.pct_units)), ("size", best.size),
                         ("K", best.k) if best_mask is None else ("weights", best.n_params),
                         ("alpha", f"{best.alpha:g}" + (
                             f" (×{best.alpha_scale:.3g})" if best.alpha_scale != 1 else "")),
                         (f"dev {res.metric}", _fmt(best.metric)),
                         ("max dev control drop", _fmt(best.max_drop, 3)))
        ) + "</div>"
        if best_mask is not None:
            info = mask_summary(best_mask)
            body += "<h3>Weight mask</h3>" + _kv([
                ("weights moved", info["n_params"]), ("tensors", info["n_tensors"]),
                ("sha256", info["sha256"][:16] + "…"),
                ("effective alpha", f"{best.effective_alpha:g}"),
            ])
            if moved is not None:
                figs = [_png(score_heatmap(moved, kind, title=f"weights moved per {kind}"),
                             f"mask per {kind}") for kind in ("head", "neuron")]
                body += ('<div class="note">the chosen weight mask, counted per head and per '
                         "neuron (weights of the unit's slices that move)</div>"
                         '<div class="figs">' + "".join(figs) + "</div>")
        else:
            body += f"<h3>Units ({len(best.units)})</h3>" + _chips(best.units)
        if best.test is not None:
            m = best.test.metrics
            body += "<h3>On the test split (paired bootstrap CIs)</h3>" + _kv([
                ("source", m.source), ("target", m.target), ("transplanted", m.transplanted),
                ("delta", _ci(m.delta, m.ci.get("delta"))), ("TIR", _ci(m.tir, m.ci.get("tir"))),
                ("recovery", _ci(m.recovery, m.ci.get("recovery"))),
            ])
            if m.notes:
                body += "".join(f'<div class="note">{_e(n)}</div>' for n in m.notes)
        if len(res.best_by_method) > 1:
            recs = []
            for meth, row in res.best_by_method.items():
                tm = row.test.metrics if row.test is not None else None
                recs.append({"method": meth + (" (extrapolating)" if row.extrapolates else ""),
                             "% params": _pct(row.pct_params),
                             "% units": _pct(row.pct_units), "size": row.size, "k": row.k,
                             "alpha": row.alpha, "dev": row.metric,
                             "test": None if tm is None else tm.transplanted,
                             "test recovery": None if tm is None else tm.recovery})
            body += "<h3>Best per method</h3>" + frame_to_html(pd.DataFrame(recs), 4)
    sections.append(("choice", "Chosen units", body))
    sections.append(("verdict", "Verdict: parameter-matched controls and selection",
                     verdict_html(res)))

    # -- sweep ------------------------------------------------------------------------------
    body = _png(sweep_plot(res), "sweep plot")
    df = res.to_frame()
    df = df.drop(columns=[c for c in ("units",) if c in df.columns])
    chosen = [j for j, r in enumerate(res.rows) if r is best]
    table = frame_to_html(df.head(300), 4, highlight=chosen)
    body += f"<h3>All configurations on dev ({len(res.rows)})</h3>" + table
    if len(res.rows) > 300:
        body += f'<div class="note">first 300 of {len(res.rows)} rows shown</div>'
    sections.append(("sweep", "Sweep (K × alpha on dev)", body))

    # -- comparison -------------------------------------------------------------------------
    if res.comparison:
        sections.append(("comparison", "Comparison: method × budget",
                         comparison_html(res)))

    # -- heatmaps ---------------------------------------------------------------------------
    if scored:
        figs = []
        for name, s in scored:
            for kind in getattr(s, "kinds", ("head",)):
                try:
                    fig = score_heatmap(s, kind, highlight=best_units, title=f"{name}: {kind}")
                except (ValueError, TypeError) as e:  # pragma: no cover - defensive
                    figs.append(f'<div class="note">{_e(name)} {kind}: {_e(e)}</div>')
                    continue
                figs.append(_png(fig, f"{name} {kind} heatmap"))
        body = '<div class="figs">' + "".join(figs) + "</div>"
        which = ("the 8 heads and 8 neurons with the most weights in the chosen mask"
                 if best_mask is not None else "units in the chosen configuration")
        body += f'<div class="note">gold boxes: {which}; grey: not scored'
        body += "</div>"
    else:
        body = '<div class="note">no scores were given (pass scores=...)</div>'
    sections.append(("heatmaps", "Score heatmaps", body))

    # -- CircuitsVis comparisons ------------------------------------------------------------
    prompts: list[str] = []
    if prompt is not None:
        prompts.append(prompt)
    for t in (test_task, dev_task):
        if t is not None:
            prompts += [q for q in t.prompts[: n_prompts + 1] if q not in prompts]
    prompts = prompts[: max(1, n_prompts)]
    edit: Any = best_units if best_units and best is not None and best.alpha != 0 else False
    alpha = best.effective_alpha if best is not None else 1.0
    if best_mask is not None and pair is not None and best is not None and best.alpha != 0:
        from tl_transplant.edit.edits import transplant

        edit = transplant(pair, best_mask, alpha, allow_extrapolation=best.extrapolates)
    kv = cfg.get("kv", "group")
    bos = cfg.get("prepend_bos", "auto")
    att_body = neu_body = ""
    if pair is None or not prompts:
        why = "pass pair=..." if pair is None else "pass task=... or prompt=..."
        att_body = neu_body = f'<div class="note">needs the models and a prompt ({why})</div>'
    else:
        heads = _pick(best_units, scored, Head, n_heads)
        neurons = _pick(best_units, scored, Neuron, n_neurons)
        what = (f"{best_mask.n_params} single weights" if best_mask is not None
                else f"{len(best_units)} units")
        caption = (
            f"transplanted = the chosen configuration ({what}, α={alpha:g})"
            if edit is not False else "no transplant was chosen: source and target only"
        )
        if heads:
            v = attention_compare(pair, prompts[0], heads, edit, alpha=alpha, kv=kv,
                                  prepend_bos=bos)
            att_body = f'<div class="note">{_e(caption)}</div>' + v.to_html(include_bundle=False)
            views += len(v.panels)
        else:
            att_body = '<div class="note">no heads were chosen or scored</div>'
        if neurons:
            v = neuron_compare(pair, prompts, neurons, edit, alpha=alpha, kv=kv,
                               prepend_bos=bos)
            neu_body = f'<div class="note">{_e(caption)}</div>' + v.to_html(include_bundle=False)
            views += len(v.panels)
        else:
            neu_body = '<div class="note">no neurons were chosen or scored</div>'
    sections.append(("attention", "Attention: source, target, transplanted", att_body))
    sections.append(("neurons", "Neurons: source, target, transplanted", neu_body))

    # -- retention --------------------------------------------------------------------------
    if best is not None and best.test is not None and best.test.retention:
        recs = [{"control task": r.task, "metric": r.metric, "n": r.n, "before": r.before,
                 "after": r.after, "drop": r.drop,
                 "drop 95% CI": None if r.ci_drop is None else
                 f"[{_fmt(r.ci_drop[0], 3)}, {_fmt(r.ci_drop[1], 3)}]",
                 "after / before": r.relative} for r in best.test.retention]
        body = "<h3>Test split, chosen configuration</h3>" + frame_to_html(pd.DataFrame(recs), 4)
        dev_recs = [{"control task": n, **c} for n, c in best.control.items()]
        body += "<h3>Dev split, chosen configuration</h3>" + frame_to_html(
            pd.DataFrame(dev_recs), 4
        )
    elif not cfg.get("control_tasks"):
        body = '<div class="note">no control tasks were given to the sweep</div>'
    else:
        body = '<div class="note">nothing was run on test</div>'
    ret = cfg.get("retention") or {}
    if ret.get("mode") == "generic":
        body = f'<p class="note">control task: {_e(ret.get("description"))}</p>' + body
    sections.append(("retention", "Retention", body))

    # -- run summary, extra and notes ----------------------------------------------------------
    more: dict[str, Any] = {} if results is None else {"Run summary": format_table(results, res)}
    more.update(extra or {})
    for name, obj in more.items():
        if isinstance(obj, CircuitsVisView):
            body = obj.to_html(include_bundle=False)
            views += len(obj.panels)
        elif hasattr(obj, "savefig"):
            body = _png(obj, name)
        elif hasattr(obj, "to_html") and hasattr(obj, "columns"):
            body = frame_to_html(obj, 4)
        else:
            body = f"<pre>{_e(obj)}</pre>"
        sections.append((f"extra-{len(sections)}", str(name), body))
    if res.notes:
        sections.append(("notes", "Notes", "".join(f"<p>{_e(n)}</p>" for n in res.notes)))

    # -- page -------------------------------------------------------------------------------
    from tl_transplant import __version__

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = title or f"Transplant report: {res.task.get('name')}"
    src = pinfo[0][1].get("name", "source")
    tgt = pinfo[1][1].get("name", "target")
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    page = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(heading)}</title><style>{_CSS}</style>",
        f"<script>{circuitsvis_bundle()}</script>" if views else "",
        "</head><body>",
        f"<header><h1>{_e(heading)}</h1><div class='sub'>source <b>{_e(src)}</b> → target "
        f"<b>{_e(tgt)}</b> · generated {now} by tl_transplant {__version__}</div></header>",
        f"<nav>{nav}</nav><main>",
    ]
    for anchor, heading_text, b in sections:
        page.append(f'<section id="{anchor}"><h2>{_e(heading_text)}</h2>{b}</section>')
    page.append(
        f'<script type="application/json" id="tlt-results">{js_literal(res.to_dict(), 8)}</script>'
    )
    page.append("</main></body></html>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_text("".join(page), encoding="utf-8")
    return path


def save_sweep(result: SweepResult, directory: str | Path, *, overwrite: bool = False,
               **report_kwargs: Any) -> Path:
    """Save a sweep's files (:meth:`SweepResult.save
    <tl_transplant.sweeps.result.SweepResult.save>`: ``results.json``, ``sweep.csv``,
    ``sweep.png``, ``comparison.csv``) and its ``report.html`` under ``directory``; keyword
    arguments (``pair=``, ``task=``, ``scores=``, ...) go to :func:`write_report`. Returns
    the directory. (``SweepResult.save(dir, report=True, ...)`` of 0.1.) A directory with
    an earlier run's files needs ``overwrite=True`` (see :meth:`SweepResult.save`).
    """
    d = result.save(directory, overwrite=overwrite)
    write_report(d / "report.html", sweep_result=result, **report_kwargs)
    return d


__all__ = ["comparison_html", "comparison_markdown", "mask_unit_scores", "save_sweep",
           "verdict_html", "write_report"]
