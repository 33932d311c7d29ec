"""Real workloads for tasks: dataset folders and hub names, boxed answers, multiple choice,
non-UTF-8 files and prompts longer than the model's context. All offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from tl_transplant.tasks.extract import extract_boxed, extract_last_number, normalize_answer
from tl_transplant.tasks.metrics import ACCURACY_METRICS, METRICS
from tl_transplant.tasks.task import Task
from tl_transplant.tasks.tokens import (
    choice_logprobs,
    context_limit,
    encode,
    encode_choices,
    mc_scores,
)
from tl_transplant.testing import word_tokenizer

ROWS = [
    {"problem": "w1 w2", "answer": "w3", "level": 1},
    {"problem": "w4 w5", "answer": "w6", "level": 2},
    {"problem": "w7", "answer": "w8", "level": 3},
]


# ---- sources ----------------------------------------------------------------------------


def test_hub_layout_folder_goes_through_load_dataset(tmp_path: Path) -> None:
    """A folder laid out like a hub dataset repo (data/test-*.parquet) is what
    load_dataset(name, split=...) reads for a hub name; a local copy exercises that call."""
    repo = tmp_path / "MATH-500"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    t = Task.from_dataset(repo, "problem", "answer", split="test", metric="exact_match",
                          extract="boxed")
    assert t.prompts == ["w1 w2", "w4 w5", "w7"] and t.answers == ["w3", "w6", "w8"]
    assert t.name == "MATH-500" and t.meta["split"] == "test" and t.extract == "boxed"
    assert Task.from_dataset(str(repo), "problem", "answer").prompts == ["w1 w2"]  # train
    assert len(Task.from_dataset(repo, "problem", "answer", split="test", limit=2)) == 2
    with pytest.raises(ValueError, match=r"could not load the folder with datasets\.load_dataset "
                                         r"\(split 'validation'\)"):
        Task.from_dataset(repo, "problem", "answer", split="validation")


def test_save_to_disk_dataset_and_datasetdict(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    t = Task.from_dataset(tmp_path / "single", "problem", "answer")
    assert t.answers == ["w3", "w6", "w8"] and t.name == "single"

    dd = datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([1, 2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert (tmp_path / "dict" / "dataset_dict.json").is_file()
    t = Task.from_dataset(str(tmp_path / "dict"), "problem", "answer", split="test")
    assert t.prompts == ["w4 w5", "w7"]
    assert Task.from_dataset(tmp_path / "dict", "problem", "answer").prompts == ["w1 w2"]
    with pytest.raises(ValueError, match=r"has no split 'dev' \(splits: train, test\)"):
        Task.from_dataset(tmp_path / "dict", "problem", "answer", split="dev")
    with pytest.raises(ValueError, match=r"no field 'question' \(fields: problem, answer"):
        Task.from_dataset(tmp_path / "dict", "question", "answer")


def test_unknown_hub_name_offline_says_download_first(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a local folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError) as e:
        Task.from_dataset("no-such-org/no-such-dataset", "problem", "answer", split="test",
                          config_name="sub")
    msg = str(e.value)
    assert "'no-such-org/no-such-dataset' is not a local file or folder" in msg
    assert "could not load dataset 'no-such-org/no-such-dataset' from the hub" in msg
    assert "(split 'test', config 'sub')" in msg
    assert msg.endswith("download it first (datasets.load_dataset(...).save_to_disk(DIR)) "
                        "or pass a local path")
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        Task.from_dataset("data/missing.jsonl")  # a file-like name is a missing file


def test_non_utf8_files_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"prompt": "w1", "answer": "w2"}\n{"prompt": "caf\xe9", "answer": "w2"}\n')
    with pytest.raises(ValueError, match=rf"^{p}: line 2: not valid UTF-8 \(byte 48: b'\\xe9'\); "
                                         "save the file as UTF-8"):
        Task.from_dataset(p)
    c = tmp_path / "t.csv"
    c.write_bytes(b"prompt,answer\nw1,w2\nw3,\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"^{c}: line 3: not valid UTF-8 \(byte 23"):
        Task.from_dataset(c)


# ---- answer extraction ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{3} then \boxed{ 4 }", "4"),
        (r"\boxed{\sqrt{\frac{a}{b}}} ok", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{\{1, 2\}}", r"\{1,2\}"),
        (r"\boxed {\$5}", "5"),
        (r"\boxed{\$1,000.}", "1000"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1,000}", "1000"),
        ("no box, the total is 12 then 15.", "15"),
        (r"cut off \boxed{\frac{1}{2", "2"),  # an unclosed box falls back to the last number
        ("nothing here", ""),
    ],
)
def test_extract_boxed(text: str, want: str) -> None:
    assert extract_boxed(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("it costs $1,000.", "1000"), ("-3.5 degrees", "-3.5"), ("$5", "5"), ("1,2 and 3", "3"),
     ("12,345,678 people", "12345678"), ("x = -.5", "-.5"), ("no digits", "")],
)
def test_extract_last_number(text: str, want: str) -> None:
    assert extract_last_number(text) == want


def test_normalize_and_matches() -> None:
    assert normalize_answer(" $1,000 ") == "1000"
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_answer("{5}.") == "5"
    assert normalize_answer("{1}+{2}") == "{1}+{2}"  # not one outer group: kept
    boxed = Task("m", ["w1"], [r" \frac{1}{2} "], metric="exact_match", extract="boxed")
    assert boxed.matches(r"\frac{1}{2}", boxed.answers[0])
    assert boxed.matches("1000", "$1,000") and not boxed.matches("100", "1000")
    plain = Task("p", ["w1"], ["$5"], metric="exact_match")
    assert plain.matches("$5", " $5 ") and not plain.matches("5", "$5")  # strip only
    assert boxed.extract_fn is extract_boxed and boxed.to_dict()["extract"] == "boxed"


# ---- multiple choice --------------------------------------------------------------------


def test_mc_records_index_or_text_and_errors(tmp_path: Path) -> None:
    assert "mc_logprob" in METRICS and "mc_logprob" in ACCURACY_METRICS
    recs = [
        {"question": "w1", "choices": ["w2", "w3", "w4"], "label": 2},
        {"question": "w5", "choices": ["w6", "w7"], "label": "w6"},
    ]
    t = Task.from_records(recs, name="mc", prompt_field="question", answer_field="label",
                          metric="mc_logprob")
    assert t.answers == ["w4", "w6"] and t.correct_choice == [2, 0]
    assert t.choices == [["w2", "w3", "w4"], ["w6", "w7"]]
    sub = t.subset([1])
    assert sub.choices == [["w6", "w7"]] and sub.correct_choice == [0]
    assert t.to_records()[0]["choices"] == ["w2", "w3", "w4"]

    bad = [
        ({"question": "w1", "label": 0}, r"record 0: no field 'choices'"),
        ({"question": "w1", "choices": "w2 w3", "label": 0}, r"must be a list of 2\+ strings"),
        ({"question": "w1", "choices": ["w2", "w3"], "label": 5},
         r"answer index 5 is out of range for 2 choices"),
        ({"question": "w1", "choices": ["w2", "w3"], "label": "w9"},
         r"answer 'w9' is neither one of the choices"),
        ({"question": "w1", "choices": ["w2", None], "label": 0}, r"'choices\[1\]' is missing"),
    ]
    for rec, needle in bad:
        with pytest.raises(ValueError, match=needle):
            Task.from_records([rec], name="mc", prompt_field="question", answer_field="label",
                              metric="mc_logprob")
    with pytest.raises(ValueError, match="metric 'mc_logprob' needs choices"):
        Task("t", ["w1"], ["w2"], metric="mc_logprob")
    with pytest.raises(ValueError, match=r"example 0: the answer 'w9' is not one of its choices"):
        Task("t", ["w1"], ["w9"], metric="mc_logprob", choices=[["w2", "w3"]])

    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ft = Task.from_dataset(p, "question", "label", metric="mc_logprob")
    assert ft.correct_choice == [2, 0] and ft.meta["fields"]["choices"] == "choices"
    with pytest.raises(ValueError, match=r"needs a choices field, but the dataset has no field "
                                         r"'options'"):
        Task.from_dataset(p, "question", "label", metric="mc_logprob", choices_field="options")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), words=["q", "x", "y"])


def _bigram(probs: dict[int, list[float]], vocab: int):
    """A toy model: the next-token distribution depends only on the current token."""
    table = torch.full((vocab, vocab), 1.0 / vocab).log()
    for tok_id, p in probs.items():
        table[tok_id] = torch.tensor(p).log()

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    return logits_fn


def test_choice_logprobs_on_a_hand_computable_model(tok) -> None:
    q, x, y = 4, 5, 6
    assert tok("q x y", add_special_tokens=False)["input_ids"] == [q, x, y]
    v = len(tok)
    lo = [0.1] * 5, [0.02] * 5, [0.02] * 5  # mass on <pad> <bos> <eos> <unk> q
    fn = _bigram({q: [*lo[0], 0.25, 0.25],  # after q: x or y, evenly
                  x: [*lo[1], 0.1, 0.8],  # after x: mostly y
                  y: [*lo[2], 0.7, 0.2]}, v)  # after y: mostly x
    t = Task("mc", ["q", "q x"], ["x y", "x"], metric="mc_logprob",
             choices=[["x y", "y y", "x"], ["x", "y"]])
    cb = t.encode_choices(tok, prepend_bos=True)
    assert cb.example.tolist() == [0, 0, 0, 1, 1] and cb.choice.tolist() == [0, 1, 2, 0, 1]
    # Each row is encoded exactly like answer_logprob encodes (prompt, answer).
    ref = encode(tok, ["q"] * 3 + ["q x"] * 2, ["x y", "y y", "x", "x", "y"], prepend_bos=True)
    assert torch.equal(cb.enc.input_ids, ref.input_ids)
    assert torch.equal(cb.enc.prompt_len, ref.prompt_len)

    lp = choice_logprobs(fn, cb, batch_size=2)
    want = [math.log(0.25) + math.log(0.8),  # q->x, x->y
            math.log(0.25) + math.log(0.2),  # q->y, y->y
            math.log(0.25),                  # q->x
            math.log(0.1),                   # x->x
            math.log(0.8)]                   # x->y
    assert lp.dtype == torch.float64
    assert torch.allclose(lp, torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # Total, not per-token, log-prob: "x" (log .25) beats "x y" (log .2) on example 0,
    # though "x y" has the higher mean per-token log-prob (log .447).
    assert mc_scores(lp, cb, [2, 1]).tolist() == [1.0, 1.0]
    assert mc_scores(lp, cb, [0, 0]).tolist() == [0.0, 0.0]
    assert t.correct_choice == [0, 0]
    # Ties score 0: a uniform model is indifferent between one-token choices.
    flat = choice_logprobs(_bigram({}, v), cb)
    assert mc_scores(flat, cb, [2, 0]).tolist() == [1.0, 0.0]  # ex 0: 1 token beats 2; ex 1 tie
    with pytest.raises(ValueError, match="2 examples but 1 correct"):
        mc_scores(lp, cb, [0])
    with pytest.raises(ValueError, match="example 1: choice 1 is empty after tokenization"):
        encode_choices(tok, ["q", "q"], [["x", "y"], ["x", " "]], prepend_bos=False)


# ---- context length ---------------------------------------------------------------------


def test_context_limit_from_hf_configs() -> None:
    from transformers import GPT2Config, LlamaConfig

    assert context_limit(GPT2Config(n_positions=32)) == 32
    assert context_limit(LlamaConfig(max_position_embeddings=64)) == 64
    assert context_limit({"n_ctx": 128}) == 128
    assert context_limit({"hidden_size": 8}) is None


def test_check_context_names_task_line_and_limit(tok, tmp_path: Path) -> None:
    p = tmp_path / "long.jsonl"
    p.write_text(
        json.dumps({"prompt": "q x", "answer": "y"}) + "\n\n"
        + json.dumps({"prompt": "q x y x y x", "answer": "y x"}) + "\n"
    )
    t = Task.from_dataset(p)
    enc = t.encode(tok, prepend_bos=True)
    t.check_context(enc, 9)
    t.check_context(enc, None)
    with pytest.raises(ValueError, match=r"task 'long': example 1 \(line 3\) needs 9 tokens "
                                         r"\(7 prompt \+ 2 answer\), more than the model's "
                                         r"context of 8; 1 example\(s\) are too long"):
        t.check_context(enc, 8)
    with pytest.raises(ValueError, match=r"example 0 \(line 3\) needs 11 tokens \(7 prompt \+ "
                                         r"2 answer \+ 2 to generate\)"):
        t.subset([1]).check_context(t.subset([1]).encode(tok, True), 10, extra=2)
    mc = Task("mc", ["q", "q x y x"], ["x", "y"], metric="mc_logprob",
              choices=[["x", "y"], ["x y x", "y"]])
    with pytest.raises(ValueError, match=r"task 'mc': example 1 needs 8 tokens"):
        mc.check_context(mc.encode_choices(tok, prepend_bos=True), 7)


def test_check_fits_encodes_as_the_metric_will(tok) -> None:
    from transformers import GPT2Config

    cfg = GPT2Config(n_positions=6)
    t = Task("g", ["q x y"], ["x"], metric="exact_match", max_new_tokens=2)
    t.check_fits(tok, True, cfg)  # 1 BOS + 3 prompt + 2 generated = 6
    with pytest.raises(ValueError, match=r"needs 7 tokens \(4 prompt \+ 0 answer \+ 3 to "
                                         r"generate\), more than the model's context of 6"):
        t.replace(max_new_tokens=3).check_fits(tok, True, cfg)
    mc = Task("mc", ["q x"], ["x"], metric="mc_logprob", choices=[["x", "y x y x"]])
    with pytest.raises(ValueError, match=r"task 'mc': example 0 needs 7 tokens"):
        mc.check_fits(tok, True, cfg)
    mc.check_fits(tok, True, {"hidden_size": 4})  # no declared limit: nothing to check
    Task("l", ["q x y x"], ["y"], metric="answer_logprob").check_fits(tok, True, cfg)
    with pytest.raises(ValueError, match="needs 7 tokens"):
        Task("l", ["q x y x"], ["y y"], metric="answer_logprob").check_fits(tok, True, cfg)
