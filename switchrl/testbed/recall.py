"""Fact-patch recall: how reliably a checkpoint writes the facts a compositional answer needs.

A compositional answer is ``The number of A in X is a . The number of A in Y is b . a + b = s .
The answer is s .``; with 3-token patches each fact ends in the patch ``is a .``. Given the
reference answer so far, a checkpoint writes that patch greedily exactly when its argmax matches
the reference at all three positions, so one teacher-forced forward pass per query tells whether
the reference-patch oracle could hand both fact patches to this checkpoint. The pretraining stage
uses it as its stopping rule (see :func:`switchrl.testbed.stages.pretrain`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from switchrl.testbed.corpus import PROMPT_TEMPLATE
from switchrl.testbed.tasks import make_tasks
from switchrl.testbed.world import World

FACT_TOKENS = 9
"""Tokens of one fact sentence (``The number of A in X is a .``); its last 3 are the fact patch."""


def fact_patch_positions(prompt_len: int) -> list[int]:
    """Token positions (in prompt + answer) of the two fact patches of a compositional answer."""
    return [prompt_len + f * FACT_TOKENS + j for f in (0, 1) for j in (6, 7, 8)]


@torch.no_grad()
def fact_patch_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    world: World,
    split: str = "validation",
    batch_size: int = 256,
) -> float:
    """Share (%) of ``split``'s compositional queries whose two fact patches ``model`` writes greedily
    after the reference answer's prefix (teacher forcing; the oracle's condition for those patches)."""
    instances = make_tasks(world, "compositional", split)
    prompts = [PROMPT_TEMPLATE.format(query=i.query) for i in instances]
    texts = [p + " " + i.meta["solution"] for p, i in zip(prompts, instances)]
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for s0 in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s0 : s0 + batch_size], add_special_tokens=True, padding=True)
            p_enc = tokenizer(prompts[s0 : s0 + batch_size], add_special_tokens=True)["input_ids"]
            ids = torch.tensor(enc["input_ids"])
            mask = torch.tensor(enc["attention_mask"])
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)
            pred = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.argmax(-1)
            pad = (mask == 0).sum(1)  # left padding: shift positions by the row's pad count
            for row, p_ids in enumerate(p_enc):
                pos = [int(pad[row]) + q for q in fact_patch_positions(len(p_ids))]
                hits += all(int(pred[row, q - 1]) == int(ids[row, q]) for q in pos)
    finally:
        model.train(was_training)
    return round(100.0 * hits / max(1, len(texts)), 1)
