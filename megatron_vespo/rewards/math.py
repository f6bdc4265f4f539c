"""Math reward: 1.0 if math-verify judges the response's final (boxed) answer equal to the ground truth.

The ground truth is parsed as a LaTeX expression (``$...$`` added when missing); the response is
parsed with math-verify's default extraction, which prefers ``\\boxed{}``. math-verify's own
signal-based timeouts only work in the main thread, so they are off here: the registry's
per-call deadline bounds the time instead.
"""
from __future__ import annotations

import logging

from megatron_vespo.rewards.registry import ScoreRequest, register_verifier


# math-verify warns on every call that its own timeout is off; that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@register_verifier("math")
def math_verify_reward(request: ScoreRequest) -> float:
    from math_verify import parse, verify

    if request.response_text is None:
        raise ValueError("the math verifier needs response text: set data.tokenizer")
    truth = str(request.ground_truth).strip()
    if not truth.startswith("$") and "\\boxed" not in truth:
        truth = f"${truth}$"
    gold = parse(truth, parsing_timeout=None)
    if not gold:
        raise ValueError(f"ground truth {request.ground_truth!r:.80} does not parse as an answer")
    answer = parse(request.response_text, parsing_timeout=None)
    return 1.0 if answer and verify(gold, answer, timeout_seconds=None) else 0.0
