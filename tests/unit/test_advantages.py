"""GRPO advantages: group normalisation, zero-std groups, group ids vs equal-size groups."""
import math

import pytest
import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config.schema import AdvantageConfig


def test_normalised_by_unbiased_group_std():
    # group [1, 0, 1, 1]: mean 0.75, unbiased var = (3·0.25² + 0.75²)/3 = 0.25 -> std 0.5
    # group [2, 4]: mean 3, unbiased std sqrt(2) -> ±1/sqrt(2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 4.0])
    adv, stats = grpo_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1]), AdvantageConfig(eps=1e-6))
    s2 = math.sqrt(2.0)
    expected = [0.25 / 0.5, -0.75 / 0.5, 0.25 / 0.5, 0.25 / 0.5, -1 / s2, 1 / s2]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)
    assert adv.dtype == torch.float32
    assert stats["adv/num_groups"] == 2 and stats["adv/zero_std_groups"] == 0


def test_eps_is_added_to_the_std():
    adv, _ = grpo_advantages(torch.tensor([0.0, 1.0]), 2, AdvantageConfig(eps=0.5))
    std = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([-0.5 / (std + 0.5), 0.5 / (std + 0.5)], rel=1e-6)


def test_without_std_normalisation_it_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 3.0, 3.0, 5.0])
    adv, _ = grpo_advantages(rewards, 4, AdvantageConfig(normalize_std=False))
    assert adv.tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25, -0.5, -0.5, -0.5, 1.5])


@pytest.mark.parametrize("normalize_std", [True, False])
def test_groups_with_equal_rewards_get_zero_advantage_and_are_counted(normalize_std):
    # groups: [1, 1, 1] equal, [0.3] size one, [0, 1, 0] informative, [0.7, 0.7] equal (not exact 0/1)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.0, 1.0, 0.0, 0.7, 0.7])
    ids = torch.tensor([10, 10, 10, 4, 7, 7, 7, 2, 2])
    adv, stats = grpo_advantages(rewards, ids, AdvantageConfig(normalize_std=normalize_std))
    assert adv[[0, 1, 2, 3, 7, 8]].tolist() == [0.0] * 6
    assert (adv[[4, 6]] < 0).all() and adv[5] > 0
    assert stats["adv/zero_std_groups"] == 3.0 and stats["adv/num_groups"] == 4.0
    assert stats["adv/zero_std_fraction"] == pytest.approx(0.75)


def test_group_members_need_not_be_contiguous():
    rewards = torch.tensor([1.0, 5.0, 0.0, 7.0])
    interleaved, _ = grpo_advantages(rewards, torch.tensor([0, 1, 0, 1]))
    contiguous, _ = grpo_advantages(rewards[[0, 2, 1, 3]], 2)
    assert interleaved[[0, 2, 1, 3]].tolist() == pytest.approx(contiguous.tolist())


def test_advantages_sum_to_zero_within_each_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (64,), generator=g).float()
    adv, stats = grpo_advantages(rewards, 8)
    assert adv.view(8, 8).sum(1).abs().max() < 1e-5
    assert stats["adv/mean"] == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="samples \\[1\\] are not"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="group size 3 must be >= 1 and divide the number of samples 4"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="group_ids must have shape \\[4\\]"):
        grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must be integers"):
        grpo_advantages(torch.zeros(2), torch.zeros(2))
    adv, stats = grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert adv.numel() == 0 and stats["adv/num_groups"] == 0
