"""Generic retention (tl_transplant.evaluation.generic): a control task from the unedited target itself."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tl_transplant import ModelPair, evaluate, transplant, zoo
from tl_transplant.evaluation.evaluator import retention
from tl_transplant.evaluation.generic import (
    MAX_UNKNOWN_FRACTION,
    general_text,
    generic_retention,
    text_chunks,
    unknown_fraction,
)
from tl_transplant.tasks.builtin import builtin_task
from tl_transplant.tasks.metrics import parse_reference, reference_answer
from tl_transplant.tasks.task import Task
from tl_transplant.testing import perturbed_copy, tiny_model


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE (GPT-2 style, leading-space tokens, no unknowns) trained on the
    shipped sample: ids 0-2 are <pad> <bos> <eos>, as the tiny configs expect."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(general_text()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


_PAIRS: dict[str, ModelPair] = {}


def bpe_pair(family: str, tok) -> ModelPair:
    """A tiny (source, target) pair of ``family`` over the BPE tokenizer, built once."""
    if family not in _PAIRS:
        target = tiny_model(family, seed=0, vocab_size=len(tok))
        source = perturbed_copy(target, scale=0.2, seed=1)
        _PAIRS[family] = ModelPair.load((source, tok), (target, tok))
    return _PAIRS[family]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def test_sample_is_general_english(bpe_tokenizer):
    paras = general_text()
    assert len(paras) >= 60
    assert any("def " in p for p in paras) and any('"' in p for p in paras)
    assert any(ch.isdigit() for p in paras for ch in p)
    assert unknown_fraction(bpe_tokenizer, paras) == 0.0
    chunks = text_chunks(bpe_tokenizer, 48)
    assert len(chunks) > len(paras)  # long paragraphs give several chunks
    for c in chunks:
        assert 1 <= len(bpe_tokenizer(c, add_special_tokens=False)["input_ids"]) <= 48
        assert c == c.strip() and any(c in p for p in paras)  # word boundaries, text kept
    code = next(c for c in chunks if c.startswith("def average"))
    assert "\n    total = 0" in code  # the code's own whitespace survives the chunking


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_agreement_is_one_before_and_drops_after_a_big_transplant(family, bpe_tokenizer):
    pair = bpe_pair(family, bpe_tokenizer)
    task = builtin_task("successor", n=40, seed=3)
    gr = generic_retention(pair, task, n_text=12, n_task=8, max_tokens=24, batch_size=5)
    assert gr.name == "generic_retention" and gr.metric == "next_token_agreement"
    assert gr.meta["n_text"] == 12 and gr.meta["n_task"] == 8 and gr.meta["notes"] == []
    assert gr.prepend_bos is pair.target.prepend_bos  # "auto" resolved and fixed
    assert gr.meta["reference"]["before"] == 1.0
    assert all(p in task.prompts for p in gr.prompts[12:])  # task contexts, no answers
    # Reference length = predicted positions = prompt tokens (BOS excluded).
    for p, a in zip(gr.prompts, gr.answers):
        assert len(parse_reference(a)) == len(bpe_tokenizer(p, add_special_tokens=False)["input_ids"])
    before = evaluate(pair.target, gr, batch_size=3, progress=False)  # other batch shapes
    assert before.mean == 1.0 and (before.scores == 1.0).all()
    units = pair.units(["head", "neuron"])
    after = evaluate(pair.target, gr, progress=False, intervention=transplant(pair, units, 1.0))
    assert after.mean < 0.9, after.mean
    r = retention(before, after)
    assert r.drop > 0.1 and r.metric == "next_token_agreement" and r.relative == after.mean
    # The source is a different model: it disagrees too; the restored target agrees again.
    assert evaluate(pair.source, gr, progress=False).mean < 1.0
    assert evaluate(pair.target, gr, progress=False).mean == 1.0


def test_without_a_task_uses_the_english_sample(bpe_tokenizer):
    pair = bpe_pair("llama", bpe_tokenizer)
    gr = generic_retention(pair, n_text=10, max_tokens=16)
    assert len(gr) == 10 and gr.meta["n_task"] == 0 and gr.meta["source_task"] is None
    assert all(any(p in para for para in general_text()) for p in gr.prompts)


def test_deterministic_in_the_seed(bpe_tokenizer):
    pair = bpe_pair("llama", bpe_tokenizer)
    task = builtin_task("induction", n=30, seed=1)
    a = generic_retention(pair, task, n_text=8, n_task=6, max_tokens=20)
    b = generic_retention(pair, task, n_text=8, n_task=6, max_tokens=20)
    c = generic_retention(pair, task, n_text=8, n_task=6, max_tokens=20, seed=1)
    assert (a.prompts, a.answers) == (b.prompts, b.answers)
    assert a.prompts != c.prompts
    # Independent streams: the number of text chunks does not change the task prompts drawn.
    d = generic_retention(pair, task, n_text=3, n_task=6, max_tokens=20)
    assert d.prompts[3:] == a.prompts[8:]


def test_round_trip_split_and_records(bpe_tokenizer):
    pair = bpe_pair("gpt_neox", bpe_tokenizer)  # prepend_bos "auto" is False for NeoX
    gr = generic_retention(pair, n_text=10, max_tokens=16)
    assert gr.prepend_bos is False
    d = json.loads(json.dumps(gr.to_dict()))
    assert d["metric"] == "next_token_agreement" and d["n"] == 10
    assert d["meta"]["reference"]["prepend_bos"] is False
    assert d["meta"]["reference"]["n_positions"] == sum(len(a.split()) for a in gr.answers)
    back = Task.from_records(
        gr.to_records(), name=d["name"], metric=d["metric"], prepend_bos=d["prepend_bos"],
        meta=d["meta"],
    )
    assert (back.prompts, back.answers) == (gr.prompts, gr.answers)
    assert evaluate(pair.target, back, progress=False).mean == 1.0
    dev, test = gr.split(0.5, seed=0)
    assert len(dev) + len(test) == len(gr)
    for part in (dev, test):
        assert evaluate(pair.target, part, progress=False).mean == 1.0
        assert set(part.answers) <= set(gr.answers)


def test_mismatched_bos_or_tokenizer_is_an_error(bpe_tokenizer, pair_dirs):
    pair = bpe_pair("llama", bpe_tokenizer)
    gr = generic_retention(pair, n_text=4, max_tokens=16)
    with pytest.raises(ValueError, match="computed with prepend_bos=True but it is evaluated"):
        evaluate(pair.target, gr, prepend_bos=False, progress=False)
    other = ModelPair.load(*pair_dirs("llama"))  # word-level tokenizer, 96 ids
    with pytest.raises(ValueError, match="built for another tokenizer"):
        evaluate(other.target, gr, progress=False)
    with pytest.raises(ValueError, match="reference token ids separated by spaces"):
        Task("x", ["a b"], [" Paris"], metric="next_token_agreement")
    assert parse_reference(reference_answer([5, 0, 17])) == [5, 0, 17]


def test_tokenizer_that_cannot_read_english_falls_back_to_the_task(pair_dirs):
    pair = ModelPair.load(*pair_dirs("gpt2"))  # word tokenizer w0..w91: English is <unk>
    assert unknown_fraction(pair.target.tokenizer, general_text()) > MAX_UNKNOWN_FRACTION
    task = builtin_task("successor", n=20, seed=0)
    with pytest.warns(UserWarning, match="task's contexts only"):
        gr = generic_retention(pair, task, n_text=8, n_task=10)
    assert gr.meta["n_text"] == 0 and len(gr) == 10 and set(gr.prompts) <= set(task.prompts)
    assert "unknown" in gr.meta["notes"][0]
    assert evaluate(pair.target, gr, progress=False).mean == 1.0
    with pytest.raises(ValueError, match="unknown tokens.*pass task="):
        generic_retention(pair, n_text=8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_text must be an int >= 0"):
        generic_retention(None, n_text=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        generic_retention(None, max_tokens=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_text \\+ n_task is 0"):
        generic_retention(None, n_text=0, n_task=0)  # type: ignore[arg-type]


def test_zoo_pair():
    pair = zoo.load_pair("base_instruct")
    tasks = zoo.load_tasks("base_instruct")
    gr = quiet(generic_retention, pair, tasks["task"].dev, n_task=16)
    assert len(gr) == 16 and gr.meta["reference"]["before"] == 1.0
    assert evaluate(pair.target, gr, progress=False).mean == 1.0
    src = evaluate(pair.source, gr, progress=False).mean
    assert src < 1.0  # the instruct model predicts differently from the base
    assert Path(gr.meta["reference"]["model"]).name == "base"


@pytest.mark.slow
def test_sweep_treats_it_as_a_control_task(tmp_path):
    """Unchanged sweep code: the generic task is split, evaluated before/after, and bounds K."""
    from tl_transplant import sweep

    pair = zoo.load_pair("cross_generation")
    tasks = zoo.load_tasks("cross_generation")
    gr = quiet(generic_retention, pair, tasks["task"].dev, n_task=24)
    ranked = pair.units(["head", "neuron"])
    res = sweep(pair, tasks["task"], ranked, ks=[0, len(ranked)], control_tasks=[gr],
                max_retention_drop=0.05, progress=False, n_boot=50)
    by_k = {r.k: r.control["generic_retention"] for r in res.rows}
    assert by_k[0]["before"] == 1.0 and by_k[0]["drop"] == 0.0
    assert by_k[len(ranked)]["drop"] > 0.05  # everything from the source moves the target
    assert res.best is not None and res.best.k == 0
    res.save(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "generic_retention" in json.dumps(saved)
