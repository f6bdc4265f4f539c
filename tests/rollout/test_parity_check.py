"""The log-prob parity check used by the rollout tests: exact matches pass, a routing flip at an MoE
near-tie is recognised as such, and anything else (other weights) is reported as unexplained."""
from __future__ import annotations

import random

import pytest

from .helpers import (_flipped_routing, assert_logprob_parity, hf_state, load_hf, load_state_into, logprob_mismatch,
                      perturbed, teacher_forced_logprobs)


@pytest.fixture(scope="module")
def model(tiny_moe_dir):
    return load_hf(tiny_moe_dir)


def sequence(seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randrange(128) for _ in range(6)], [rng.randrange(128) for _ in range(10)]


def test_exact_match_passes(model):
    prompt, output = sequence(0)
    assert logprob_mismatch(model, prompt, output, teacher_forced_logprobs(model, prompt, output)) is None


def test_a_flip_is_explained_only_at_a_near_tie(model):
    prompt, output = sequence(1)
    position = len(prompt) + 3  # feeds output token 3; output token 4 is the first one predicted from it
    with _flipped_routing(model, layer=1, position=position):
        flipped = teacher_forced_logprobs(model, prompt, output)
    plain = teacher_forced_logprobs(model, prompt, output)
    differs = [t for t, (a, b) in enumerate(zip(plain, flipped)) if abs(a - b) >= 1e-4]
    assert differs and differs[0] == 4
    # Counting every routing decision as a near-tie, the flip is found where it was made...
    why = logprob_mismatch(model, prompt, output, flipped, tie_margin=1.0)
    assert why is not None and why.startswith(f"routing flip at layer 1, position {position}"), why
    # ...but with fp32-noise margins no decision of this sequence is close enough to flip.
    assert logprob_mismatch(model, prompt, output, flipped).startswith("unexplained")


def test_other_weights_are_unexplained(model, tiny_moe_dir):
    other = load_hf(tiny_moe_dir)
    load_state_into(other, perturbed(hf_state(tiny_moe_dir), seed=5))
    prompt, output = sequence(2)
    why = logprob_mismatch(model, prompt, output, teacher_forced_logprobs(other, prompt, output), tie_margin=1.0)
    assert why is not None and why.startswith("unexplained")


class _Sample:
    def __init__(self, prompt, output, logprobs):
        from rollout_sglang.types import FinishReason

        self.rid, self.meta_info, self.weight_version = "s", {}, "v"
        self.prompt_ids, self.output_ids, self.output_logprobs = prompt, output, logprobs
        self.finish_reason = FinishReason("length", length=len(output))
        self.aborted = False


def test_assert_logprob_parity_fails_on_a_wrong_sample(model):
    prompt, output = sequence(3)
    good = _Sample(prompt, output, teacher_forced_logprobs(model, prompt, output))
    assert assert_logprob_parity(model, [good, good], version="v") == []
    bad = _Sample(prompt, output, [x + 0.01 for x in good.output_logprobs])
    with pytest.raises(AssertionError, match="1 of 2 samples differ"):
        assert_logprob_parity(model, [good, bad])
