"""JSONL task files and Hugging Face dataset loading."""

from __future__ import annotations

import json
import os

import pytest

from switchrl.tasks import TaskFileError, TaskInstance, load_hf_dataset, load_jsonl, save_jsonl


def _write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_fields_defaults_and_meta(tmp_path):
    path = _write(
        tmp_path / "tasks.jsonl",
        json.dumps({"id": "q-1", "query": "What is 2+2?", "reference": "4", "task": "math", "level": 1}),
        "",  # blank lines are skipped but still counted
        json.dumps({"query": "Capital of France?", "reference": "Paris"}),
        json.dumps({"id": 7, "query": "How many legs?", "reference": 4, "choices": ["3", "4"]}),
    )
    a, b, c = load_jsonl(path, task="qa")
    assert (a.id, a.task, a.reference, a.meta) == ("q-1", "math", "4", {"level": 1})
    assert (b.id, b.task, b.query, b.meta) == ("3", "qa", "Capital of France?", {})  # id = line number
    assert (c.id, c.reference, c.meta) == ("7", "4", {"choices": ["3", "4"]})
    assert load_jsonl(path)[1].task == "default"


def test_load_jsonl_custom_field_names(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", json.dumps({"qid": 0, "question": "q?", "answer": "so\n#### 72"}))
    (inst,) = load_jsonl(path, task="gsm8k", query_field="question", reference_field="answer", id_field="qid")
    assert (inst.id, inst.query, inst.reference, inst.task, inst.meta) == (
        "0",
        "q?",
        "so\n#### 72",
        "gsm8k",
        {},
    )


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"query": "a", "reference": "b"}', '{"query": "a", "reference": '],
            r"tasks.jsonl:2: invalid JSON",
        ),
        (['{"reference": "b"}'], r"tasks.jsonl:1: missing field 'query'"),
        (['{"query": "a"}'], r"tasks.jsonl:1: missing field 'reference'"),
        (['{"query": "   ", "reference": "b"}'], r"tasks.jsonl:1: field 'query' is empty"),
        (['{"query": 3, "reference": "b"}'], r"tasks.jsonl:1: field 'query' must be a string, got int"),
        (
            ['{"query": "a", "reference": ["b"]}'],
            r"tasks.jsonl:1: field 'reference' must be a string or a number",
        ),
        (
            ['{"query": "a", "reference": true}'],
            r"tasks.jsonl:1: field 'reference' must be a string or a number",
        ),
        (
            ['{"id": 1.5, "query": "a", "reference": "b"}'],
            r"tasks.jsonl:1: field 'id' must be a string or an integer",
        ),
        (['{"id": "", "query": "a", "reference": "b"}'], r"tasks.jsonl:1: field 'id' is empty"),
        (
            ['{"query": "a", "reference": "b", "task": ""}'],
            r"tasks.jsonl:1: field 'task' must be a non-empty string",
        ),
        (['["query", "reference"]'], r"tasks.jsonl:1: expected a JSON object, got list"),
        (
            [
                '{"id": "x", "query": "a", "reference": "b"}',
                "",
                '{"id": "x", "query": "c", "reference": "d"}',
            ],
            r"tasks.jsonl:3: duplicate id 'x' in task 'default' \(first at .*tasks.jsonl:1\)",
        ),
        (
            ['{"query": "a", "reference": "b"}', '{"id": "1", "query": "c", "reference": "d"}'],
            r"tasks.jsonl:2: duplicate id '1'",
        ),  # an explicit id may clash with a line-number id
        ([""], r"tasks.jsonl: no task instances"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path / "tasks.jsonl", *lines)
    with pytest.raises(TaskFileError, match=message):
        load_jsonl(path)


def test_same_id_in_different_tasks_is_allowed(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl",
        json.dumps({"id": 0, "query": "a", "reference": "b", "task": "t1"}),
        json.dumps({"id": 0, "query": "c", "reference": "d", "task": "t2"}),
    )
    assert [(i.task, i.id) for i in load_jsonl(path)] == [("t1", "0"), ("t2", "0")]


def test_load_jsonl_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="task file not found: .*missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    path = _write(tmp_path / "t.jsonl", json.dumps({"query": "a", "reference": "b"}))
    with pytest.raises(ValueError, match="query_field must be a non-empty string"):
        load_jsonl(path, query_field="")
    with pytest.raises(ValueError, match="task must be a non-empty string or None"):
        load_jsonl(path, task=" ")


def test_save_load_round_trip(tmp_path):
    instances = [
        TaskInstance("a", "What is 2+2?", "4", "math", {"level": 1, "tags": ["easy"], "note": "é ✓"}),
        TaskInstance("b", "Line one\nline two", "", "qa"),
        TaskInstance("a", "same id, other task", "x", "qa", {"nested": {"k": [1, 2.5, None]}}),
    ]
    path = save_jsonl(instances, tmp_path / "out" / "tasks.jsonl")
    loaded = load_jsonl(path)
    assert [(i.id, i.query, i.reference, i.task, i.meta) for i in loaded] == [
        (i.id, i.query, i.reference, i.task, i.meta) for i in instances
    ]
    assert [p.name for p in path.parent.iterdir()] == ["tasks.jsonl"]  # no temporary file left behind


def test_save_jsonl_is_atomic_and_validates(tmp_path):
    path = save_jsonl([TaskInstance("a", "q", "r")], tmp_path / "t.jsonl")
    before = path.read_text()
    bad = [TaskInstance("b", "q", "r"), TaskInstance("c", "q", "r", meta={"obj": object()})]
    with pytest.raises(ValueError, match="task instance 'c': meta is not JSON-serialisable"):
        save_jsonl(bad, path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["t.jsonl"]  # old file intact
    with pytest.raises(ValueError, match=r"meta keys \['query'\] clash"):
        save_jsonl([TaskInstance("a", "q", "r", meta={"query": "x"})], path)
    with pytest.raises(ValueError, match="duplicate id 'a' in task 'default'"):
        save_jsonl([TaskInstance("a", "q", "r"), TaskInstance("a", "q2", "r")], path)
    with pytest.raises(TypeError, match="expects TaskInstance objects, got dict"):
        save_jsonl([{"query": "q"}], path)


def test_load_hf_dataset_from_disk_and_files(tmp_path):
    import datasets

    rows = [
        {"question": "q0", "answer": "#### 1", "source": "s"},
        {"question": "q1", "answer": "#### 2", "source": "t"},
    ]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    for target in ("dd", "single"):
        loaded = load_hf_dataset(tmp_path / target, "test", "question", "answer", task="gsm")
        assert [(i.id, i.query, i.reference, i.task, i.meta) for i in loaded] == [
            ("0", "q0", "#### 1", "gsm", {"source": "s"}),
            ("1", "q1", "#### 2", "gsm", {"source": "t"}),
        ]
    with pytest.raises(TaskFileError, match=r"no split 'train'; available: \['test'\]"):
        load_hf_dataset(tmp_path / "dd", "train", "question", "answer")
    with pytest.raises(
        TaskFileError,
        match=r"missing column\(s\) \['query', 'reference'\]; columns: \['question', 'answer', 'source'\]",
    ):
        load_hf_dataset(tmp_path / "single", "train")

    path = save_jsonl([TaskInstance("x", "q", "r", "t", {"k": 1})], tmp_path / "t.jsonl")
    (inst,) = load_hf_dataset(path, cache_dir=str(tmp_path / "cache"))
    assert (inst.id, inst.query, inst.reference, inst.task, inst.meta) == ("x", "q", "r", "t", {"k": 1})


def test_load_hf_dataset_errors(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(TaskFileError, match=r"unsupported file type '.txt'"):
        load_hf_dataset(tmp_path / "data.txt")
    with pytest.raises(
        TaskFileError, match=r"cannot load dataset 'no-such-org/no-such-dataset' .*need network access"
    ):
        load_hf_dataset("no-such-org/no-such-dataset", cache_dir=str(tmp_path / "cache"))
