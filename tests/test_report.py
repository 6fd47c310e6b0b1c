"""``switchrl report``: a self-contained HTML page with the table, the share chart and every response."""

from __future__ import annotations

import argparse
import base64
import json
from html import escape

import pytest

from switchrl.errors import CheckpointError
from switchrl.eval import evaluate
from switchrl.records import EvalResponse
from switchrl.report import main, render_report, write_report
from tests.test_eval import make_config


@pytest.fixture(scope="module")
def run_dir(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return evaluate(
        make_config(tiny_family, root, systems=["singles", "random", "sft"], seeds=[0]), progress=False
    ).out_dir


def test_report_has_table_chart_and_every_response(run_dir, capsys):
    assert main(argparse.Namespace(run_dir=str(run_dir))) == 0
    path = run_dir / "report.html"
    assert str(path) in capsys.readouterr().out
    page = path.read_text()
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "responses.jsonl").read_text().splitlines()]
    for task, by_system in results["metrics"].items():  # the comparison table
        assert f"<td>{task}</td>" in page
        for system, m in by_system.items():
            assert f"<th>{system}</th>" in page
            assert f"{100 * m['accuracy']:.1f} ± " in page
    png = page.split('src="data:image/png;base64,')[1].split('"')[0]  # the embedded chart
    assert base64.b64decode(png).startswith(b"\x89PNG")
    for rec in records:  # every response, patch by patch, with the switcher's probabilities on hover
        assert escape(rec["query"]) in page
        for patch in rec["patches"]:
            assert f'title="written by {patch["name"]}' in page
            assert f">{escape(patch['text'])}</span>" in page
    assert "switcher: base " in page and "scorer failed: ValueError: boom" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_model_text_is_escaped():
    results = {
        "candidates": ["a<b", "c"],
        "systems": ["a<b"],
        "tasks": ["t"],
        "seeds": [0],
        "split": "test",
        "ci_method": "normal",
        "notes": [],
        "metrics": {
            "t": {
                "a<b": {
                    "accuracy": 0.5,
                    "ci95": None,
                    "n": 1,
                    "failures": 0,
                    "switches": 1.0,
                    "share": {"a<b": 0.5, "c": 0.5},
                    "tokens_per_s": 10.0,
                }
            }
        },
    }
    record = {
        "id": "a<b/0/t/q<1>",
        "task": "t",
        "system": "a<b",
        "seed": 0,
        "query_id": "q<1>",
        "query": "<script>alert(1)</script>",
        "reference": "&",
        "text": "<i>x</i> & y",
        "score": 1.0,
        "error": None,
        "num_tokens": 3,
        "num_switches": 1,
        "stop_reason": "eos",
        "seconds": 0.1,
        "patches": [
            {"author": 0, "name": "a<b", "text": "<i>x</i>", "probs": [0.25, 0.75]},
            {"author": 1, "name": "c", "text": " & y", "probs": None},
        ],
    }
    page = render_report(results, [record])
    assert "<script>" not in page and "<i>x</i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;i&gt;x&lt;/i&gt;" in page
    assert 'title="written by a&lt;b; switcher: a&lt;b 0.25, c 0.75"' in page
    assert "&amp; y</span>" in page


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="results.json is missing"):
        write_report(tmp_path)


def test_responses_round_trip_through_eval_response_and_a_bad_one_names_field_and_file(run_dir, tmp_path):
    lines = (run_dir / "responses.jsonl").read_bytes().splitlines()
    for line in lines:  # the model is the record: same keys, values and bytes on disk
        rec = EvalResponse.model_validate(json.loads(line))
        assert json.dumps(rec.model_dump(mode="json"), ensure_ascii=False).encode() == line
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "results.json").write_bytes((run_dir / "results.json").read_bytes())
    bad = json.loads(lines[1])
    bad["patches"][0]["author"] = "base"
    (bad_dir / "responses.jsonl").write_text("\n".join([lines[0].decode(), json.dumps(bad)]) + "\n")
    with pytest.raises(CheckpointError) as err:
        write_report(bad_dir)
    assert str(err.value).count("\n") == 0
    assert f"responses.jsonl:2: record {bad['id']!r} is not a valid EvalResponse" in str(err.value)
    assert "patches.0.author: Input should be a valid integer" in str(err.value)
