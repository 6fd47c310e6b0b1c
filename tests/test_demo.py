"""`switchrl demo` on the testbed family: the paper's recipe beats every single checkpoint (slow)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.testbed
def test_demo_sft_switcher_beats_singles_random_and_untuned(demo_run):
    root, printed = demo_run
    out = root / "runs" / "demo"
    print(printed)
    metrics = json.loads((out / "demo.json").read_text())["metrics"]
    comp = metrics["compositional"]
    sft = comp["sft"]
    for other in ("pretrained", "finetuned", "aligned", "random"):
        # the 95% confidence intervals do not overlap
        assert sft["accuracy"] - sft["ci95"] > comp[other]["accuracy"] + comp[other]["ci95"], (other, comp)
    for task, systems in metrics.items():
        assert systems["sft"]["accuracy"] > systems["untuned"]["accuracy"], (task, systems)
    assert (out / "eval" / "report.html").is_file()
    assert "| compositional |" in (out / "eval" / "table.md").read_text()


def test_quick_demo_runs_the_whole_chain(tmp_path, monkeypatch):
    """The chain simulate -> sft -> eval -> report wires together (a tiny family, tiny sizes)."""
    from switchrl import demo
    from switchrl.testbed import build_family
    from switchrl.testbed.stages import StageConfig

    tiny = StageConfig(
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        pretrain_steps=2,
        pretrain_batch=4,
        pretrain_max_extra_steps=0,  # a tiny model never reaches the recall target: skip the extra chunks
        sft_steps=2,
        sft_batch=4,
        dpo_steps=1,
        dpo_batch=2,
    )
    monkeypatch.setenv("SWITCHRL_CACHE", str(tmp_path / "cache"))
    build_family(5, progress=False, settings=tiny)
    assert demo.run_demo(seed=5, out=tmp_path / "out", n=4, quick=True) == 0
    results = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert {"pretrained", "finetuned", "aligned", "random", "untuned", "sft"} <= set(results["systems"])
    assert (tmp_path / "out" / "eval" / "report.html").is_file()
