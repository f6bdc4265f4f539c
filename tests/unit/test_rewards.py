"""Verifiers: the synthetic partial-credit reward, math-verify, and failure accounting in score_all."""
from __future__ import annotations

import time

import pytest

from megatron_vespo.rewards import ScoreRequest, get_verifier, registered_verifiers, score_all


def req(response_ids=(), text=None, truth=None) -> ScoreRequest:
    return ScoreRequest(response_ids=list(response_ids), response_text=text, ground_truth=truth, prompt_ids=[1])


def test_builtin_verifiers_are_registered():
    assert {"math", "synthetic"} <= set(registered_verifiers())
    with pytest.raises(KeyError, match="unknown verifier 'nope'.*synthetic"):
        get_verifier("nope")


@pytest.mark.parametrize("response, expected", [
    ([3, 2, 1], 1.0), ([3, 2, 9], 2 / 3), ([1, 2, 3], 1 / 3), ([3], 1 / 3), ([], 0.0), ([3, 2, 1, 13], 1.0),
])
def test_synthetic_partial_credit(response, expected):
    assert get_verifier("synthetic")(req(response, truth=[3, 2, 1])) == pytest.approx(expected)


@pytest.mark.parametrize("text, truth, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{42}", "42", 1.0),
    (r"I think \boxed{41}", "42", 0.0),
    ("no answer at all", "7", 0.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
])
def test_math_verifier(text, truth, expected):
    assert get_verifier("math")(req(text=text, truth=truth)) == expected


def test_failures_score_zero_and_are_counted():
    def flaky(r: ScoreRequest) -> float:
        if r.ground_truth == "raise":
            raise RuntimeError("broken verifier")
        if r.ground_truth == "hang":
            time.sleep(5)
        if r.ground_truth == "nan":
            return float("nan")
        return 0.75

    requests = [req(truth=t) for t in ("ok", "raise", "hang", "nan", "ok")]
    start = time.monotonic()
    scores, stats = score_all(flaky, requests, timeout_s=0.3)
    assert time.monotonic() - start < 2.0  # the hung call was abandoned, not awaited
    assert scores == [0.75, 0.0, 0.0, 0.0, 0.75]
    assert (stats.errors, stats.timeouts) == (2, 1)
    assert "broken verifier" in stats.first_error


def test_math_verifier_without_text_is_an_error_not_a_crash():
    scores, stats = score_all(get_verifier("math"), [req(truth="1")], timeout_s=5)
    assert scores == [0.0] and stats.errors == 1 and "data.tokenizer" in stats.first_error
