"""The CPU rollout server checks sampling_params as SGLang 0.5.23 does.

For a table of good and bad sampling_params, SGLang's own ``SamplingParams(**params).verify()`` (run by
the SGLang side, from the overlay) and the CPU server's boundary check
(``cpu_server.sampling.SamplingParams.from_json``, what /generate runs before queueing anything) accept
and refuse exactly the same ones, and agree on which accepted ones sample greedily. A second table
pins the only differences, all in one direction: the CPU server refuses some values SGLang takes
(a wrong JSON type SGLang's Python happens to tolerate, or a feature the CPU server does not
implement); it never accepts one that SGLang refuses.
"""
from __future__ import annotations

import math

import pytest

from rollout_sglang.cpu_server.sampling import GREEDY_TEMPERATURE, SamplingParams

NAN, INF = math.nan, math.inf
VOCAB = 128

# (sampling_params, accepted by both?)
AGREED = [
    ({}, True),
    ({"temperature": None, "top_p": None, "top_k": None, "max_new_tokens": None}, True),
    ({"temperature": 0}, True), ({"temperature": 0.0}, True), ({"temperature": -0.0}, True),
    ({"temperature": 5e-7}, True), ({"temperature": 1e-6}, True), ({"temperature": 0.7}, True),
    ({"temperature": 1e30}, True),
    ({"temperature": NAN}, False), ({"temperature": INF}, False), ({"temperature": -INF}, False),
    ({"temperature": -0.5}, False), ({"temperature": "0.5"}, False), ({"temperature": 10 ** 400}, False),
    ({"top_p": 1.0}, True), ({"top_p": 1}, True), ({"top_p": 1e-12}, True), ({"top_p": 0.95}, True),
    ({"top_p": 0}, False), ({"top_p": -0.1}, False), ({"top_p": 1.0000001}, False), ({"top_p": NAN}, False),
    ({"top_p": INF}, False),
    ({"top_k": -1}, True), ({"top_k": 1}, True), ({"top_k": 50}, True), ({"top_k": 2 ** 31}, True),
    ({"top_k": 2 ** 63}, True), ({"top_k": 10 ** 30}, True),
    ({"top_k": 0}, False), ({"top_k": -2}, False), ({"top_k": -(2 ** 63)}, False),
    ({"max_new_tokens": 0}, True), ({"max_new_tokens": 1}, True), ({"max_new_tokens": 10 ** 9}, True),
    ({"max_new_tokens": -1}, False),
    ({"sampling_seed": 0}, True), ({"sampling_seed": -5}, True), ({"sampling_seed": 2 ** 63 - 1}, True),
    ({"sampling_seed": -(2 ** 63)}, True),
    ({"sampling_seed": 2 ** 63}, False), ({"sampling_seed": -(2 ** 63) - 1}, False), ({"sampling_seed": 1.5}, False),
    ({"sampling_seed": "7"}, False),
    # Parameters the CPU server does not implement: their no-op value is fine, SGLang's range is checked.
    ({"min_p": 0.0}, True), ({"min_p": -0.1}, False), ({"min_p": 1.5}, False), ({"min_p": NAN}, False),
    ({"frequency_penalty": 0.0}, True), ({"frequency_penalty": 2.5}, False), ({"frequency_penalty": NAN}, False),
    ({"presence_penalty": 0}, True), ({"presence_penalty": -3}, False),
    ({"repetition_penalty": 1.0}, True), ({"repetition_penalty": 0}, False), ({"repetition_penalty": 2.5}, False),
    ({"repetition_penalty": NAN}, False),
    ({"min_new_tokens": 0}, True), ({"min_new_tokens": -1}, False), ({"min_new_tokens": 200}, False),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, False),
    ({"stop_token_ids": [1, 2]}, True), ({"stop_token_ids": []}, True), ({"stop": []}, True),
    ({"json_schema": "", "regex": None}, True), ({"json_schema": "{}", "regex": "a"}, False),
    ({"ignore_eos": True, "no_stop_trim": True, "skip_special_tokens": False}, True),
    ({"temprature": 1.0}, False),  # a typo is an unknown field
]

# (sampling_params, why the CPU server refuses what SGLang's verify() accepts)
CPU_STRICTER = [
    ({"temperature": True}, "a bool is not a number (SGLang's Python reads it as 1)"),
    ({"top_k": 2.5}, "top_k is an integer (SGLang truncates it into an int32 tensor)"),
    ({"max_new_tokens": 1.5}, "max_new_tokens is an integer"),
    ({"n": 0}, "n is not part of verify(); SGLang's request normalisation takes it, the CPU server wants >= 1"),
    ({"min_p": 0.1}, "min_p is not implemented on CPU"),
    ({"frequency_penalty": 0.5}, "penalties are not implemented on CPU"),
    ({"presence_penalty": -1}, "penalties are not implemented on CPU"),
    ({"repetition_penalty": 1.2}, "penalties are not implemented on CPU"),
    ({"min_new_tokens": 3}, "min_new_tokens is not implemented on CPU"),
    ({"stop": ["</s>"]}, "stop strings are not implemented on CPU (stop_token_ids are)"),
    ({"regex": "a+"}, "constrained decoding is not implemented on CPU"),
    ({"logit_bias": {"1": 0.5}}, "logit_bias is not implemented on CPU"),
]


def cpu_accepts(params: dict) -> tuple[bool, bool]:
    """(accepted, samples greedily) by the CPU server's boundary check."""
    try:
        parsed = SamplingParams.from_json(params)
    except ValueError:
        return False, False
    return True, parsed.greedy or parsed.top_k == 1


@pytest.fixture(scope="module")
def sglang_answers(sglang):
    cases = [p for p, _ in AGREED] + [p for p, _ in CPU_STRICTER]
    answer = sglang.ask("verify_sampling", cases=cases, vocab_size=VOCAB)
    return answer, dict(zip(map(repr, cases), answer["results"]))


@pytest.mark.parametrize("params, accepted", AGREED, ids=[repr(p) for p, _ in AGREED])
def test_sglang_and_the_cpu_server_accept_and_refuse_the_same_sampling_params(sglang_answers, params, accepted):
    sglang_result = sglang_answers[1][repr(params)]
    assert sglang_result["ok"] is accepted, f"SGLang's verify() says {sglang_result}: fix the table"
    ok, greedy = cpu_accepts(params)
    assert ok is accepted, f"the CPU server {'accepts' if ok else 'refuses'} it; SGLang: {sglang_result}"
    if accepted:
        assert greedy is sglang_result["greedy"], "greedy sampling differs (SGLang: temperature < 1e-6 or top_k 1)"


@pytest.mark.parametrize("params, why", CPU_STRICTER, ids=[repr(p) for p, _ in CPU_STRICTER])
def test_the_cpu_server_is_stricter_only_where_documented(sglang_answers, params, why):
    assert sglang_answers[1][repr(params)]["ok"], "SGLang refuses it now: move it to the agreed table"
    assert not cpu_accepts(params)[0], why


def test_the_greedy_threshold_is_sglangs(sglang_answers):
    assert GREEDY_TEMPERATURE == sglang_answers[0]["sampling_eps"]
