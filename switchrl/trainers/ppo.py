"""A small, honest PPO for the LM switcher (TRL 1.16 ships no ``PPOTrainer``).

What it is, exactly:

* **Rollouts**: the same episode sampler as GRPO (:func:`switchrl.trainers.episodes.sample_episodes`):
  ``rl.queries_per_step`` queries x ``rl.num_generations`` episodes, every live trace advanced in
  batched pool calls, the switcher sampling from its label distribution (``rl.top_p``,
  ``rl.temperature``). ``credit: fork`` works too.
* **Actions**: the sampled label tokens only (patch tokens are the environment's; forced labels are
  skipped). The policy is the softmax over the label tokens (:meth:`LMSwitcher.label_logprobs`), the
  same restricted distribution the switcher samples from.
* **Return**: the terminal reward (task score on the response minus ``rl.switch_cost_at(step)`` per switch),
  undiscounted, so every decision of an episode has return R (GAE with gamma = lambda = 1).
* **Value**: a linear head on the switcher's final hidden state at each decision (read from the
  LM head's input with a forward hook, so no second forward pass); the value loss does not move
  the LoRA weights (the features are detached). Advantage = R - V(s), normalised over the batch.
* **Update**: ``ppo.epochs`` passes of minibatches (``ppo.minibatch_size`` episodes) of the clipped
  objective ``-min(r A, clip(r, 1-eps, 1+eps) A)`` with ``r = pi(a|s) / mu(a|s)``, ``mu`` the
  behaviour log-prob recorded while sampling, plus ``ppo.value_coef`` x MSE(V, R) minus
  ``ppo.entropy_coef`` x entropy of the switch distribution. Only the LoRA (and trainable label
  rows) of the switcher and the value head are optimised (AdamW); the model stays in eval mode
  (no dropout), so ``mu`` and ``pi`` are computed the same way.
* **Warm start**: ``rl.init`` = a saved (SFT) switcher directory; otherwise a fresh LoRA on ``rl.base``.
* **Checkpoints**: ``<out>/checkpoint-N/state.pt`` (trainable weights, value head, optimiser, step);
  a rerun resumes from the last one. Metrics go to ``<out>/metrics.jsonl`` (and TensorBoard / W&B).

There is no KL penalty to a reference policy (the clip is the only trust region); the logged
``kl`` is the usual estimate ``mean(log mu - log pi)`` over each batch after its update.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.trainers.episodes import Episode, sample_episodes
from switchrl.trainers.rl_setup import (
    MetricsLogger,
    RLResult,
    RLSetup,
    build_switcher,
    check_failures,
    claim_out_dir,
    save_switcher,
    switch_stats,
    zero_variance_share,
)
from switchrl.utils.seeding import generator


@contextmanager
def capture_hidden(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``store["hidden"]`` holds the input of ``model``'s LM head from the last forward."""
    store: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store["hidden"] = inputs[0]

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class EpisodeBatch:
    """Episodes as right-padded tensors: ids, attention mask, trained label positions (-1 = padding),
    actions, behaviour log-probs, and the return of each decision."""

    def __init__(self, episodes: Sequence[Episode], returns: Sequence[float], pad_token_id: int):
        n = len(episodes)
        length = max(len(e.encoded.input_ids) for e in episodes)
        labels = [[j for j, t in enumerate(e.trained) if t] for e in episodes]
        width = max(1, max(len(j) for j in labels))
        self.input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
        self.attention_mask = torch.zeros((n, length), dtype=torch.long)
        self.positions = torch.full((n, width), -1, dtype=torch.long)
        self.actions = torch.zeros((n, width), dtype=torch.long)
        self.old_logprobs = torch.zeros((n, width))
        self.returns = torch.zeros((n, width))
        for i, (e, js) in enumerate(zip(episodes, labels)):
            ids = e.encoded.input_ids
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.attention_mask[i, : len(ids)] = 1
            for k, j in enumerate(js):
                self.positions[i, k] = e.encoded.label_positions[j]
                self.actions[i, k] = e.encoded.actions[j]
                self.old_logprobs[i, k] = e.logprobs[j]
                self.returns[i, k] = returns[i]
        self.valid = self.positions >= 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class PPOLearner:
    """The clipped-objective update of one batch (see the module docstring)."""

    def __init__(self, switcher: LMSwitcher, setup: RLSetup):
        self.switcher, self.rl, self.opts = switcher, setup.rl, setup.rl.ppo
        self.params = [p for p in switcher.model.parameters() if p.requires_grad]
        hidden = switcher.model.get_input_embeddings().weight.shape[1]
        self.value = torch.nn.Linear(hidden, 1).to(switcher.lm.device)
        torch.nn.init.zeros_(self.value.weight)
        torch.nn.init.zeros_(self.value.bias)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.params, "lr": self.rl.learning_rate},
                {"params": self.value.parameters(), "lr": self.opts.value_learning_rate},
            ]
        )

    def evaluate(self, batch: EpisodeBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label log-probs [b, P, n] and values [b, P] (from detached features) of ``rows``."""
        with capture_hidden(self.switcher.model) as store:
            logp = self.switcher.label_logprobs(
                batch.input_ids[rows], batch.attention_mask[rows], batch.positions[rows]
            )
        hidden = store["hidden"].detach().float()
        index = (batch.positions[rows].clamp(min=1) - 1).to(hidden.device)
        feats = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return logp, self.value(feats).squeeze(-1).cpu()

    def update(self, batch: EpisodeBatch, step: int) -> dict[str, float]:
        valid = batch.valid
        with torch.no_grad():
            _, values = self.evaluate(batch, torch.arange(len(batch)))
        adv = batch.returns - values
        mean, std = adv[valid].mean(), adv[valid].std() if int(valid.sum()) > 1 else torch.tensor(1.0)
        adv = ((adv - mean) / (std + 1e-8)) * valid
        eps, stats = self.rl.clip_epsilon, {"clip_fraction": [], "kl": [], "entropy": [], "value_loss": []}
        for epoch in range(self.opts.epochs):
            order = torch.randperm(
                len(batch), generator=generator(self.rl.seed, "ppo-minibatch", step, epoch)
            )
            for rows in order.split(self.opts.minibatch_size):
                mask = valid[rows].float()
                if not mask.any():
                    continue
                logp_all, v = self.evaluate(batch, rows)
                logp_all = logp_all.cpu()
                new = logp_all.gather(-1, batch.actions[rows].unsqueeze(-1)).squeeze(-1)
                ratio = torch.exp(new - batch.old_logprobs[rows])
                a = adv[rows]
                policy_loss = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
                entropy = -(logp_all.exp() * logp_all).sum(-1)
                value_loss = (v - batch.returns[rows]) ** 2
                n = mask.sum()
                loss = (
                    (policy_loss + self.opts.value_coef * value_loss - self.opts.entropy_coef * entropy)
                    * mask
                ).sum() / n
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.opts.max_grad_norm)
                self.optimizer.step()
                if epoch == self.opts.epochs - 1:
                    with torch.no_grad():
                        stats["clip_fraction"].append(
                            float((((ratio - 1).abs() > eps).float() * mask).sum() / n)
                        )
                        stats["kl"].append(float(((batch.old_logprobs[rows] - new) * mask).sum() / n))
                        stats["entropy"].append(float((entropy * mask).sum() / n))
                        stats["value_loss"].append(float((value_loss * mask).sum() / n))
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path, step: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in self.switcher.model.named_parameters()}
        state = {
            "step": step,
            "policy": {names[id(p)]: p.detach().cpu() for p in self.params},
            "value": self.value.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        tmp = directory / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(directory / "state.pt")

    def load(self, path: Path) -> int:
        state = torch.load(path, map_location="cpu", weights_only=True)
        named = dict(self.switcher.model.named_parameters())
        with torch.no_grad():
            for name, value in state["policy"].items():
                named[name].copy_(value)
        self.value.load_state_dict(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])


def last_checkpoint(out_dir: Path) -> Path | None:
    """The ``checkpoint-N/state.pt`` with the largest N, if any."""
    found = [
        (int(m.group(1)), p)
        for p in out_dir.glob("checkpoint-*/state.pt")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))
    ]
    return max(found)[1] if found else None


def train_ppo(setup: RLSetup, switcher: LMSwitcher | None = None) -> RLResult:
    """Train the switcher with PPO; saves it to ``<rl.out_dir>/switcher`` and the log to ``rl_log.json``."""
    rl, out = setup.rl, setup.out_dir
    claim_out_dir(setup, "ppo")
    switcher = switcher or build_switcher(setup)
    switcher.model.eval()
    learner = PPOLearner(switcher, setup)
    checkpoint = last_checkpoint(out)
    start = learner.load(checkpoint) if checkpoint is not None else 0
    max_new_tokens = setup.resolved.generation.max_new_tokens
    logger = MetricsLogger(out, rl.report_to, config=rl.model_dump())
    logged = logger.path.read_text().splitlines() if start and logger.path.exists() else []
    history = [json.loads(line) for line in logged]
    history = [h for h in history if h["step"] <= start]
    n_queries = min(rl.queries_per_step, len(setup.instances))
    for step in tqdm(range(start, rl.steps), desc="ppo", unit="update", initial=start, total=rl.steps):
        order = torch.randperm(len(setup.instances), generator=generator(rl.seed, "ppo-queries", step))
        chosen = [setup.instances[i] for i in order[:n_queries].tolist()]
        episodes = sample_episodes(
            switcher,
            setup.pool,
            [i.query for i in chosen],
            rl.num_generations,
            f"ppo/s{step}",
            max_new_tokens,
            credit=rl.credit,
            seed=rl.seed,
            scheduling=setup.resolved.generation.scheduling(),
        )
        instances = [inst for inst in chosen for _ in range(rl.num_generations)]
        scores, failures = setup.rewards.score(instances, [e.trace.text for e in episodes])
        cost = rl.switch_cost_at(step)
        returns = [s - cost * e.trace.num_switches for s, e in zip(scores, episodes)]
        batch = EpisodeBatch(episodes, returns, switcher.lm.pad_token_id)
        metrics = learner.update(batch, step)
        metrics.update(
            {
                "reward": sum(returns) / len(returns),
                "switch_cost": cost,
                "score": sum(scores) / len(scores),
                "score/failures": float(failures),
                "frac_reward_zero_std": zero_variance_share(returns, rl.num_generations),
                **switch_stats([e.trace.authors for e in episodes], setup.names),
            }
        )
        switcher.reset_cache()
        if (step + 1) % rl.logging_steps == 0 or step + 1 == rl.steps:
            logger.log(step + 1, metrics)
        history.append({"step": step + 1, **metrics})
        if (step + 1) % rl.save_steps == 0 or step + 1 == rl.steps:
            learner.save(out / f"checkpoint-{step + 1}", step + 1)
    logger.close()
    policy_dir = save_switcher(switcher, out / "switcher")
    torch.save(learner.value.state_dict(), out / "value_head.pt")
    (out / "rl_log.json").write_text(
        json.dumps({"algo": "ppo", "credit": rl.credit, "history": history}, indent=2)
    )
    check_failures(setup)
    return RLResult(out, policy_dir, history)
