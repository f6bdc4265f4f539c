"""Reward of the synthetic digit task: the fraction of answer positions that are correct.

Partial credit matters: from a random policy an exact-match reward is almost never 1, so it gives
GRPO no signal (docs/dependencies.md, "The CPU quickstart"); per-position credit does.
"""
from __future__ import annotations

from megatron_vespo.rewards.registry import ScoreRequest, register_verifier


@register_verifier("synthetic")
def synthetic_partial_credit(request: ScoreRequest) -> float:
    target = request.ground_truth
    if not isinstance(target, (list, tuple)) or not target:
        raise ValueError(f"synthetic ground truth must be a non-empty list of token ids; got {target!r:.80}")
    response = request.response_ids
    hits = sum(1 for pos, tok in enumerate(target) if pos < len(response) and response[pos] == tok)
    return hits / len(target)
