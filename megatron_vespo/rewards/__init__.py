"""Verifiers that score responses, by name (see registry.py)."""
from megatron_vespo.rewards.registry import (
    RewardStats, ScoreRequest, Verifier, get_verifier, register_verifier, registered_verifiers, score_all,
)

__all__ = ["RewardStats", "ScoreRequest", "Verifier", "get_verifier", "register_verifier", "registered_verifiers",
           "score_all"]
