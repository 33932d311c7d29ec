"""What a run returns (:class:`RunResult`): its typed results and the live objects behind them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from tl_transplant.report.text import format_table

if TYPE_CHECKING:
    from tl_transplant.edit.manifest import Manifest
    from tl_transplant.models.pair import ModelPair
    from tl_transplant.pipeline.config import RunConfig
    from tl_transplant.scoring.scores import Scores
    from tl_transplant.scoring.weight_scores import WeightScores
    from tl_transplant.sweeps.records import Results
    from tl_transplant.sweeps.result import SweepResult

#: A method's scores in a run: per unit, or per weight.
MethodScores: TypeAlias = "Scores | WeightScores"


@dataclass
class RunResult:
    """A finished run: ``results`` (what ``results.json`` holds, typed), where it was written,
    the sweep, each method's scores, the pair (its target transplanted when a configuration
    was applied), the manifest of that transplant, and the validated config."""

    results: Results
    out_dir: Path
    sweep: SweepResult
    scores: dict[str, MethodScores]
    pair: ModelPair
    manifest: Manifest | None = None
    config: RunConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The short text table the CLI prints (:func:`~tl_transplant.report.text.format_table`)."""
        return format_table(self.results, self.sweep)


__all__ = ["MethodScores", "RunResult"]
