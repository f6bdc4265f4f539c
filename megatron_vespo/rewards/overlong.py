"""DAPO's overlong handling (arXiv 2503.14476, section 3.4): a soft length penalty and truncation masking.

A response that runs into ``max_response_len`` is usually an unfinished answer; scoring it 0 and
training on it punishes reasoning that was merely long. DAPO offers two remedies, both here:

- **soft overlong punishment**: from ``max_response_len - buffer_len`` tokens on, the reward gets a
  penalty growing linearly to ``-penalty_factor`` at ``max_response_len`` (the verifier's score is
  unchanged below that length);
- **overlong filtering**: responses that hit the limit without a stop (finish reason ``length``) keep
  their reward in their group's advantage but get loss mask 0, so none of their tokens is trained.
"""
from __future__ import annotations

from megatron_vespo.config.schema import OverlongConfig


def overlong_penalty(length: int, max_response_len: int, buffer_len: int, penalty_factor: float) -> float:
    """The (non-positive) soft penalty of a response of ``length`` generated tokens; 0 when ``buffer_len`` is 0.

    ``-penalty_factor * (length - (max_response_len - buffer_len)) / buffer_len`` once ``length`` exceeds
    ``max_response_len - buffer_len``; a length past the limit (never returned by an engine) is capped at
    ``-penalty_factor``."""
    if buffer_len <= 0:
        return 0.0
    if buffer_len >= max_response_len:
        raise ValueError(f"buffer_len {buffer_len} must be < max_response_len {max_response_len}")
    exceed = min(length, max_response_len) - (max_response_len - buffer_len)
    if exceed <= 0:
        return 0.0
    return -penalty_factor * exceed / buffer_len


def shaped_rewards(scores: list[float], lengths: list[int], max_response_len: int,
                   cfg: OverlongConfig) -> tuple[list[float], list[float]]:
    """(scores + penalties, penalties) of responses with these verifier ``scores`` and token ``lengths``."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores for {len(lengths)} responses")
    penalties = [overlong_penalty(n, max_response_len, cfg.buffer_len, cfg.penalty_factor) for n in lengths]
    return [s + p for s, p in zip(scores, penalties)], penalties
