"""SFT of the switcher through TRL: examples in the single sequence format, a LoRA adapter that learns."""

from __future__ import annotations

import pytest
import torch

from switchrl.backends import CandidatePool, Trace
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.config import CandidateConfig, SwitchGenerationConfig
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.run_config import RunConfig
from switchrl.tasks.base import TaskInstance
from switchrl.trainers.sft import build_examples, train_sft
from switchrl.trainers.simulate import SimulateWorker, make_items


@pytest.fixture()
def records(tiny_family):
    pool = CandidatePool(
        [TransformersBackend.from_pretrained(f"c{i}", str(p)) for i, p in enumerate(tiny_family)],
        patch_tokens=2,
        seed=0,
    )
    instances = [
        TaskInstance(id=f"q{i}", query=q, reference="x", task="toy")
        for i, q in enumerate(["the town", "a red bridge", "one two three", "the park is"])
    ]

    # a scorer that makes candidate c1's next patch the best one at every state
    def scorer(query, response, reference, **meta):
        return 0.0

    recs = SimulateWorker(pool, {"*": scorer}, k=2, max_new_tokens=6, seed=0).process(
        make_items(instances, 2)
    )
    for r in recs:  # a clear signal to learn: c1 is always best
        r["utilities"], r["label"], r["label_name"], r["all_equal"] = [0.0, 1.0, 0.0], 1, "c1", False
    return recs


def test_examples_end_in_the_label_token(records, tiny_family):
    switcher = LMSwitcher.from_base(str(tiny_family[0]), ["c0", "c1", "c2"])
    ds = build_examples(records, switcher.sequence)
    assert len(ds) == len(records)
    for row in ds:
        assert row["input_ids"][-1] == switcher.sequence.label_ids[1]
        assert [i for i, t in enumerate(row["labels"]) if t != -100] == [len(row["input_ids"]) - 1]


def test_sft_learns_the_label_and_round_trips(records, tiny_family, tmp_path):
    cands = [CandidateConfig(name=f"c{i}", path=str(p)) for i, p in enumerate(tiny_family)]
    config = RunConfig(
        candidates=cands,
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6),
        sft={
            "base": str(tiny_family[0]),
            "out_dir": str(tmp_path / "sft"),
            "max_steps": 30,
            "batch_size": 8,
            "learning_rate": 5e-3,
        },
    )
    before = LMSwitcher.from_base(str(tiny_family[0]), ["c0", "c1", "c2"], greedy=True)
    out = train_sft(config, records)
    after = LMSwitcher.from_pretrained(out, greedy=True)
    probe = [
        Trace(key=f"p{i}", query=q, max_new_tokens=6) for i, q in enumerate(["the town", "one two three"])
    ]
    p_before = torch.softmax(before.label_logits(probe), -1)[:, 1]
    p_after = torch.softmax(after.label_logits([t.fork(t.key + "'") for t in probe]), -1)[:, 1]
    assert (p_after > 0.9).all() and (p_after > p_before).all()
    assert [d.action for d in after.decide(probe)] == [1, 1]
    # restored exactly: a second load gives the same probabilities
    again = LMSwitcher.from_pretrained(out, greedy=True)
    assert torch.allclose(again.label_logits(probe), after.label_logits(probe), atol=1e-5)


def test_sft_init_trains_a_saved_switcher_further(records, tiny_family, tmp_path):
    """``sft.init`` (round 2 of on-policy labels): the saved switcher's adapter is the start, and it trains."""
    cands = [CandidateConfig(name=f"c{i}", path=str(p)) for i, p in enumerate(tiny_family)]

    def config(name: str, **sft) -> RunConfig:
        return RunConfig(
            candidates=cands,
            generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6),
            sft={"base": str(tiny_family[0]), "out_dir": str(tmp_path / name), "batch_size": 8, **sft},
        )

    round1 = train_sft(config("r1", max_steps=30, learning_rate=5e-3), records)
    c2_best = [{**r, "utilities": [0.0, 0.0, 1.0], "label": 2, "label_name": "c2"} for r in records]
    few = {"max_steps": 2, "learning_rate": 1e-3}
    round2 = train_sft(config("r2", init=str(round1), **few), c2_best)
    fresh = train_sft(config("fresh", **few), c2_best)
    probe = [Trace(key="p", query="the town", max_new_tokens=6)]

    def probs(path) -> torch.Tensor:
        return torch.softmax(LMSwitcher.from_pretrained(path).label_logits(probe), -1)[0]

    p1, p2, p_fresh = probs(round1), probs(round2), probs(fresh)
    assert p2[1] > 0.5 > p_fresh[1]  # round 2 started from round 1's "c1", a fresh adapter did not
    assert p2[2] > p1[2]  # and trained: toward its own labels
