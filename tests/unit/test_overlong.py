"""DAPO's overlong handling: the soft penalty against hand-computed values, its place before the GRPO
advantage, masking of truncated responses, and the config rules."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.config.schema import AdvantageConfig, OverlongConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.driver.rollout import RolloutGroup, build_rollout_batch
from megatron_vespo.rewards.overlong import overlong_penalty, shaped_rewards
from megatron_vespo.rollout_function import RolloutResult
from rollout_sglang.types import FinishReason, Sample

REPO = Path(__file__).resolve().parents[2]


def response(rid: str, tokens: int, finish: str) -> RolloutResult:
    return RolloutResult.from_sample(Sample(
        rid=rid, prompt_ids=[1, 2], output_ids=[5] * tokens, output_logprobs=[-0.5] * tokens,
        finish_reason=FinishReason(finish), weight_version="0", prompt_tokens=2, completion_tokens=tokens))


@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (12, 0.0),  # up to max - buffer = 12: no penalty
    (13, -0.125), (14, -0.25), (16, -0.5),  # -0.5 * (L - 12) / 4
    (20, -0.5),  # past the limit (never returned by an engine): capped
])
def test_penalty_grows_linearly_to_the_factor_at_max_length(length, expected):
    assert overlong_penalty(length, max_response_len=16, buffer_len=4, penalty_factor=0.5) == pytest.approx(expected)


def test_no_buffer_no_penalty_and_a_buffer_as_long_as_the_limit_is_refused():
    assert overlong_penalty(16, 16, 0, 1.0) == 0.0
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(16, 16, 16, 1.0)
    shaped, penalties = shaped_rewards([1.0, 1.0, 0.0], [10, 16, 15], 16, OverlongConfig(buffer_len=2))
    assert penalties == [0.0, -1.0, -0.5] and shaped == [1.0, 0.0, -0.5]


def test_penalty_enters_the_advantage_and_the_score_stays_the_reported_reward():
    row = PromptRow(index=0, prompt_ids=[1, 2], ground_truth=[3])
    # Max 8 tokens, buffer 4, factor 1: lengths 4, 6, 8 get 0, -0.5, -1.
    group = RolloutGroup(row, [response("a", 4, "stop"), response("b", 6, "stop"), response("c", 8, "length")])
    batch = build_rollout_batch([group], [1.0, 1.0, 1.0], AdvantageConfig(normalize_std=False),
                                OverlongConfig(buffer_len=4), max_response_len=8)
    # Shaped rewards (1, 0.5, 0), mean 0.5: advantages (0.5, 0, -0.5). Without the penalty the group is flat.
    assert [s.advantage for s in batch.groups[0]] == pytest.approx([0.5, 0.0, -0.5])
    assert batch.metrics["rollout/reward_mean"] == 1.0  # the verifier's score
    assert batch.metrics["overlong/shaped_reward_mean"] == pytest.approx(0.5)
    assert batch.metrics["overlong/penalty_mean"] == pytest.approx(-0.5)
    assert batch.metrics["overlong/penalized_responses"] == 2
    assert all(s.response_mask is None for s in batch.groups[0])  # masking is off
    plain = build_rollout_batch([group], [1.0, 1.0, 1.0], AdvantageConfig(normalize_std=False))
    assert [s.advantage for s in plain.groups[0]] == [0.0, 0.0, 0.0] and "overlong/penalty_mean" not in plain.metrics


def test_truncated_responses_are_masked_but_keep_their_place_in_the_advantage():
    row = PromptRow(index=0, prompt_ids=[1, 2], ground_truth=[3])
    group = RolloutGroup(row, [response("a", 3, "stop"), response("b", 5, "length"), response("c", 2, "stop")])
    batch = build_rollout_batch([group], [1.0, 0.0, 0.0], AdvantageConfig(normalize_std=False),
                                OverlongConfig(mask_truncated=True), max_response_len=5)
    a, b, c = batch.groups[0]
    # Rewards (1, 0, 0), mean 1/3: the truncated response still counts in the mean.
    assert [a.advantage, b.advantage, c.advantage] == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    assert a.response_mask is None and c.response_mask is None
    assert b.response_mask == [0.0] * 5 and b.response_ids == [5] * 5
    assert batch.metrics["overlong/masked_responses"] == 1 and "overlong/penalty_mean" not in batch.metrics


def test_masked_tokens_carry_no_loss_mask_when_packed():
    from megatron_vespo.train.packing import pack_sequences, iter_rank_micro_batches
    from megatron_vespo.train.sample import TrainSample

    samples = [TrainSample([1, 2], [3, 4], [-0.1, -0.2], 1.0),
               TrainSample([1, 2], [5, 6, 7], [-0.1, -0.2, -0.3], -1.0, response_mask=[0.0] * 3)]
    plan = pack_sequences([s.num_tokens for s in samples], 64, 1)
    (mb,) = list(iter_rank_micro_batches(plan, samples, 0))
    per_seq = [float(mb["loss_mask"][mb["seq_index"] == k].sum()) for k in range(2)]
    assert per_seq == [2.0, 0.0]


@pytest.mark.parametrize("overrides,path,fragment", [
    (["rollout.overlong.buffer_len=3"], "rollout.overlong.buffer_len", "must be < rollout.max_response_len=3"),
    (["rollout.overlong.buffer_len=-1"], "rollout.overlong.buffer_len", ">= 0"),
    (["rollout.overlong.penalty_factor=-0.5"], "rollout.overlong.penalty_factor", ">= 0"),
    (["rollout.overlong.mask_truncated=maybe"], "rollout.overlong.mask_truncated", "true or false"),
])
def test_bad_overlong_config_names_the_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/quickstart.yaml", overrides)
    assert err.value.path == path and fragment in str(err.value), str(err.value)


def test_defaults_are_off():
    cfg = load_run_config(REPO / "configs/quickstart.yaml")
    assert cfg.rollout.overlong == OverlongConfig() and cfg.rollout.overlong.buffer_len == 0
    assert not cfg.rollout.overlong.mask_truncated
