"""Reports: the self-contained HTML page (``html``; ``save_sweep`` saves a sweep with its
page), CircuitsVis and matplotlib views (``views``) and the text summary of a run
(``text``).

``tl_transplant.report`` was one module before 0.2; its names are still importable
from here.

Names are imported lazily (PEP 562), so importing the package does not load every
submodule (and cannot create an import cycle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "comparison_html": "html",
    "comparison_markdown": "html",
    "mask_unit_scores": "html",
    "save_sweep": "html",
    "verdict_html": "html",
    "write_report": "html",
    "COMPARISON_NOTE": "text",
    "NO_CHOICE": "text",
    "format_comparison": "text",
    "format_controls": "text",
    "format_sweep_summary": "text",
    "format_table": "text",
    "CVPanel": "views",
    "CircuitsVisView": "views",
    "attention_compare": "views",
    "circuitsvis_bundle": "views",
    "circuitsvis_bundle_path": "views",
    "figure_png": "views",
    "neuron_compare": "views",
    "notebook_figure": "views",
    "score_heatmap": "views",
    "str_tokens": "views",
    "sweep_plot": "views",
}

if TYPE_CHECKING:
    from tl_transplant.report.html import (
        comparison_html as comparison_html,
    )
    from tl_transplant.report.html import (
        comparison_markdown as comparison_markdown,
    )
    from tl_transplant.report.html import (
        mask_unit_scores as mask_unit_scores,
    )
    from tl_transplant.report.html import (
        save_sweep as save_sweep,
    )
    from tl_transplant.report.html import (
        verdict_html as verdict_html,
    )
    from tl_transplant.report.html import (
        write_report as write_report,
    )
    from tl_transplant.report.text import (
        COMPARISON_NOTE as COMPARISON_NOTE,
    )
    from tl_transplant.report.text import (
        NO_CHOICE as NO_CHOICE,
    )
    from tl_transplant.report.text import (
        format_comparison as format_comparison,
    )
    from tl_transplant.report.text import (
        format_controls as format_controls,
    )
    from tl_transplant.report.text import (
        format_sweep_summary as format_sweep_summary,
    )
    from tl_transplant.report.text import (
        format_table as format_table,
    )
    from tl_transplant.report.views import (
        CircuitsVisView as CircuitsVisView,
    )
    from tl_transplant.report.views import (
        CVPanel as CVPanel,
    )
    from tl_transplant.report.views import (
        attention_compare as attention_compare,
    )
    from tl_transplant.report.views import (
        circuitsvis_bundle as circuitsvis_bundle,
    )
    from tl_transplant.report.views import (
        circuitsvis_bundle_path as circuitsvis_bundle_path,
    )
    from tl_transplant.report.views import (
        figure_png as figure_png,
    )
    from tl_transplant.report.views import (
        neuron_compare as neuron_compare,
    )
    from tl_transplant.report.views import (
        notebook_figure as notebook_figure,
    )
    from tl_transplant.report.views import (
        score_heatmap as score_heatmap,
    )
    from tl_transplant.report.views import (
        str_tokens as str_tokens,
    )
    from tl_transplant.report.views import (
        sweep_plot as sweep_plot,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
