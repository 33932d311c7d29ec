"""Real-model tier, part 2: every scorer on real prompts, and a real ``tl-transplant run``.

Scoring uses the session's SmolLM2 pair with a few source tensors nudged (so the two sides
differ where the units live); the run uses the real zoo pair ``smollm2_rtn4`` (built on first
use, about 1.5 minutes) with a tiny grid, so the whole file stays within a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tl_transplant import Task, available_methods, score, zoo
from tl_transplant.arch.units import parse_unit
from tl_transplant.cli import main as cli_main
from tl_transplant.scoring import get_scorer

from .test_real_models import nudged_source

NUDGED = [
    "model.layers.4.self_attn.q_proj.weight",
    "model.layers.4.self_attn.k_proj.weight",
    "model.layers.4.mlp.up_proj.weight",
    "model.layers.4.mlp.down_proj.weight",
]
# A few units of every kind, in the nudged layer and elsewhere (those must score ~0 on the
# data-free control, and all must be finite everywhere).
UNITS = ["L4.H0", "L4.H5", "L20.H1", "L4.KV1", "L4.N3", "L4.N700", "L25.N9",
         "L4.attn.q_proj", "L4.mlp.down_proj", "L12.attn.o_proj"]
RECORDS = [
    {"prompt": "The capital of France is", "answer": " Paris"},
    {"prompt": "The opposite of hot is", "answer": " cold"},
    {"prompt": "One, two, three, four,", "answer": " five"},
    {"prompt": "Monday, Tuesday, Wednesday,", "answer": " Thursday"},
]


@pytest.fixture(scope="module")
def nudged(smol_pair: Any) -> Any:
    with nudged_source(smol_pair, NUDGED) as pair:
        yield pair


# Light settings for the scorers that loop (the suite's budget is minutes): still the
# real code path on the real model, just fewer steps / rounds.
LIGHT: dict[str, dict[str, Any]] = {
    "attribution_ig": {"steps": 2},
    "iterative": {"k": 4, "chunk": 2},
    "learned_mask": {"steps": 3},
}


@pytest.mark.parametrize(
    "method", sorted(m for m in available_methods() if get_scorer(m).unit_level)
)
def test_every_scorer_runs_on_real_prompts_and_ignores_batch_size(nudged: Any, method: str) -> None:
    kinds = get_scorer(method).kinds
    units = [u for u in UNITS if parse_unit(u).kind in kinds]
    task = Task.from_records(RECORDS, name="real", metric="next_token_acc")
    opts = LIGHT.get(method, {})
    a = score(nudged, task, method, units=units, batch_size=1, progress=False, seed=1, **opts)
    b = score(nudged, task, method, units=units, batch_size=4, progress=False, seed=1, **opts)
    va, vb = a.values.double(), b.values.double()
    assert va.shape == (len(units),) and bool(torch.isfinite(va).all()), (method, va)
    scale = float(va.abs().max()) or 1.0
    assert torch.allclose(va, vb, rtol=1e-4, atol=1e-5 * scale), (method, va, vb)
    if method == "weight_diff":  # data-free: exactly 0 away from the nudged layer
        for u, v in zip(units, va.tolist()):
            assert (v != 0) == (parse_unit(u).layer == 4), (u, v)
    elif method not in ("random",):
        assert scale > 0, f"{method} scored every unit 0 on a pair that differs"


@pytest.mark.parametrize(
    "method", sorted(m for m in available_methods() if get_scorer(m).weight_level)
)
def test_every_weight_scorer_runs_on_real_prompts_and_ignores_batch_size(
    nudged: Any, method: str
) -> None:
    """Weight-level scores: one finite score per block weight, independent of batch size."""
    task = Task.from_records(RECORDS, name="real", metric="next_token_acc")
    opts = LIGHT.get(method, {})
    a = score(nudged, task, method, units="weight", batch_size=1, progress=False, seed=1, **opts)
    b = score(nudged, task, method, units="weight", batch_size=4, progress=False, seed=1, **opts)
    assert set(a.values) == set(nudged.layout.unit_tensors())
    top = max(float(v.abs().max()) for v in a.values.values()) or 1.0
    off = total = 0
    for n, va in a.values.items():
        assert bool(torch.isfinite(va).all()), (method, n)
        # per-weight values are tiny: compare against the largest score (float32 batch noise)
        close = torch.isclose(va, b.values[n], rtol=1e-3, atol=1e-4 * top)
        off, total = off + int((~close).sum()), total + close.numel()
    # learned_mask gates a candidate set, the top weights by a first-order gain; where gains
    # tie to float32 noise at the set's edge a batch size can swap a few candidates (and
    # normalised steps amplify the noise of the rest): allow 0.1% of the weights to differ.
    allowed = total // 1000 if method == "learned_mask" else 0
    assert off <= allowed, (method, off, total)
    if method in ("weight_diff", "magnitude"):  # data-free: exactly 0 away from the nudged layer
        for n, va in a.values.items():
            assert bool((va != 0).any()) == (n in NUDGED), (method, n)


def test_a_real_tl_transplant_run_finishes(tmp_path: Path) -> None:
    name = "smollm2_rtn4"
    src, tgt = zoo.pair_dirs(name, build_missing=True)
    paths = zoo.task_paths(name, build_missing=True)
    cfg = {
        "source": str(src),
        "target": str(tgt),
        "task": {"path": str(paths["task"].dev), "test_path": str(paths["task"].test),
                 "limit": 10, "metric": "next_token_acc"},
        "control_tasks": [{"path": str(paths["retention"].dev),
                           "test_path": str(paths["retention"].test), "limit": 10}],
        "selection": {"methods": ["weight_diff"], "units": ["linear"], "controls": ["random"]},
        "sweep": {"k": [2, 8], "alpha": [1.0]},
        "export": True,
        "batch_size": 10,
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert cli_main(["run", str(cfg_path), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for side in ("source", "target"):
        assert 0.0 <= res["baselines"][side]["test"] <= 1.0
    assert res["best"]["k"] in (2, 8) and res["best"]["method"] == "weight_diff"
    assert "random" in res["controls"]
    assert (out / "model" / "config.json").exists()
    assert (out / "report.html").exists()
