"""Figures and CircuitsVis views: where the task lives and what transplanted units do.

* :func:`score_heatmap`: scores per layer x head (or layer x top neurons), matplotlib;
* :func:`attention_compare`: CircuitsVis attention patterns of source, target and
  transplanted target, side by side;
* :func:`neuron_compare`: CircuitsVis token colourings (or the interactive
  ``TextNeuronActivations``) of chosen neurons in the three models;
* :func:`sweep_plot`: dev metric vs K per alpha, plus the retention trade-off.

CircuitsVis views are :class:`CircuitsVisView` objects. They display in a
notebook, and ``view.save("x.html")`` writes a standalone page. Both are
**self-contained**: the CircuitsVis JavaScript bundle that ships inside the
installed ``circuitsvis`` package (``circuitsvis/dist/cdn/iife.js``) is inlined,
which is what CircuitsVis' own ``RenderedHTML.local_src`` does. (``str()`` of a
CircuitsVis render, and its ``_repr_html_`` when online, import the bundle from
unpkg.com instead, so we never use those for files.) Unlike ``local_src``, a
view inlines the bundle once for all its panels, closes every container
``<div>`` properly (``local_src`` writes ``<div .../>``, which nests the next
visualisation inside it on a shared page) and escapes ``<`` in the data.

Figures use matplotlib's object API with the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast, overload

import torch
from jaxtyping import Float

from tl_transplant.arch.units import Head, Linear, Neuron, Unit, parse_units
from tl_transplant.errors import TLTransplantError
from tl_transplant.models.hooks import capture
from tl_transplant.tasks.tokens import encode, resolve_prepend_bos

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure
    from transformers import PreTrainedTokenizerBase

    from tl_transplant.edit.edits import KVMode
    from tl_transplant.evaluation.evaluator import UnitsLike
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.models.side import ModelSide
    from tl_transplant.scoring.scores import Scores
    from tl_transplant.sweeps.protocol import SweepResult

#: ``transplant=`` of the views: None/True (the units shown), False (no third model),
#: units to transplant, or a ready context manager (``transplant(...)``, ``patch_activations``).
EditArg: TypeAlias = "bool | None | UnitsLike | contextlib.AbstractContextManager[object]"
_Fig = TypeVar("_Fig", bound="Figure | SubFigure")

SIDES = ("source", "target", "transplanted")
SEPARATOR = "  |  "  # between prompts in one ColoredTokens panel (value 0)


# ---- CircuitsVis, self-contained ----------------------------------------------------------


def circuitsvis_bundle_path() -> Path:
    """The JavaScript bundle shipped in the installed ``circuitsvis`` package."""
    import circuitsvis

    return Path(circuitsvis.__file__).resolve().parent / "dist" / "cdn" / "iife.js"


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The CircuitsVis bundle, safe to inline in a classic ``<script>`` (defines ``CircuitsVis``).

    ``</script`` inside it is written ``<\\/script`` (same JavaScript, cannot close
    the tag) and the trailing ``sourceMappingURL`` comment is dropped (it names a
    file that is not shipped alongside a report).
    """
    path = circuitsvis_bundle_path()
    if not path.is_file():  # pragma: no cover - a broken circuitsvis install
        raise FileNotFoundError(
            f"the circuitsvis package has no bundled JavaScript at {path}; reinstall circuitsvis"
        )
    js = path.read_text(encoding="utf-8")
    lines = [ln for ln in js.splitlines() if not ln.startswith("//# sourceMappingURL=")]
    return "\n".join(lines).replace("</script", "<\\/script")


def _plain(x: Any, digits: int) -> Any:
    """Tensors/arrays -> nested lists (rounded floats); drops None values of dicts."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = torch.round(x.double() * 10**digits) / 10**digits
        return x.tolist()
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy
        return _plain(torch.as_tensor(x), digits)
    if isinstance(x, dict):
        return {k: _plain(v, digits) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v, digits) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def js_literal(obj: Any, digits: int = 4) -> str:
    """JSON for inlining inside ``<script>``: ``<``, ``>`` and ``&`` escaped, ASCII only."""
    s = json.dumps(_plain(obj, digits), ensure_ascii=True, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class ReportError(TLTransplantError, ValueError):
    """A view that cannot be drawn as asked (no units, wrong unit kind, no prompt)."""


@dataclass
class CVPanel:
    """One CircuitsVis component: its React name (e.g. ``"AttentionHeads"``) and props."""

    component: str
    props: dict[str, Any]
    title: str = ""
    uid: str = field(default_factory=lambda: "tlt-cv-" + uuid.uuid4().hex[:12])

    def rendered(self) -> Any:
        """The same visualisation as CircuitsVis' own ``RenderedHTML`` (``.local_src`` inlines)."""
        from circuitsvis.utils.render import render

        return render(self.component, **self.props)


_VIEW_CSS = """
.tlt-view{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;color:#222}
.tlt-view h4{margin:6px 0 4px 0;font-size:14px}
.tlt-row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin:4px 0 10px 0}
.tlt-cell{flex:1 1 280px;min-width:260px;max-width:560px;border:1px solid #ddd;
  border-radius:6px;padding:6px 8px;background:#fff;overflow-x:auto}
.tlt-cell-title{font-weight:600;margin-bottom:2px}
.tlt-caption{color:#555;margin:6px 0 2px 0}
.tlt-view table.tlt-table{border-collapse:collapse;margin:6px 0;font-size:12px}
.tlt-view table.tlt-table th,.tlt-view table.tlt-table td{border:1px solid #ddd;padding:2px 6px;
  text-align:left}
.tlt-view table.tlt-table td.num{text-align:right}
.tlt-view table.tlt-table th{background:#f3f3f3}
"""

_RENDER_JS = """(function(){var items=%s;var CV=window.CircuitsVis;
items.forEach(function(it){var el=document.getElementById(it[0]);if(!el)return;
if(!CV||!CV[it[1]]){el.setAttribute('data-cv-status','error');
el.textContent='CircuitsVis bundle missing: cannot render '+it[1];return;}
try{CV.render(it[0],CV[it[1]],it[2]);el.setAttribute('data-cv-status','rendered');}
catch(e){el.setAttribute('data-cv-status','error');el.textContent='CircuitsVis error: '+e;}});
})();"""


def _cell(v: Any, digits: int) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "yes" if v else "no"
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        v = float(v)
        return "–" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


_NUM = ' class="num"'


def _numeric(v: Any) -> bool:
    return not isinstance(v, (str, bool)) and type(v).__name__ != "bool_" and (
        isinstance(v, (int, float)) or type(v).__name__.startswith(("int", "float"))
    )


def frame_to_html(df: pd.DataFrame, digits: int = 3, highlight: Iterable[int] = ()) -> str:
    """A small pandas DataFrame as an escaped HTML table (no index); ``highlight``: row numbers."""
    if df is None or len(df) == 0:
        return ""
    marked = set(highlight)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, rec in enumerate(df.itertuples(index=False, name=None)):
        cls = ' class="best"' if i in marked else ""
        cells = "".join(
            f"<td{_NUM if _numeric(v) else ''}>{html.escape(_cell(v, digits))}</td>" for v in rec
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<table class="tlt-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


@dataclass
class CircuitsVisView:
    """Rows of CircuitsVis panels shown side by side, with their data and a summary table.

    ``data`` holds the numbers behind the panels (tokens, patterns/activations per
    model) for further analysis; ``summary`` a pandas DataFrame (or None).
    """

    title: str
    rows: list[tuple[str, list[CVPanel]]]
    data: dict[str, Any] = field(default_factory=dict)
    summary: Any = None
    note: str = ""

    @property
    def panels(self) -> list[CVPanel]:
        return [p for _, row in self.rows for p in row]

    def circuitsvis(self) -> list[Any]:
        """Each panel as CircuitsVis' own ``RenderedHTML``."""
        return [p.rendered() for p in self.panels]

    def to_html(self, *, include_bundle: bool = True, heading: bool = True) -> str:
        """An HTML fragment; ``include_bundle=False`` when the page already inlines the bundle."""
        parts = [f'<div class="tlt-view"><style>{_VIEW_CSS}</style>']
        if heading and self.title:
            parts.append(f"<h4>{html.escape(self.title)}</h4>")
        if self.note:
            parts.append(f'<div class="tlt-caption">{html.escape(self.note)}</div>')
        for caption, row in self.rows:
            if caption:
                parts.append(f'<div class="tlt-caption">{html.escape(caption)}</div>')
            parts.append('<div class="tlt-row">')
            for p in row:
                parts.append(
                    f'<div class="tlt-cell"><div class="tlt-cell-title">{html.escape(p.title)}'
                    f'</div><div class="tlt-cv" id="{p.uid}" data-cv-component="{p.component}">'
                    "</div></div>"
                )
            parts.append("</div>")
        if self.summary is not None:
            parts.append(frame_to_html(self.summary))
        if include_bundle:
            parts.append(f"<script>{circuitsvis_bundle()}</script>")
        items = ",".join(
            f"[{json.dumps(p.uid)},{json.dumps(p.component)},{js_literal(p.props)}]"
            for p in self.panels
        )
        parts.append(f"<script>{_RENDER_JS % ('[' + items + ']')}</script></div>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html(include_bundle=True)

    def save(self, path: str | Path) -> Path:
        """Write a standalone, self-contained HTML page."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        body = self.to_html(include_bundle=False)
        p.write_text(
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            f"<script>{circuitsvis_bundle()}</script></head><body>{body}</body></html>",
            encoding="utf-8",
        )
        return p

    def __repr__(self) -> str:
        return f"CircuitsVisView({self.title!r}, panels={len(self.panels)})"


# ---- shared helpers ------------------------------------------------------------------------


def str_tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each token as text; word-level tokenizers (decode joins with spaces) get a leading space."""
    ids = [int(i) for i in ids]
    pieces = [str(tokenizer.decode([i])) for i in ids]
    if len(pieces) > 1:
        full = tokenizer.decode(ids)
        if full != "".join(pieces) and full == " ".join(pieces):
            pieces = [pieces[0]] + [" " + p for p in pieces[1:]]
    return pieces


def short_name(name: str) -> str:
    """A model's display name: the last path component of a local directory."""
    text = str(name).rstrip("/")
    return Path(text).name if text.startswith(("/", ".", "~")) else text


def _side_titles(pair: ModelPair, label: str) -> dict[str, str]:
    return {
        "source": f"source · {short_name(pair.source.name)}",
        "target": f"target · {short_name(pair.target.name)}",
        "transplanted": label,
    }


def _as_units(units: object, what: str) -> list[Unit]:
    if hasattr(units, "top") and not isinstance(units, (str, list, tuple)):
        raise TypeError(
            f"{what}: pass units (e.g. scores.top(4, kinds='head')), not a scores object"
        )
    return list(dict.fromkeys(parse_units(cast("UnitsLike", units))))


def _edit_context(pair: ModelPair, transplant: EditArg, default_units: list[Unit], alpha: float,
                  kv: KVMode) -> tuple[contextlib.AbstractContextManager[object], str]:
    """The context that makes the 'transplanted' model, and a label for it."""
    from tl_transplant.edit.edits import transplant as weight_transplant
    from tl_transplant.edit.patching import patch_activations

    if transplant is None or transplant is True:
        units = default_units
    elif hasattr(transplant, "__enter__"):
        patched = isinstance(transplant, patch_activations)
        label = "activation-patched" if patched else "transplanted"
        a = getattr(transplant, "alpha", None)
        cm = cast(contextlib.AbstractContextManager[object], transplant)
        return cm, label + (f" (α={a:g})" if isinstance(a, float) else "")
    else:
        units = _as_units(transplant, "transplant")
    if not units:
        raise ReportError("nothing to transplant: give units or a context manager as transplant=")
    n = len(units)
    return (
        weight_transplant(pair, units, alpha, kv=kv),
        f"transplanted (α={alpha:g}, {n} unit{'s' if n != 1 else ''})",
    )


def _capture(side: ModelSide, ids: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """One forward of the side's bridge, recording the given hook points (float32, CPU)."""
    return capture(side, ids, names, transform=lambda t: t.float().cpu())


def _three_runs(pair: ModelPair, ids: torch.Tensor, names: list[str],
                edit: contextlib.AbstractContextManager[object] | None
                ) -> dict[str, dict[str, torch.Tensor]]:
    runs = {
        "source": _capture(pair.source, ids, names),
        "target": _capture(pair.target, ids, names),
    }
    if edit is not None:
        with edit:
            runs["transplanted"] = _capture(pair.target, ids, names)
    return runs


# ---- attention ---------------------------------------------------------------------------


def attention_compare(
    pair: ModelPair,
    prompt: str,
    heads: Iterable[Unit | str] | str,
    transplant: EditArg = None,
    *,
    alpha: float = 1.0,
    kv: KVMode = "group",
    prepend_bos: bool | str = "auto",
) -> CircuitsVisView:
    """Attention patterns of ``heads`` on ``prompt`` in source, target and transplanted target.

    ``transplant``: None (default) transplants ``heads`` themselves with ``alpha``
    (and their KV groups, ``kv="group"``); a list of units transplants those (e.g.
    the sweep's chosen units); a context manager (``transplant(...)``,
    ``patch_activations(...)``) is used as is; ``False`` shows source and target
    only. With ``patch_activations`` the patterns shown are the ones the target
    computes (a head patched at ``hook_z`` keeps its own pattern; its output is the
    source's). The summary gives, per head, the mean total-variation distance of
    each model's attention rows to the source's.
    """
    asked = _as_units(heads, "heads")
    bad = [u for u in asked if not isinstance(u, Head)]
    if bad or not asked:
        raise ReportError(
            f"attention_compare takes query heads such as 'L1.H2'; got {bad[0] if bad else 'none'}"
        )
    head_list = [cast(Head, pair.validate(u)) for u in asked]
    tok = pair.target.tokenizer
    bos = resolve_prepend_bos(pair, prepend_bos)
    enc = encode(tok, [prompt], None, prepend_bos=bos)
    ids = enc.input_ids
    tokens = str_tokens(tok, ids[0].tolist())
    layers = sorted({h.layer for h in head_list})
    names = [pair.layout.hook("pattern", layer) for layer in layers]
    edit, label = (None, "") if transplant is False else _edit_context(
        pair, transplant, list(head_list), alpha, kv
    )
    runs = _three_runs(pair, ids, names, edit)
    patterns: dict[str, Float[torch.Tensor, "head q k"]] = {}
    for side, cache in runs.items():
        patterns[side] = torch.stack(
            [cache[pair.layout.hook("pattern", h.layer)][0, h.head] for h in head_list]
        )
    head_names = [str(h) for h in head_list]
    titles = _side_titles(pair, label)
    panels = [
        CVPanel(
            "AttentionHeads",
            {
                "attention": patterns[side],
                "tokens": tokens,
                "attentionHeadNames": head_names,
                "maxValue": 1.0,
                "minValue": 0.0,
                "maskUpperTri": True,
            },
            title=titles[side],
        )
        for side in runs
    ]
    import pandas as pd

    def tv(side: str) -> list[float]:
        d = 0.5 * (patterns[side] - patterns["source"]).abs().sum(-1)  # [head, q]
        return d.mean(-1).tolist()

    summary = pd.DataFrame({"head": head_names, "tv_target_vs_source": tv("target")})
    if "transplanted" in patterns:
        summary["tv_transplanted_vs_source"] = tv("transplanted")
    return CircuitsVisView(
        title=f"Attention patterns on {prompt!r}",
        rows=[("", panels)],
        data={"tokens": tokens, "heads": head_names, "patterns": patterns, "prompt": prompt},
        summary=summary,
        note="rows: query (destination) tokens, columns: key (source) tokens; "
        "tv_*: mean total-variation distance of attention rows to the source's",
    )


# ---- neurons -----------------------------------------------------------------------------


def neuron_compare(
    pair: ModelPair,
    prompts: str | Sequence[str],
    neurons: Iterable[Unit | str] | str,
    transplant: EditArg = None,
    *,
    alpha: float = 1.0,
    kv: KVMode = "group",
    prepend_bos: bool | str = "auto",
    view: str = "tokens",
) -> CircuitsVisView:
    """Activations (``mlp.hook_post``) of ``neurons`` on ``prompts`` in the three models.

    ``view="tokens"``: for each neuron and prompt, CircuitsVis ``ColoredTokens``
    for source, target and transplanted side by side, on one colour scale per
    neuron (so colours compare across models). ``view="interactive"``: one
    ``TextNeuronActivations`` per model (pick the neuron from a drop-down).
    ``transplant`` as in :func:`attention_compare` (default: the neurons
    themselves, with ``alpha``).
    """
    if view not in ("tokens", "interactive"):
        raise ReportError(f"view must be 'tokens' or 'interactive', got {view!r}")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ReportError("neuron_compare needs at least one prompt")
    asked = _as_units(neurons, "neurons")
    bad = [u for u in asked if not isinstance(u, Neuron)]
    if bad or not asked:
        raise ReportError(
            f"neuron_compare takes MLP neurons such as 'L0.N7'; got {bad[0] if bad else 'none'}"
        )
    units = [cast(Neuron, pair.validate(u)) for u in asked]
    tok = pair.target.tokenizer
    enc = encode(tok, prompt_list, None, prepend_bos=resolve_prepend_bos(pair, prepend_bos))
    lens = enc.prompt_len.tolist()
    tokens = [str_tokens(tok, enc.input_ids[i, : lens[i]].tolist()) for i in range(len(lens))]
    names = [pair.layout.hook("neuron", layer) for layer in sorted({u.layer for u in units})]
    edit, label = (None, "") if transplant is False else _edit_context(
        pair, transplant, list(units), alpha, kv
    )
    runs = _three_runs(pair, enc.input_ids, names, edit)
    acts: dict[str, list[Float[torch.Tensor, "tokens neuron"]]] = {}
    for side, cache in runs.items():
        per = torch.stack(
            [cache[pair.layout.hook("neuron", u.layer)][:, :, u.index] for u in units], dim=-1
        )  # [batch, seq, k]
        acts[side] = [per[i, : lens[i]] for i in range(len(lens))]
    labels = _side_titles(pair, label)
    unit_names = [str(u) for u in units]
    rows: list[tuple[str, list[CVPanel]]] = []
    if view == "tokens":
        for j, name in enumerate(unit_names):
            vals = [a[:, j] for side in acts for a in acts[side]]
            m = max(float(v.abs().max()) for v in vals) or 1.0
            lo = -m if any(float(v.min()) < 0 for v in vals) else 0.0
            joined_toks = [t for i, toks in enumerate(tokens) for t in
                           ([SEPARATOR] if i else []) + toks]
            cells = []
            for side in acts:
                parts = [acts[side][i][:, j] for i in range(len(tokens))]
                joined = torch.cat([torch.cat([torch.zeros(1), p]) if i else p
                                    for i, p in enumerate(parts)])
                cells.append(CVPanel("ColoredTokens", {"tokens": joined_toks, "values": joined,
                                                       "minValue": lo, "maxValue": m},
                                     title=labels[side]))
            rows.append((f"{name} · colour scale [{lo:.3g}, {m:.3g}]", cells))
    else:
        rows.append(("", [
            CVPanel(
                "TextNeuronActivations",
                {
                    "tokens": tokens,
                    "activations": [a[:, :, None] for a in acts[side]],  # [tokens, k, 1]
                    "firstDimensionName": "Neuron",
                    "secondDimensionName": "Model",
                    "firstDimensionLabels": unit_names,
                    "secondDimensionLabels": [side],
                },
                title=labels[side],
            )
            for side in acts
        ]))
    import pandas as pd

    def flat(side: str, j: int) -> torch.Tensor:
        return torch.cat([a[:, j] for a in acts[side]])

    rec: dict[str, Any] = {"neuron": unit_names}
    for side in acts:
        rec[f"mean_{side}"] = [float(flat(side, j).mean()) for j in range(len(units))]
    rec["mad_target_vs_source"] = [
        float((flat("target", j) - flat("source", j)).abs().mean()) for j in range(len(units))
    ]
    if "transplanted" in acts:
        rec["mad_transplanted_vs_source"] = [
            float((flat("transplanted", j) - flat("source", j)).abs().mean())
            for j in range(len(units))
        ]
    return CircuitsVisView(
        title=f"Neuron activations on {len(prompt_list)} prompt(s)",
        rows=rows,
        data={"tokens": tokens, "neurons": unit_names, "activations": acts,
              "prompts": prompt_list},
        summary=pd.DataFrame(rec),
        note="mlp.hook_post per token; mad_*: mean absolute difference to the source's "
        "activation over all tokens",
    )


# ---- matplotlib figures --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _notebook_figure_class() -> type:
    """``matplotlib.figure.Figure`` plus ``_repr_png_``.

    A Figure made without pyplot displays in Jupyter only as ``<Figure ...>``
    unless the inline backend has registered its formatter (which happens when
    pyplot is imported); ``_repr_png_`` makes ours display as images either way.
    """
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            return figure_png(self)

    return NotebookFigure


def notebook_figure(fig: _Fig) -> _Fig:
    """Make a matplotlib Figure display as a PNG in notebooks (adds ``_repr_png_`` only)."""
    from matplotlib.figure import Figure

    cls = _notebook_figure_class()
    if type(fig) is Figure:
        fig.__class__ = cls  # same layout; the subclass only adds a display method
    return fig


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _notebook_figure_class()(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _is_signed(scores: Scores, grid: torch.Tensor) -> bool:
    flag = getattr(scores, "signed", None)
    if flag is None:
        flag = bool(getattr(scores, "meta", {}).get("signed", False))
    finite = grid[torch.isfinite(grid)]
    return bool(flag) or (finite.numel() > 0 and bool((finite < 0).any()))


@overload
def score_heatmap(
    scores: Scores,
    kind: str = "head",
    *,
    top: int = 16,
    highlight: Iterable[Unit | str] | None = None,
    ax: None = None,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure: ...
@overload
def score_heatmap(
    scores: Scores,
    kind: str = "head",
    *,
    top: int = 16,
    highlight: Iterable[Unit | str] | None = None,
    ax: Axes,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure | SubFigure: ...


def score_heatmap(
    scores: Scores,
    kind: str = "head",
    *,
    top: int = 16,
    highlight: Iterable[Unit | str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure | SubFigure:
    """Scores as a heatmap: layers x heads (``kind="head"``), layers x KV groups,
    layers x linears, or layers x the ``top`` best neurons of each layer (``"neuron"``).

    Signed scores (``scores.signed`` or any negative value) use a diverging
    colormap centred at 0 (``RdBu_r``, symmetric limits); magnitudes use
    ``viridis``. Unscored cells are grey. ``highlight`` outlines units (e.g. the
    sweep's choice). Returns the matplotlib Figure.
    """
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    k = {"heads": "head", "neurons": "neuron", "kv": "kv_head", "linears": "linear"}.get(kind, kind)
    if k not in ("head", "kv_head", "neuron", "linear"):
        raise ReportError(f"kind must be 'head', 'kv_head', 'neuron' or 'linear', got {kind!r}")
    if not hasattr(scores, "as_grid"):
        raise TypeError(f"score_heatmap needs a Scores object (with .as_grid), got {type(scores)}")
    full = torch.as_tensor(scores.as_grid(k), dtype=torch.float64)  # [layers, n]
    n_layers = full.shape[0]
    labels: list[list[str]] | None = None
    if k == "neuron":
        width = max(1, min(int(top), full.shape[1]))
        keyed = torch.where(torch.isfinite(full), full, torch.full_like(full, -math.inf))
        order = keyed.argsort(dim=1, descending=True)[:, :width]
        grid = torch.gather(full, 1, order)
        labels = [[f"N{int(i)}" for i in row] for row in order]
        xlabels = [f"#{j + 1}" for j in range(width)]
        xname = f"top {width} neurons of each layer (by score)"
    else:
        grid, order = full, None
        if k == "linear":
            xlabels = list(getattr(scores, "meta", {}).get("linear_names", [])) or [
                str(j) for j in range(grid.shape[1])
            ]
        else:
            xlabels = [str(j) for j in range(grid.shape[1])]
        xname = {"head": "head", "kv_head": "KV group", "linear": "linear"}[k]
    finite = grid[torch.isfinite(grid)]
    signed = _is_signed(scores, full)
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r" if signed else "viridis"].with_extremes(bad="#d9d9d9")
    if finite.numel() == 0:
        norm: Any = Normalize(0, 1)
    elif signed:
        m = float(finite.abs().max()) or 1.0
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m)
    else:
        lo, hi = float(finite.min()), float(finite.max())
        norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    fig: Figure | SubFigure
    if ax is None:
        w = min(14.0, 2.5 + 0.45 * grid.shape[1])
        h = min(10.0, 1.6 + 0.42 * n_layers)
        fig = _figure((max(4.5, w), max(2.6, h)))
        ax = fig.add_subplot()
    else:
        fig = notebook_figure(ax.figure)
    data = grid.numpy()
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45 if k == "linear" else 0,
                  ha="right" if k == "linear" else "center")
    ax.set_ylabel("layer")
    ax.set_xlabel(xname)
    method = getattr(scores, "method", "scores")
    ax.set_title(title or f"{method}: {k} scores" + (" (signed)" if signed else ""))
    cbar = fig.colorbar(im, ax=ax, shrink=0.9)
    cbar.set_label(f"{method} score")
    small = grid.numel() <= 160
    if annotate if annotate is not None else small:
        span = float(finite.abs().max()) if finite.numel() else 1.0
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                v = float(grid[r, c])
                if not math.isfinite(v):
                    continue
                txt = f"{v:.2g}" if labels is None else f"{labels[r][c]}\n{v:.2g}"
                dark = abs(norm(v) - 0.5) > 0.3 if signed else norm(v) < 0.5
                ax.text(c, r, txt, ha="center", va="center", fontsize=7 if labels else 8,
                        color="white" if dark and span > 0 else "black")
    for u in parse_units(highlight or []):
        if u.kind != k:
            continue
        if k == "neuron":
            assert order is not None and isinstance(u, Neuron)
            hits = torch.eq(order[u.layer], u.index).nonzero()
            if hits.numel() == 0:
                continue
            col = int(hits[0])
        elif isinstance(u, Linear):  # k == "linear"
            col = xlabels.index(u.name)
        else:
            col = u.head if isinstance(u, Head) else getattr(u, "group", 0)
        ax.add_patch(Rectangle((col - 0.5, u.layer - 0.5), 1, 1, fill=False, edgecolor="gold",
                               linewidth=2.5))
    return fig


def sweep_plot(result: SweepResult, *, pareto: bool | None = None) -> Figure:
    """The sweep: dev metric vs K per alpha (baselines, the choice starred) and, when
    there are control tasks (``pareto=None``), dev metric vs largest control drop
    with the Pareto front and the retention limit. Returns the Figure.
    """
    has_controls = any(r.control for r in result.rows)
    if pareto is None:
        pareto = has_controls
    if not pareto:
        return notebook_figure(result.plot())
    fig = _figure((10.5, 3.9))
    ax0, ax1 = fig.subplots(1, 2)
    result.plot(ax=ax0)
    handles, names = ax0.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    ax0.legend(list(uniq.values()), list(uniq), fontsize="small")
    ax0.set_title(f"{result.task.get('name')}: dev {result.metric} vs K")
    methods = result.methods
    for i, m in enumerate(methods):
        rows = [r for r in result.rows if r.method == m]
        ax1.scatter([r.max_drop for r in rows], [r.metric for r in rows], s=22, alpha=0.75,
                    color=f"C{i % 10}", label=m)
    bad = [r for r in result.rows if not r.feasible]
    if bad:
        ax1.scatter([r.max_drop for r in bad], [r.metric for r in bad], s=60, marker="x",
                    color="black", linewidths=0.8, label="over the limit")
    front = sorted(result.pareto, key=lambda r: r.max_drop)
    if front:
        ax1.plot([r.max_drop for r in front], [r.metric for r in front], color="black",
                 linewidth=1, linestyle="-", label="Pareto front")
    if result.best is not None:
        ax1.plot([result.best.max_drop], [result.best.metric], marker="*", markersize=15,
                 color="gold", markeredgecolor="black", linestyle="none", label="chosen")
    limit = result.config.get("max_retention_drop")
    if limit is not None:
        ax1.axvline(limit, color="grey", linestyle="--", linewidth=1, label="retention limit")
    dev = result.baselines["dev"]
    ax1.axhline(dev["source"].mean, color="green", linestyle="--", linewidth=1)
    ax1.axhline(dev["target"].mean, color="red", linestyle=":", linewidth=1)
    ax1.set_xlabel("largest dev drop of a control task")
    ax1.set_ylabel(f"dev {result.metric}")
    ax1.set_title("gain vs retention (dev)")
    ax1.legend(fontsize="small")
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """A matplotlib Figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


__all__ = [
    "CVPanel",
    "CircuitsVisView",
    "attention_compare",
    "circuitsvis_bundle",
    "circuitsvis_bundle_path",
    "figure_png",
    "neuron_compare",
    "notebook_figure",
    "score_heatmap",
    "str_tokens",
    "sweep_plot",
]
