"""Training the switcher: the paper's recipe, then optional RL.

* :mod:`~switchrl.trainers.simulate`: simulated rollouts, the utility of each candidate at sampled
  states (the SFT labels);
* :mod:`~switchrl.trainers.sft`: supervised fine-tuning of a LoRA switcher on them (TRL ``SFTTrainer``);
* :mod:`~switchrl.trainers.rl`: the ``switchrl rl`` dispatcher to GRPO (:mod:`~switchrl.trainers.grpo`,
  TRL), a small PPO (:mod:`~switchrl.trainers.ppo`) and stable-baselines3 PPO
  (:mod:`~switchrl.trainers.sb3`), which share :mod:`~switchrl.trainers.episodes` (episode sampling)
  and :mod:`~switchrl.trainers.rl_setup` (set-up, switcher, metrics).

Submodules are imported on demand: each pulls in its own heavy dependencies (TRL, SB3).
"""
