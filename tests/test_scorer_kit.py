"""The public scorer kit: the documented example scorer, typed options, seed, plugins, hooks."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tl_transplant
from tl_transplant import ModelPair
from tl_transplant.arch.units import Head, KVHead, Linear, Neuron
from tl_transplant.models.hooks import (
    HookError,
    kind_hooks,
    require_hooks,
    value_hooks,
    write_hooks,
)
from tl_transplant.scoring import (
    SCORERS,
    RawScores,
    Scorer,
    ScorerOptions,
    ScoringError,
    available_methods,
    get_scorer,
    register,
    score,
)
from tl_transplant.scoring.scores import Scores
from tl_transplant.sweeps.protocol import sweep
from tl_transplant.tasks.task import Task
from tl_transplant.testing import tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "my_scorer.py"
DOC = ROOT / "docs" / "adding_a_scorer.md"


def make_task(n: int = 6) -> Task:
    prompts = [" ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(2 + i % 3)) for i in range(n)]
    answers = [f"w{(i * 5) % 90}" for i in range(n)]
    return Task("t", prompts, answers, metric="answer_logprob")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("kit_tok"))


@pytest.fixture(scope="module")
def pair(tok) -> ModelPair:
    """Llama pair whose source differs from the target only in head L0.H0."""
    p = ModelPair.load((tiny_model("llama", seed=0), tok), (tiny_model("llama", seed=0), tok))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in p.layout.slices(Head(0, 0)):
            view = p.source.params[s.param].narrow(s.dim, s.start, s.size)
            view.add_(torch.randn(view.shape, generator=gen))
    p.source.refresh_mirrors()
    return p


@pytest.fixture()
def clean_registry():
    """Leave SCORERS (and imported plugin modules) as they were."""
    saved, mods = dict(SCORERS), set(sys.modules)
    yield
    SCORERS.clear()
    SCORERS.update(saved)
    for m in set(sys.modules) - mods:
        if m.startswith(("kit_plugin", "my_scorer_example")):
            del sys.modules[m]


def load_example():
    spec = importlib.util.spec_from_file_location("my_scorer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---- the documented example ----------------------------------------------------------------


def test_doc_shows_the_example_file_verbatim():
    doc = DOC.read_text()
    m = re.search(
        r"<!-- example:begin docs/examples/my_scorer.py -->\n```python\n(.*?)```\n"
        r"<!-- example:end -->",
        doc,
        re.S,
    )
    assert m, "docs/adding_a_scorer.md lost its example markers"
    assert m.group(1) == EXAMPLE.read_text()


def test_example_scorer_registers_and_scores_sensibly(pair, clean_registry):
    assert "norm_gap" not in SCORERS
    mod = load_example()
    assert get_scorer("norm_gap") is mod.NormGap and "norm_gap" in available_methods()
    task = make_task()
    s = score(pair, task, "norm_gap", ("head", "neuron"), progress=False, batch_size=4)
    assert s.meta["options"] == {"ord": 2} and s.meta["method"] == "norm_gap"
    # Layer 0 heads read the same embeddings in both models: only the changed head moves.
    assert s["L0.H0"] > 1e-3
    assert all(s[Head(0, h)] == 0.0 for h in range(1, pair.layout.dims.H))
    # Against a direct computation with run_with_cache, for a downstream head.
    from tl_transplant.tasks.tokens import encode

    gaps = []
    for p in task.prompts:
        enc = encode(pair.target.tokenizer, [p], None, prepend_bos=s.meta["prepend_bos"])
        last = int(enc.last_prompt_pos[0])
        norms = []
        for side in (pair.source, pair.target):
            _, cache = side.bridge.run_with_cache(enc.input_ids)
            norms.append(cache[pair.layout.hook("head", 1)][0, last, 2].float().norm())
        gaps.append((norms[0] - norms[1]).abs())
    assert s["L1.H2"] == pytest.approx(float(torch.stack(gaps).mean()), rel=1e-4, abs=1e-7)
    # batch size does not change the scores; ord=1 is a different (still valid) score
    again = score(pair, task, "norm_gap", ("head", "neuron"), progress=False, batch_size=1)
    assert torch.allclose(again.values, s.values, rtol=1e-5, atol=1e-7)
    l1 = score(pair, task, "norm_gap", "head", progress=False, ord=1)
    assert l1.meta["options"] == {"ord": 1} and l1["L0.H0"] != s["L0.H0"]
    with pytest.raises(ScoringError, match="norm_gap cannot score kv_head units"):
        score(pair, task, "norm_gap", "kv_head")


# ---- typed options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("activation_patch", {"alpha": "big"}, r"activation_patch: option alpha='big'.*finite"),
        ("activation_patch", {"alpha": float("nan")}, r"alpha must be a finite number"),
        ("activation_patch", {"units_per_pass": 0}, r"units_per_pass must be an int >= 1"),
        ("activation_patch", {"units_per_pass": True}, r"units_per_pass must be an int >= 1"),
        ("paper_l1", {"decode_steps": -1}, r"paper_l1: .*decode_steps must be an int >= 0"),
        ("paper_l1", {"decode_steps": "3"}, r"decode_steps must be an int >= 0"),
        ("weight_diff", {"relative": 1}, r"weight_diff: .*relative must be True or False"),
        ("activation_diff", {"positions": "middle"}, r"one of last, answer, all"),
        ("attribution", {"alpha": 1.0}, r"attribution does not take option\(s\) 'alpha'; "
                                        r"its options are: none"),
        ("random", {"seeds": 1}, r"random does not take option\(s\) 'seeds'"),
    ],
)
def test_bad_options_name_option_scorer_and_allowed_values(method, options, expected):
    # ``pair`` is never touched: options are checked before anything else runs
    with pytest.raises(ScoringError, match=expected):
        score(object(), None, method, **options)


def test_options_are_typed_models_with_defaults():
    ap = get_scorer("activation_patch")
    assert issubclass(ap.Options, ScorerOptions)
    assert dict(ap.options) == {
        "alpha": 1.0, "units_per_pass": "auto", "max_pass_mb": 1024, "candidates": None,
        "allow_full": False,
    }
    assert dict(get_scorer("random").options) == {}
    with pytest.raises(TypeError):
        ap.options["alpha"] = 2.0  # read-only view

    class NoDefault(Scorer):
        name = "kit_no_default"

        class Options(ScorerOptions):
            k: int

    class NotPydantic(Scorer):
        name = "kit_not_pydantic"
        Options = dict  # type: ignore[assignment]

    with pytest.raises(TypeError, match="needs a default"):
        register(NoDefault)
    with pytest.raises(TypeError, match="must be a pydantic model"):
        register(NotPydantic)
    assert "kit_no_default" not in SCORERS and "kit_not_pydantic" not in SCORERS


# ---- seed ------------------------------------------------------------------------------------


def test_seed_reaches_every_scorer_through_the_context(pair, clean_registry):
    seen: list[int] = []

    @register
    class SeedProbe(Scorer):
        name = "kit_seed_probe"
        needs_data = False

        def run(self, units, data):
            seen.append(self.ctx.seed)
            return RawScores(torch.zeros(len(units), dtype=torch.float64))

    s = score(pair, None, "kit_seed_probe", "head", seed=11)
    assert seen == [11] and s.meta["seed"] == 11
    score(pair, None, "kit_seed_probe", "head")
    assert seen == [11, 0]
    # the random control draws from it; a deterministic scorer ignores it
    r3, r3b = (score(pair, None, "random", "head", seed=3) for _ in range(2))
    r4 = score(pair, None, "random", "head", seed=4)
    assert torch.equal(r3.values, r3b.values) and not torch.equal(r3.values, r4.values)
    assert r3.meta["seed"] == 3
    w0 = score(pair, None, "weight_diff", "head", seed=0)
    w9 = score(pair, None, "weight_diff", "head", seed=9)
    assert torch.equal(w0.values, w9.values)
    with pytest.raises(ScoringError, match="seed must be an int"):
        score(pair, None, "random", "head", seed="3")


def test_sweep_traits_are_typed_fields_and_old_meta_keys_still_work(pair, clean_registry,
                                                                     tmp_path):
    """How a sweep uses scores (budget rule, suggested set, DARE's alpha scale, dense) are
    typed fields; a scorer may set them as fields or, as before 0.2, as meta keys; a saved
    scores file records them under the old keys and reloads them."""

    @register
    class Typed(Scorer):
        name = "kit_typed"
        needs_data = False

        def run(self, units, data):
            return RawScores(torch.arange(len(units), dtype=torch.float64),
                             budget_rule="score", suggested=[units[1]])

    @register
    class OldStyle(Scorer):
        name = "kit_meta"
        needs_data = False

        def run(self, units, data):
            return RawScores(torch.arange(len(units), dtype=torch.float64),
                             meta={"budget_rule": "score", "suggested": [str(units[1])]})

    a, b = score(pair, None, "kit_typed", "head"), score(pair, None, "kit_meta", "head")
    second = pair.units("head")[1]
    for s in (a, b):
        assert s.budget_rule == "score" and s.suggested == [second]
        assert s.meta["budget_rule"] == "score" and s.meta["suggested"] == [str(second)]
        back = Scores.load(s.save(tmp_path / f"{s.method}.json"))
        assert back.budget_rule == "score" and back.suggested == [second]
        assert (back.grain, back.alpha_scale, back.dense_alphas) == ("unit", None, None)
    dense = score(pair, None, "dense", "linear")  # a built-in that still says it in meta
    assert dense.grain == "dense" and dense.dense_alphas == sorted(dense.meta["alphas"])
    dare = score(pair, None, "dare", "weight")
    assert (dare.budget_rule, dare.alpha_scale) == ("score", "inverse_fraction")
    with pytest.raises(ScoringError, match="budget_rule must be one of"):
        RawScores(torch.zeros(1), budget_rule="magic")  # type: ignore[arg-type]
    # The sweep reads the fields: the typed suggested set is a row of its own.
    res = sweep(pair, make_task(8), {"kit_typed": a}, ks=[1], control_tasks=(), n_boot=50,
                progress=False)
    (sugg,) = [r for r in res.rows if r.budget == "suggested"]
    assert sugg.units == [str(second)]


# ---- plugins through entry points ------------------------------------------------------------

PLUGIN = '''
import torch
from tl_transplant.scoring import RawScores, Scorer, ScorerOptions, register


@register
class PluginOffset(Scorer):
    name = "kit_plugin_offset"
    needs_data = False

    class Options(ScorerOptions):
        offset: float = 0.5

    def run(self, units, data):
        v = torch.arange(len(units), dtype=torch.float64) + self.opts.offset + self.ctx.seed
        return RawScores(v)


class PluginClass(Scorer):  # not decorated: the entry point names the class
    name = "kit_plugin_class"
    needs_data = False

    def run(self, units, data):
        return RawScores(torch.ones(len(units), dtype=torch.float64))
'''


def _install_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kit_plugin_mod.py").write_text(PLUGIN)
    (tmp_path / "kit_plugin_broken.py").write_text("import a_module_that_does_not_exist\n")
    (tmp_path / "kit_plugin_empty.py").write_text("X = 1\n")
    info = tmp_path / "kit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [tl_transplant.scorers]
        kit_plugin_offset = kit_plugin_mod
        kit_plugin_class = kit_plugin_mod:PluginClass
        kit_plugin_broken = kit_plugin_broken
        kit_plugin_empty = kit_plugin_empty
        """))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_plugins_load_lazily_and_score(pair, tmp_path, monkeypatch, clean_registry):
    assert "kit_plugin_offset" not in available_methods()
    _install_plugins(tmp_path, monkeypatch)
    methods = available_methods()
    assert {"kit_plugin_offset", "kit_plugin_class", "attribution"} <= set(methods)
    assert "kit_plugin_mod" not in sys.modules and "kit_plugin_offset" not in SCORERS  # lazy
    s = score(pair, None, "kit_plugin_offset", "head", seed=2, offset=0.25)
    assert s.values.tolist() == [2.25 + i for i in range(len(s))]
    assert s.meta["options"] == {"offset": 0.25}
    with pytest.raises(ScoringError, match=r"kit_plugin_offset: option offset='x'"):
        score(pair, None, "kit_plugin_offset", "head", offset="x")
    c = score(pair, None, "kit_plugin_class", "neuron")
    assert torch.equal(c.values, torch.ones(len(c), dtype=torch.float64))
    assert get_scorer("kit_plugin_class").name == "kit_plugin_class"


def test_broken_plugins_give_clear_errors(pair, tmp_path, monkeypatch, clean_registry):
    _install_plugins(tmp_path, monkeypatch)
    with pytest.raises(ScoringError, match=r"scorer plugin 'kit_plugin_broken' \(entry point "
                                           r"'kit_plugin_broken' of kit-plugin\) failed to load: "
                                           r"ModuleNotFoundError"):
        score(pair, None, "kit_plugin_broken", "head")
    with pytest.raises(ScoringError, match="registered no scorer named 'kit_plugin_empty'"):
        get_scorer("kit_plugin_empty")
    # a broken plugin does not hide the others
    assert "attribution" in available_methods()
    assert get_scorer("kit_plugin_offset").name == "kit_plugin_offset"


# ---- hooks -----------------------------------------------------------------------------------


def test_hook_names_come_from_the_layout(pair):
    lay = pair.layout
    assert kind_hooks(lay, "head", 1) == (lay.hook("head", 1),) == ("blocks.1.attn.hook_z",)
    assert kind_hooks(lay, "head", 1, write=True) == ("blocks.1.attn.o.hook_out",)
    assert kind_hooks(lay, "kv_head", 0) == ("blocks.0.attn.hook_k", "blocks.0.attn.hook_v")
    assert kind_hooks(lay, "neuron", 0, write=True) == ("blocks.0.mlp.out.hook_out",)
    lin = Linear(1, lay.linear_names()[0])
    units = [Head(1, 0), Head(1, 3), KVHead(0, 1), Neuron(0, 2), lin]
    vals = value_hooks(lay, units)
    assert vals == [lay.hook("head", 1), lay.hook("kv_k", 0), lay.hook("kv_v", 0),
                    lay.hook("neuron", 0), *lay.linear_hooks(lin)]
    writes = write_hooks(lay, units)
    assert lay.hook("attn_out", 1) in writes and lay.hook("mlp_out", 0) in writes
    assert lay.hook("head", 1) not in writes
    for side in pair.sides():
        require_hooks(side, vals + writes, why="this test")
        assert all(n in side.bridge.hook_dict for n in vals + writes)
    with pytest.raises(HookError, match="no hook point 'blocks.0.nope'; this test needs"):
        require_hooks(pair.target, ["blocks.0.nope"], why="this test")
    with pytest.raises(ValueError, match="linear_hooks"):
        kind_hooks(lay, "linear", 0)


def _block_literals(path: Path) -> list[int]:
    """Line numbers of code string literals (docstrings excluded) starting with ``blocks.``."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        n.lineno for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
        and n.value.startswith("blocks.")
    ]


def test_no_hook_names_hard_coded_outside_layouts():
    pkg = Path(tl_transplant.__file__).parent
    found = {
        str(p.relative_to(pkg)): lines
        for p in sorted(pkg.rglob("*.py"))
        if p.name != "model_layout.py" and (lines := _block_literals(p))
    }
    assert found == {}, f"hook names outside arch/model_layout.py (use layout.hook): {found}"
