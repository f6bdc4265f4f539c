"""Baselines (PPO clip, GSPO, SAPO, CISPO) and TIS/MIS corrections against hand-computed values."""
import math

import pytest
import torch

from megatron_vespo.config.schema import (
    CISPOConfig, CorrectionConfig, GSPOConfig, LossConfig, PPOClipConfig, SAPOConfig,
)
from megatron_vespo.losses import Normalizer, PolicyBatch, available_losses, compute_policy_loss

L = math.log


def batch_from_ratios(ratios_per_seq, advantages, logp=None, rollout=None, mask=None):
    """Tokens in sequence order; behaviour log-probs chosen so that exp(ℓ − b) is the given ratio."""
    ratios = [r for seq in ratios_per_seq for r in seq]
    n = len(ratios)
    logp = torch.tensor(logp if logp is not None else [-1.0] * n, dtype=torch.float64)
    behaviour = logp - torch.tensor([L(r) for r in ratios], dtype=torch.float64)
    return PolicyBatch(
        logp=logp.clone().requires_grad_(),
        behavior_logp=behaviour,
        mask=torch.tensor(mask if mask is not None else [1] * n, dtype=torch.bool),
        seq_index=torch.tensor([i for i, seq in enumerate(ratios_per_seq) for _ in seq]),
        advantages=torch.tensor(advantages, dtype=torch.float64),
        num_seqs=len(ratios_per_seq),
        rollout_logp=None if rollout is None else torch.tensor(rollout, dtype=torch.float64),
    )


def run(batch, cfg, norm, correction=None):
    out = compute_policy_loss(batch, norm, cfg, correction)
    out.loss.backward()
    return out.loss.item(), batch.logp.grad.tolist(), out.metrics.compute()


def test_ppo_clip_hand_computed():
    # seq 0 (A=+1): r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped, no grad); r=0.5 -> max(-0.5, -0.8) = -0.5
    # seq 1 (A=-1): r=0.5 -> max(0.5, 0.8) = 0.8 (clipped); r=1.1 -> 1.1; r=20 -> max(20, 1.28) = 20,
    #               dual clip min(20, 10) = 10 (no grad). Total 10.12 over 5 tokens.
    batch = batch_from_ratios([[1.5, 0.5], [0.5, 1.1, 20.0]], [1.0, -1.0])
    cfg = LossConfig(name="ppo_clip", ppo_clip=PPOClipConfig(eps_low=0.2, eps_high=0.28, dual_clip=10.0))
    loss, grad, m = run(batch, cfg, Normalizer(total_tokens=5, total_seqs=2))
    assert loss == pytest.approx(10.12 / 5, rel=1e-12)
    # d(-A r)/dℓ = -A r where the unclipped branch is active.
    assert grad == pytest.approx([0.0, -0.5 / 5, 0.0, 1.1 / 5, 0.0], abs=1e-12)
    assert m["ppo/clip_frac"] == pytest.approx(2 / 5) and m["ppo/dual_clip_frac"] == pytest.approx(1 / 5)
    assert m["ppo/ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.1 + 20.0) / 5)
    assert m["ppo/ratio_max"] == pytest.approx(20.0)


def test_ppo_without_dual_clip_keeps_the_large_negative_advantage_term():
    batch = batch_from_ratios([[20.0]], [-1.0])
    cfg = LossConfig(name="ppo_clip", ppo_clip=PPOClipConfig(dual_clip=None))
    loss, grad, m = run(batch, cfg, Normalizer(total_tokens=1, total_seqs=1))
    assert loss == pytest.approx(20.0) and grad == pytest.approx([20.0])
    assert "ppo/dual_clip_frac" not in m


def test_gspo_hand_computed():
    # seq 0 (A=+1): ratios 1.5, 1.5 -> s = 1.5, clip at 1.1 -> max(-1.5, -1.1) = -1.1 per token, no grad.
    # seq 1 (A=-1): ratios 0.5, 1.1, 20 -> s = (0.5·1.1·20)^(1/3) = 11^(1/3) = 2.22398009, unclipped;
    #               each token's loss s with gradient s.
    # seq-mean-token-mean over 2 sequences: ((-1.1·2)/2 + (3 s)/3) / 2.
    s1 = 2.2239800905693152
    batch = batch_from_ratios([[1.5, 1.5], [0.5, 1.1, 20.0]], [1.0, -1.0])
    cfg = LossConfig(name="gspo", gspo=GSPOConfig(eps_low=0.1, eps_high=0.1))
    assert cfg.resolved_aggregation == "seq-mean-token-mean"
    loss, grad, m = run(batch, cfg, Normalizer(total_tokens=5, total_seqs=2))
    assert loss == pytest.approx((-1.1 + s1) / 2, rel=1e-12)
    assert grad == pytest.approx([0.0, 0.0] + [s1 / (3 * 2)] * 3, rel=1e-12, abs=1e-15)
    assert m["gspo/clip_frac"] == pytest.approx(0.5)
    assert m["gspo/seq_ratio_max"] == pytest.approx(s1) and m["gspo/seq_ratio_min"] == pytest.approx(1.5)


def test_gspo_sequence_ratio_is_the_masked_geometric_mean():
    # The masked token (ratio 100) does not enter s: s = sqrt(0.8 · 1.25) = 1.
    batch = batch_from_ratios([[0.8, 100.0, 1.25]], [1.0], mask=[1, 0, 1])
    _, grad, m = run(batch, LossConfig(name="gspo"), Normalizer(total_tokens=2, total_seqs=1))
    assert m["gspo/seq_ratio_mean"] == pytest.approx(1.0, rel=1e-12)
    assert grad == pytest.approx([-0.5, 0.0, -0.5], rel=1e-12)


def test_sapo_hand_computed():
    # A=+1, r=1.5, τ=1:    gate = σ(0.5)·4 = 2.48983732; dgate/dℓ = 4σ(1-σ)·r = 1.41002227
    # A=-1, r=0.5, τ=1.05: gate = σ(-0.525)·4/1.05 = 1.41593833; dgate/dℓ = 4σ(1-σ)·r = 0.46706991
    # A=0,  r=3: loss 0, gradient 0.
    batch = batch_from_ratios([[1.5], [0.5], [3.0]], [1.0, -1.0, 0.0])
    cfg = LossConfig(name="sapo", sapo=SAPOConfig(tau_pos=1.0, tau_neg=1.05))
    loss, grad, m = run(batch, cfg, Normalizer(total_tokens=3, total_seqs=3))
    assert loss == pytest.approx((-2.4898373248074184 + 1.4159383303033666) / 3, rel=1e-12)
    assert grad == pytest.approx([-1.410022273209567 / 3, 0.4670699116426963 / 3, 0.0], rel=1e-12)
    assert m["sapo/ratio_max"] == pytest.approx(3.0)


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient():
    batch = batch_from_ratios([[1.0], [1.0]], [0.7, -0.4])
    _, grad, _ = run(batch, LossConfig(name="sapo"), Normalizer(total_tokens=2, total_seqs=2))
    assert grad == pytest.approx([-0.7 / 2, 0.4 / 2], rel=1e-12)


def test_cispo_hand_computed():
    # Weights sg(clip(r, 1-1.0, 1+0.28)): r=1.5 -> 1.28, r=0.5 -> 0.5, r=1.1 -> 1.1.
    # loss = -w·A·ℓ: ℓ = (-1, -2, -0.5), A = (+1, -1, -1) -> (1.28·(-1)·... ) worked out below.
    batch = batch_from_ratios([[1.5], [0.5], [1.1]], [1.0, -1.0, -1.0], logp=[-1.0, -2.0, -0.5])
    cfg = LossConfig(name="cispo", cispo=CISPOConfig(eps_low=1.0, eps_high=0.28))
    loss, grad, m = run(batch, cfg, Normalizer(total_tokens=3, total_seqs=3))
    # -1.28·1·(-1) = 1.28; -0.5·(-1)·(-2) = -1.0; -1.1·(-1)·(-0.5) = -0.55  -> sum -0.27
    assert loss == pytest.approx(-0.27 / 3, rel=1e-12)
    assert grad == pytest.approx([-1.28 / 3, 0.5 / 3, 1.1 / 3], rel=1e-12)
    assert m["cispo/clip_frac"] == pytest.approx(1 / 3)


def test_token_tis_multiplies_the_ratio_losses_by_truncated_weights():
    # π_old/μ = e^{1} (truncated to 2) and e^{-0.5}: CISPO gradients scale by 2 and e^{-0.5}.
    old = [-1.0, -2.0]
    batch = batch_from_ratios([[1.0, 1.0]], [1.0], logp=old, rollout=[-2.0, -1.5])
    _, grad, m = run(batch, LossConfig(name="cispo"), Normalizer(total_tokens=2, total_seqs=1),
                     CorrectionConfig(mode="token_tis", tis_cap=2.0))
    assert grad == pytest.approx([-2.0 / 2, -math.exp(-0.5) / 2], rel=1e-12)
    assert m["correction/tis_truncated_tokens"] == 1.0
    assert m["correction/tis_weight_mean"] == pytest.approx((2.0 + math.exp(-0.5)) / 2)


def test_seq_tis_uses_the_sequence_ratio():
    # Σ(π_old − μ) = 1 - 0.5 = 0.5 -> ρ = e^{0.5} = 1.6487 < 2, not truncated.
    batch = batch_from_ratios([[1.0, 1.0]], [1.0], logp=[-1.0, -2.0], rollout=[-2.0, -1.5])
    _, grad, m = run(batch, LossConfig(name="ppo_clip"), Normalizer(total_tokens=2, total_seqs=1),
                     CorrectionConfig(mode="seq_tis", tis_cap=2.0))
    assert grad == pytest.approx([-math.exp(0.5) / 2] * 2, rel=1e-12)
    assert m["correction/tis_truncated_seqs"] == 0.0


def test_token_mis_masks_tokens_outside_the_band():
    # π_old/μ per token: e^{1} > 2 (masked), e^{-0.5} = 0.61 (kept), e^{-1} = 0.37 < 0.5 (masked)
    batch = batch_from_ratios([[1.0, 1.0, 1.0]], [1.0], logp=[-1.0, -2.0, -3.0], rollout=[-2.0, -1.5, -2.0])
    for name in available_losses():
        batch.logp.grad = None
        _, grad, m = run(batch, LossConfig(name=name), Normalizer(total_tokens=3, total_seqs=1),
                         CorrectionConfig(mode="token_mis", mis_lower=0.5, mis_upper=2.0))
        assert grad[0] == 0.0 and grad[2] == 0.0 and grad[1] != 0.0, name
        assert m["correction/mis_masked_tokens"] == 2.0


def test_seq_mis_masks_whole_sequences_outside_the_band():
    # seq 0: Σ = 1 - 0.5 = 0.5 -> e^{0.5} inside [0.5, 2]; seq 1: Σ = 2 -> e^2 outside.
    batch = batch_from_ratios([[1.0, 1.0], [1.0]], [1.0, 1.0], logp=[-1.0, -2.0, -1.0],
                              rollout=[-2.0, -1.5, -3.0])
    for name in available_losses():
        batch.logp.grad = None
        _, grad, m = run(batch, LossConfig(name=name), Normalizer(total_tokens=3, total_seqs=2),
                         CorrectionConfig(mode="seq_mis", mis_lower=0.5, mis_upper=2.0))
        assert grad[2] == 0.0 and grad[0] != 0.0 and grad[1] != 0.0, name
        assert m["correction/mis_masked_seqs"] == 1.0 and m["correction/mis_masked_tokens"] == 1.0


def test_unknown_loss_name_lists_the_available_losses():
    cfg = LossConfig()
    cfg.name = "reinforce++"  # bypasses the config loader on purpose
    batch = batch_from_ratios([[1.0]], [1.0])
    with pytest.raises(ValueError, match="unknown policy loss 'reinforce\\+\\+'.*vespo.*ppo_clip.*cispo"):
        compute_policy_loss(batch, Normalizer(1, 1), cfg)
    assert available_losses() == ["vespo", "vespo_length_norm", "vespo_sqrt_length_norm", "ppo_clip", "gspo",
                                  "sapo", "cispo"]


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "sapo", "cispo"])
def test_extreme_ratios_give_finite_losses_and_gradients(name):
    batch = batch_from_ratios([[1.0, 1.0], [1.0]], [1.0, -1.0])
    with torch.no_grad():
        batch.behavior_logp[:] = torch.tensor([1e4, -1e4, -1e4], dtype=torch.float64)
    batch.behavior_logp = batch.behavior_logp.float()
    batch.logp = batch.logp.detach().float().requires_grad_()
    out = compute_policy_loss(batch, Normalizer(3, 2), LossConfig(name=name))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(batch.logp.grad).all()
