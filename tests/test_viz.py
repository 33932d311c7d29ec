"""viz and report: self-contained CircuitsVis, heatmaps, comparisons, report.html contents."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from tl_transplant import ModelPair
from tl_transplant.edit.edits import plan_transplant
from tl_transplant.report.html import save_sweep, write_report
from tl_transplant.report.views import (
    CircuitsVisView,
    CVPanel,
    attention_compare,
    circuitsvis_bundle,
    js_literal,
    neuron_compare,
    score_heatmap,
    str_tokens,
    sweep_plot,
)
from tl_transplant.scoring import Scores
from tl_transplant.sweeps.protocol import sweep
from tl_transplant.sweeps.search import SweepError
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import encode
from tl_transplant.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::tl_transplant.evaluation.evaluator.UndefinedMetricWarning")

CHANGED = ["L0.H1", "L1.N3"]  # the only units where source and target differ


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(tok):
    """Llama pair equal except the weights of CHANGED (with L0.H1's KV group)."""
    target = tiny_model("llama", seed=0)
    p = ModelPair.load((copy.deepcopy(target), tok), (target, tok))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, mask in plan_transplant(p, CHANGED).masks.items():
            p.source.params[name].data[mask] += 2.0 * torch.randn(int(mask.sum()), generator=g)
        p.source.refresh_mirrors()
    return p


def labelled(side, prompts: list[str], name: str) -> Task:
    tok = side.tokenizer
    enc = encode(tok, prompts, None, prepend_bos=True)
    with torch.inference_mode():
        out = side.bridge(enc.input_ids)
    pred = out[torch.arange(len(prompts)), enc.prompt_len - 1].argmax(-1).tolist()
    keep = [i for i, t in enumerate(pred) if t >= 4]
    return Task(name, [prompts[i] for i in keep],
                [" " + tok.convert_ids_to_tokens(pred[i]) for i in keep], prepend_bos=True)


def grid_scores(signed: bool) -> Scores:
    units = [f"L{layer}.H{h}" for layer in range(2) for h in range(4)]
    units += [f"L{layer}.N{i}" for layer in range(2) for i in range(48)]
    vals = torch.linspace(-1.0 if signed else 0.1, 2.0, len(units))
    vals[1] = math.nan  # one unscored head
    return Scores(units, vals, method="demo",
                  meta={"signed": signed, "dims": {"n_layers": 2, "H": 4, "KV": 2, "I": 48}})


# ---- CircuitsVis: self-contained -----------------------------------------------------------


def test_installed_circuitsvis_local_src_inlines_and_str_uses_the_cdn():
    import circuitsvis as cv

    r = cv.attention.attention_heads(torch.ones(1, 2, 2) / 2, ["a", "b"])
    assert "unpkg.com" in str(r) and "unpkg.com" in r.cdn_src
    assert "unpkg.com" not in r.local_src and "var CircuitsVis=" in r.local_src
    assert len(r.local_src) > 500_000  # the whole bundle is in there
    js = circuitsvis_bundle()
    assert js.startswith('"use strict";var CircuitsVis=')
    assert "</script" not in js and "sourceMappingURL" not in js


def test_view_html_inlines_the_bundle_once_and_escapes_data():
    evil = "</script><script>alert(1)</script>"
    panels = [CVPanel("ColoredTokens", {"tokens": [evil, "b"], "values": [1.0, -1.0]},
                      title="<i>t</i>") for _ in range(3)]
    view = CircuitsVisView("v <x>", [("cap", panels)])
    page = view._repr_html_()
    assert page.count("var CircuitsVis=") == 1 and "unpkg" not in page
    assert evil not in page and "alert(1)" in page  # present, but only as escaped data
    assert "<i>t</i>" not in page and "&lt;i&gt;t&lt;/i&gt;" in page
    frag = view.to_html(include_bundle=False)
    assert "var CircuitsVis=" not in frag and frag.count('class="tlt-cv"') == 3
    assert re.search(r'<div class="tlt-cv" id="tlt-cv-[0-9a-f]{12}"[^>]*></div>', frag)
    assert js_literal({"a": float("nan"), "b": None, "c": torch.tensor([0.123456])}) == \
        '{"a": null, "c": [0.1235]}'
    assert len(view.circuitsvis()) == 3


# ---- heatmaps and the sweep plot -------------------------------------------------------------


def test_score_heatmap_signed_diverging_centred_and_unsigned_sequential():
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    fig = score_heatmap(grid_scores(True), "head", highlight=["L1.H2", "L0.N5"])
    ax = fig.axes[0]
    im = ax.images[0]
    assert im.cmap.name.startswith("RdBu_r") and isinstance(im.norm, TwoSlopeNorm)
    assert im.norm.vcenter == 0 and im.norm.vmin == -im.norm.vmax
    assert im.get_array().shape == (2, 4) and bool(im.get_array().mask[0, 1])  # NaN: masked
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(b.get_x(), b.get_y()) for b in boxes] == [(1.5, 0.5)]  # the head only
    fig = score_heatmap(grid_scores(False), "head")
    assert fig.axes[0].images[0].cmap.name.startswith("viridis")


def test_score_heatmap_neurons_show_the_top_of_each_layer():
    s = grid_scores(True)
    fig = score_heatmap(s, "neuron", top=5, highlight=["L1.N47", "L1.N0"])
    ax = fig.axes[0]
    arr = ax.images[0].get_array()
    assert arr.shape == (2, 5)
    g = s.as_grid("neuron")
    for layer in range(2):
        want = sorted(g[layer].tolist(), reverse=True)[:5]
        assert arr[layer].tolist() == pytest.approx(want)
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("N47") for t in texts)
    assert len([p for p in ax.patches]) == 1  # L1.N47 is in the top 5; L1.N0 is not shown
    with pytest.raises(ValueError, match="kind"):
        score_heatmap(s, "layer")
    with pytest.raises(TypeError, match="Scores"):
        score_heatmap(["L0.H1"], "head")


# ---- attention and neurons -------------------------------------------------------------------


def test_attention_compare_weight_transplant_reproduces_the_source_head(pair):
    prompt = "w3 w8 w1 w3 w8"
    before = {k: v.clone() for k, v in pair.target.params.items()}
    v = attention_compare(pair, prompt, ["L0.H1", "L0.H2"])
    pats = v.data["patterns"]
    assert set(pats) == {"source", "target", "transplanted"}
    n = len(v.data["tokens"])
    assert v.data["tokens"][0] == "<bos>" and v.data["tokens"][1] == " w3"
    for p in pats.values():
        assert p.shape == (2, n, n)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, n), atol=1e-5, rtol=0)
        assert torch.all(p.triu(1) == 0)  # causal
    torch.testing.assert_close(pats["transplanted"], pats["source"], atol=1e-6, rtol=0)
    summ = v.summary.set_index("head")
    assert summ.loc["L0.H1", "tv_target_vs_source"] > 0.01
    assert summ.loc["L0.H1", "tv_transplanted_vs_source"] < 1e-5
    assert summ.loc["L0.H2", "tv_target_vs_source"] < 1e-6  # another KV group: unchanged
    assert [p.component for p in v.panels] == ["AttentionHeads"] * 3
    assert all(torch.equal(before[k], pair.target.params[k]) for k in before)  # restored
    two = attention_compare(pair, prompt, "L0.H1", transplant=False)
    assert len(two.panels) == 2 and "tv_transplanted_vs_source" not in two.summary
    with pytest.raises(ValueError, match="query heads"):
        attention_compare(pair, prompt, ["L0.N1"])


def test_neuron_compare_views_and_activation_patch(pair):
    from tl_transplant.edit.patching import patch_activations

    prompts = ["w1 w2 w3", "w4 w5"]
    v = neuron_compare(pair, prompts, ["L1.N3", "L1.N4"],
                       transplant=patch_activations(pair, ["L1.N3"]))
    acts = v.data["activations"]
    assert [a.shape for a in acts["source"]] == [(4, 2), (3, 2)]
    for i in range(2):
        torch.testing.assert_close(acts["transplanted"][i][:, 0], acts["source"][i][:, 0])
        torch.testing.assert_close(acts["transplanted"][i][:, 1], acts["target"][i][:, 1])
    s = v.summary.set_index("neuron")
    assert s.loc["L1.N3", "mad_target_vs_source"] > 1e-3
    assert s.loc["L1.N3", "mad_transplanted_vs_source"] < 1e-6
    assert len(v.rows) == 2 and all(len(r) == 3 for _, r in v.rows)  # neuron x model
    first = v.rows[0][1][0].props
    assert len(first["tokens"]) == 4 + 1 + 3 and first["minValue"] == -first["maxValue"]
    assert "activation-patched" in v.rows[0][1][2].title
    inter = neuron_compare(pair, prompts, "L1.N3", view="interactive")
    assert [p.component for p in inter.panels] == ["TextNeuronActivations"] * 3
    assert inter.panels[0].props["activations"][0].shape == (4, 1, 1)
    with pytest.raises(ValueError, match="neurons"):
        neuron_compare(pair, prompts, ["L0.H1"])


def test_str_tokens_spaces_word_level_tokens(tok):
    ids = tok("w1 w2 w3", add_special_tokens=False)["input_ids"]
    assert str_tokens(tok, [1, *ids]) == ["<bos>", " w1", " w2", " w3"]


# ---- sweep plot and the report ---------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(pair):
    pool = builtin_task("induction", n=40, seed=2).prompts
    task = labelled(pair.source, pool[:20], "task <&>")
    control = labelled(pair.target, pool[20:], "control")
    scores = {"demo": Scores(["L0.H1", "L1.N3", "L0.H0", "L1.N4"], [3.0, 2.0, 1.0, -1.0],
                             method="demo", meta={"signed": True,
                                                  "dims": {"n_layers": 2, "H": 4, "I": 48}})}
    res = sweep(pair, task, scores, ks=[1, 2], alphas=[0.5, 1.0], control_tasks=[control],
                progress=False, n_boot=100)
    return res, task, scores


def test_sweep_plot_panels(swept):
    res, _, _ = swept
    fig = sweep_plot(res)
    assert len(fig.axes) == 2
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(texts) == len(set(texts)) and "chosen" in texts  # one entry per label
    assert "Pareto front" in fig.axes[1].get_legend_handles_labels()[1]
    assert len(sweep_plot(res, pareto=False).axes) == 1


def test_report_contents_and_save_wiring(swept, pair, tmp_path):
    res, task, scores = swept
    out = save_sweep(res, tmp_path / "run", pair=pair, task=task, scores=scores)
    page = (out / "report.html").read_text(encoding="utf-8")
    for anchor in ("pair", "baselines", "choice", "sweep", "heatmaps", "attention", "neurons",
                   "retention"):
        assert f'<section id="{anchor}">' in page
    assert page.count("var CircuitsVis=") == 1
    assert page.count('class="tlt-cv"') >= 3 + 2 * 3
    assert "task &lt;&amp;&gt;" in page and "task <&>" not in page
    refs = re.findall(r'\s(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert not re.search(r"https?://(?!www\.w3\.org)", page.split("<script>")[0])
    assert "unpkg" not in page
    best = res.best
    assert best is not None and all(f">{u}<" in page for u in best.units)
    assert 'class="best"' in page and "control" in page
    bare = write_report(tmp_path / "bare.html", sweep_result=res)
    text = bare.read_text(encoding="utf-8")
    assert "var CircuitsVis=" not in text and "pass pair=" in text and "pass scores=" in text
    with pytest.raises(SweepError, match="save_sweep"):  # the sweep does not import the report
        res.save(tmp_path / "x", pair=pair)
