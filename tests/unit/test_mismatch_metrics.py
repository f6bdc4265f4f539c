"""The sequence log-ratio statistics every policy loss reports (log π_θ(y|x) − log μ(y|x))."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_vespo.config.schema import LossConfig
from megatron_vespo.losses import PolicyBatch, compute_policy_loss, normalizer_from_masks


def batch(rollout_given: bool) -> PolicyBatch:
    # Three sequences: log-ratio sums 0.5 + 0.25 = 0.75, -1.0 + 0 + 0.5 = -0.5, and a masked token
    # (garbage there must not count) plus 2.0 = 2.0.
    logp = torch.tensor([-1.0, -2.0, -1.0, -1.0, -1.0, -3.0, -0.5], dtype=torch.float64)
    mu = torch.tensor([-1.5, -2.25, 0.0, -1.0, -1.5, 50.0, -2.5], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    seq_index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    old = mu + 0.3  # π_old recomputed: the gap and the log-ratio stay against μ
    return PolicyBatch(logp=logp.requires_grad_(), behavior_logp=old if rollout_given else mu, mask=mask,
                       seq_index=seq_index, advantages=torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64),
                       num_seqs=3, rollout_logp=mu if rollout_given else None)


@pytest.mark.parametrize("loss", ["vespo", "ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("rollout_given", [False, True])
def test_sequence_log_ratio_statistics(loss, rollout_given):
    b = batch(rollout_given)
    out = compute_policy_loss(b, normalizer_from_masks([b]), LossConfig(name=loss))
    m = out.metrics.compute()
    sums = [0.75, -0.5, 2.0]
    mean = sum(sums) / 3
    assert m["mismatch/seq_log_ratio_mean"] == pytest.approx(mean)
    assert m["mismatch/seq_log_ratio_max"] == pytest.approx(2.0)
    assert m["mismatch/seq_log_ratio_min"] == pytest.approx(-0.5)
    assert m["mismatch/seq_log_ratio_abs_mean"] == pytest.approx(sum(abs(x) for x in sums) / 3)
    assert m["mismatch/seq_log_ratio_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in sums) / 3))
