"""Rewards: the scorer protocol, built-in scorers, and a registry of named / imported / plug-in scorers."""

from switchrl.rewards.base import Scorer, ScoreResult, safe_score, safe_score_batch
from switchrl.rewards.builtin import (
    exact_match,
    extract_choice,
    extract_number,
    multiple_choice,
    normalize_answer,
    numeric,
    rouge_l,
    token_f1,
)
from switchrl.rewards.registry import (
    ENTRY_POINT_GROUP,
    RewardConfig,
    RewardTerm,
    RewardTermConfig,
    WeightedScorer,
    list_scorers,
    register_scorer,
    resolve_reward,
    resolve_scorer,
    scorer_name,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RewardConfig",
    "RewardTermConfig",
    "ScoreResult",
    "Scorer",
    "WeightedScorer",
    "RewardTerm",
    "exact_match",
    "extract_choice",
    "extract_number",
    "list_scorers",
    "multiple_choice",
    "normalize_answer",
    "numeric",
    "register_scorer",
    "resolve_reward",
    "resolve_scorer",
    "rouge_l",
    "safe_score",
    "safe_score_batch",
    "scorer_name",
    "token_f1",
]
