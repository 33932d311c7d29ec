"""Tasks: construction, validation messages, loading through `datasets`, splits, built-ins."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tl_transplant.tasks.builtin import DEFAULT_WORDS, builtin_task, list_builtin_tasks
from tl_transplant.tasks.extract import EXTRACTORS, resolve_extract
from tl_transplant.tasks.task import Task
from tl_transplant.testing import word_tokenizer

RECORDS = [
    {"prompt": "w1 w2", "answer": " w3", "wrong_answers": [" w9"]},
    {"prompt": "w4 w5", "answer": " w6", "wrong_answers": " w8"},
    {"prompt": "w7", "answer": 42, "wrong_answers": [" w1", " w2"]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), words=[*DEFAULT_WORDS, "42"])


def test_from_records_fields_and_coercion():
    t = Task.from_records(RECORDS, name="r", metric="logit_diff")
    assert t.prompts == ["w1 w2", "w4 w5", "w7"]
    assert t.answers == [" w3", " w6", "42"]  # numbers become text
    assert t.wrong_answers == [[" w9"], [" w8"], [" w1", " w2"]]  # a string is one wrong answer
    assert len(t) == 3 and t.metric == "logit_diff"
    custom = Task.from_records(
        [{"q": "w1", "a": "w2"}], prompt_field="q", answer_field="a", name="c"
    )
    assert custom.prompts == ["w1"] and custom.wrong_answers is None


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"prompt": "w1"}, "record 1: no field 'answer'"),
        ({"prompt": "w1", "answer": None}, "record 1: field 'answer' is missing or null"),
        ({"prompt": {"x": 1}, "answer": "w2"}, "record 1: field 'prompt' must be a string"),
        ({"prompt": "   ", "answer": "w2"}, "record 1: field 'prompt' is empty"),
        ({"prompt": "w1", "answer": True}, "record 1: field 'answer' must be a string"),
        (
            {"prompt": "w1", "answer": "w2", "wrong_answers": []},
            "record 1: field 'wrong_answers' is an",
        ),
        ("w1 w2", "record 1: expected a mapping"),
    ],
)
def test_from_records_malformed_names_row_and_field(bad, needle):
    with pytest.raises(ValueError, match="task 'x': " + needle.replace("(", r"\(")):
        Task.from_records([RECORDS[0], bad], name="x")


def test_logit_diff_requires_wrong_answers_per_record():
    with pytest.raises(ValueError, match="record 0: field 'wrong_answers' is missing"):
        Task.from_records([{"prompt": "w1", "answer": "w2"}], metric="logit_diff")
    with pytest.raises(ValueError, match="needs wrong_answers"):
        Task("t", ["w1"], ["w2"], metric="logit_diff")


def test_task_validation_messages():
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        Task("t", ["w1"], ["w2"], metric="accuracy")
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        Task("t", ["w1", "w2"], ["w3"])
    with pytest.raises(ValueError, match="example 1: answer must be a non-empty string"):
        Task("t", ["w1", "w2"], ["w3", ""])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Task("t", ["w1"], ["w2"], max_new_tokens=0)
    with pytest.raises(ValueError, match="1 prompts but 2 wrong-answer lists"):
        Task("t", ["w1"], ["w2"], wrong_answers=[["w3"], ["w4"]])
    with pytest.raises(ValueError, match="prepend_bos"):
        Task("t", ["w1"], ["w2"], prepend_bos="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown extract"):
        Task("t", ["w1"], ["w2"], extract="nope")


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_from_dataset_jsonl_names_lines(tmp_path: Path):
    ok = [json.dumps(r) for r in RECORDS]
    p = _write_jsonl(tmp_path / "ok.jsonl", ok)
    t = Task.from_dataset(p, "prompt", "answer")
    assert t.name == "ok" and t.answers == [" w3", " w6", "42"]
    assert t.wrong_answers is not None and len(t.wrong_answers) == 3

    # A blank line shifts the line numbers; the error names the file's real line.
    p = _write_jsonl(tmp_path / "missing.jsonl", [ok[0], "", ok[1], '{"prompt": "w1"}'])
    with pytest.raises(ValueError, match="line 4: field 'answer' is missing or null"):
        Task.from_dataset(p, "prompt", "answer")

    # A type clash across lines (datasets may refuse the table): still named by line.
    p = _write_jsonl(tmp_path / "clash.jsonl", [ok[0], "", '{"prompt": "w1", "answer": {"x": 1}}'])
    with pytest.raises(ValueError, match="line 3: field 'answer' must be a string"):
        Task.from_dataset(p)

    p = _write_jsonl(tmp_path / "broken.jsonl", [ok[0], ok[1], '{"prompt": "w1", '])
    with pytest.raises(ValueError, match="line 3: invalid JSON"):
        Task.from_dataset(p)
    p = _write_jsonl(tmp_path / "array.jsonl", [ok[0], "[1, 2]"])
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        Task.from_dataset(p)


def test_from_dataset_csv_parquet_and_objects(tmp_path: Path):
    csv = tmp_path / "t.csv"
    csv.write_text("question,label\nw1 w2,w3\nw4,\n")
    with pytest.raises(ValueError, match=r"row 1 .*field 'label' is missing or null"):
        Task.from_dataset(csv, "question", "label")
    with pytest.raises(ValueError, match=r"no field 'answer' \(fields: question, label\)"):
        Task.from_dataset(csv, "question", "answer")

    ds = datasets.Dataset.from_list([{"p": "w1", "a": "w2"}, {"p": "w3", "a": "w4"}])
    pq = tmp_path / "t.parquet"
    ds.to_parquet(str(pq))
    t = Task.from_dataset(pq, "p", "a", metric="answer_logprob")
    assert (t.prompts, t.answers, t.metric) == (["w1", "w3"], ["w2", "w4"], "answer_logprob")

    t2 = Task.from_dataset(ds, "p", "a", name="mem", limit=1)
    assert t2.prompts == ["w1"] and t2.name == "mem"
    dd = datasets.DatasetDict({"test": ds})
    assert Task.from_dataset(dd, "p", "a", split="test").answers == ["w2", "w4"]
    with pytest.raises(ValueError, match="no split 'train'"):
        Task.from_dataset(dd, "p", "a")
    with pytest.raises(ValueError, match="needs a wrong-answers field"):
        Task.from_dataset(ds, "p", "a", metric="logit_diff")
    with pytest.raises(FileNotFoundError):
        Task.from_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        Task.from_dataset(tmp_path / "t.txt")


def test_split_is_deterministic_disjoint_and_label_blind():
    t = builtin_task("lookup", n=41, seed=3)
    dev, test = t.split(0.5, seed=7)
    di, ti = dev.meta["indices"], test.meta["indices"]
    assert len(di) == round(41 * 0.5) and len(di) + len(ti) == 41
    assert not set(di) & set(ti) and sorted(di + ti) == list(range(41))
    assert [t.prompts[i] for i in di] == dev.prompts
    assert dev.name == "lookup:dev" and test.meta["split"]["part"] == "test"
    again = t.split(0.5, seed=7)[0]
    assert again.meta["indices"] == di
    assert t.split(0.5, seed=8)[0].meta["indices"] != di
    relabelled = t.replace(answers=[" w0"] * len(t))  # labels do not move examples
    assert relabelled.split(0.5, seed=7)[0].meta["indices"] == di
    # nested subsets keep root indices
    sub_dev, _ = dev.split(0.5, seed=1)
    assert set(sub_dev.meta["indices"]) <= set(di)
    with pytest.raises(ValueError, match="dev_fraction"):
        t.split(1.0)
    with pytest.raises(ValueError, match="needs 2"):
        t.subset([0]).split(0.5)
    tiny = t.subset([0, 1])
    d, s = tiny.split(0.01)
    assert len(d) == 1 and len(s) == 1


def test_builtin_tasks_are_word_level_and_deterministic(tok):
    assert set(list_builtin_tasks()) == {"successor", "induction", "lookup", "first"}
    for name in list_builtin_tasks():
        a, b = builtin_task(name, n=10, seed=1), builtin_task(name, n=10, seed=1)
        assert a.prompts == b.prompts and a.answers == b.answers
        assert builtin_task(name, n=10, seed=2).prompts != a.prompts
        enc = a.encode(tok, prepend_bos=True)
        assert not bool((enc.input_ids == tok.unk_token_id).any()), name
        for m in ("next_token_acc", "logit_diff", "answer_logprob", "exact_match"):
            builtin_task(name, n=2, metric=m)


def test_builtin_task_semantics_and_custom_words():
    words = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "honey"]
    s = builtin_task("successor", words=words, n=20, span=2, n_answer=2)
    for p, a in zip(s.prompts, s.answers):
        ps, ans = p.split(), a.split()
        i = words.index(ps[0])
        assert ps == words[i : i + 2] and ans == words[i + 2 : i + 4]
    assert s.max_new_tokens == 2 and s.answers[0].startswith(" ")
    ind = builtin_task("induction", words=words, n=20, length=5, repeat=2)
    for p, a in zip(ind.prompts, ind.answers):
        ps = p.split()
        assert ps[5:] == ps[:2] and a.strip() == ps[2]
    lk = builtin_task("lookup", words=words, n=20, n_pairs=3)
    for p, a, w in zip(lk.prompts, lk.answers, lk.wrong_answers or []):
        ps = p.split()
        q = ps[:-1].index(ps[-1])
        assert a.strip() == ps[q + 1] and w[0].strip() != a.strip()
    with pytest.raises(ValueError, match="needs at least"):
        builtin_task("induction", words=words[:4])
    with pytest.raises(ValueError, match="unknown builtin task"):
        builtin_task("nope")
    with pytest.raises(ValueError, match="duplicates"):
        builtin_task("first", words=["a", "a", "b", "c"])


def test_encode_bos_rule(tok):
    t = Task("t", ["w1 w2", "w3"], [" w4", " w5 w6"])
    on, off = t.encode(tok, prepend_bos=True), t.encode(tok, prepend_bos=False)
    assert on.input_ids[0, 0].item() == tok.bos_token_id
    assert off.input_ids[0, 0].item() == tok.convert_tokens_to_ids("w1")
    assert on.prompt_len.tolist() == [3, 2] and off.prompt_len.tolist() == [2, 1]
    assert on.answer_len.tolist() == [1, 2]


def test_extractors_and_records_roundtrip():
    assert resolve_extract(None)("  w1 w2 \n") == "w1 w2"
    assert EXTRACTORS["first_word"](" w1 w2") == "w1"
    assert EXTRACTORS["first_line"]("\n a b \nc") == "a b"
    assert EXTRACTORS["last_number"]("x 1,200 then -3.5 done") == "-3.5"
    assert EXTRACTORS["last_number"]("none") == ""
    t = Task.from_records(RECORDS, name="r", extract="first_word")
    assert t.extract_fn(" w1 w2") == "w1"
    back = Task.from_records(t.to_records(), name="r")
    assert back.prompts == t.prompts and back.wrong_answers == t.wrong_answers
    d = t.to_dict()
    assert d["extract"] == "first_word" and d["n"] == 3 and "indices" not in d["meta"]
    assert "n=3" in repr(t)
