"""loss.kl and loss.entropy_coef: the KL estimators against hand-computed values and their gradients, the
config rules (one-line errors naming the field), and the reward-mode penalty's advantages.

The terms inside the policy loss (split and token-order invariance, gradients) are checked with every
policy loss in test_loss_properties.py; the reference model in a real Megatron step in
test_reference_model.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.config.schema import AdvantageConfig, KLConfig
from megatron_vespo.losses.kl import kl_estimate
from megatron_vespo.rewards.kl_penalty import apply_kl_penalty, sequence_kl
from megatron_vespo.train.sample import TrainSample

TINY_RUN = Path(__file__).resolve().parents[2] / "configs" / "tiny_vespo.yaml"
E = math.e

# (log π, log π_ref) -> d = log π − log π_ref: 1, −1, 0 and a large gap.
LOGP = [-1.0, -2.0, -0.5, -1.0]
REF = [-2.0, -1.0, -0.5, -31.0]
EXPECTED = {  # k1 = d, k2 = d²/2, k3 = e^{−d} − 1 + d (k3's d clamped to ±20)
    "k1": [1.0, -1.0, 0.0, 30.0],
    "k2": [0.5, 0.5, 0.0, 450.0],
    "k3": [1 / E, E - 2.0, 0.0, math.exp(-20.0) - 1.0 + 20.0],
}
SLOPE = {  # d k / d log π
    "k1": [1.0, 1.0, 1.0, 1.0],
    "k2": [1.0, -1.0, 0.0, 30.0],
    "k3": [1.0 - 1 / E, 1.0 - E, 0.0, 0.0],  # 0 past the clamp
}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_hand_computed_values_and_gradients(estimator):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(REF, dtype=torch.float64, requires_grad=True)
    kl = kl_estimate(logp, ref, estimator)
    torch.testing.assert_close(kl, torch.tensor(EXPECTED[estimator], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor(SLOPE[estimator], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert ref.grad is None  # the reference is a constant


def test_k2_and_k3_are_never_negative_and_k3_stays_finite_in_float32():
    d = torch.linspace(-100, 100, 2001)
    zero = torch.zeros_like(d)
    for estimator in ("k2", "k3"):
        kl = kl_estimate(d, zero, estimator)
        assert torch.isfinite(kl).all() and (kl >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(d, zero, "k4")


# ---- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, path, fragment", [
    (["loss.kl.estimator=k4"], "loss.kl.estimator", "k4"),
    (["loss.kl.mode=advantage"], "loss.kl.mode", "advantage"),
    (["loss.kl.coef=-0.1"], "loss.kl.coef", ">= 0"),
    (["loss.entropy_coef=-0.01"], "loss.entropy_coef", ">= 0"),
    (["loss.kl.coef=0.1"], "loss.kl.reference", "checkpoint.init_from is empty"),
    (["loss.kl.coef=0.1", "loss.kl.mode=reward", "checkpoint.init_from=/w", "rollout.replay_dir=/d"],
     "loss.kl.mode", "replay_dir"),
])
def test_bad_kl_settings_name_the_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(TINY_RUN, overrides)
    assert info.value.path == path and fragment in str(info.value)


def test_kl_defaults_are_off_and_the_reference_defaults_to_the_initial_weights():
    cfg = load_run_config(TINY_RUN)
    assert not cfg.loss.kl.enabled and cfg.loss.entropy_coef == 0.0
    cfg = load_run_config(TINY_RUN, ["loss.kl.coef=0.1", "checkpoint.init_from=/w"])
    assert cfg.kl_reference == ("/w", "checkpoint.init_from") and cfg.loss.kl.resolved_estimator == "k3"
    cfg = load_run_config(TINY_RUN, ["loss.kl.coef=0.1", "loss.kl.reference=/r", "loss.kl.mode=reward"])
    assert cfg.kl_reference == ("/r", "loss.kl.reference") and cfg.loss.kl.resolved_estimator == "k1"


def test_check_refuses_a_reference_that_is_no_checkpoint(tmp_path):
    from megatron_vespo.checkpoint.hf_io import CheckpointError
    from megatron_vespo.preflight import preflight

    (tmp_path / "empty").mkdir()
    cfg = load_run_config(TINY_RUN, ["loss.kl.coef=0.1", f"loss.kl.reference={tmp_path / 'empty'}",
                                     f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(CheckpointError, match=r"^loss\.kl\.reference: .* is neither a Hugging Face directory"):
        preflight(cfg, world_size=1)


# ---- reward mode -----------------------------------------------------------------------------------------
def sample(mu: list[float], ref: list[float], shaped: float) -> TrainSample:
    return TrainSample(prompt_ids=[1], response_ids=list(range(len(mu))), rollout_logp=mu, advantage=0.0,
                       ref_logp=ref, shaped_reward=shaped)


def test_reward_penalty_subtracts_coef_times_sequence_kl_before_the_group_advantage():
    groups = [
        [sample([-1.0, -2.0], [-1.5, -1.0], 1.0), sample([-0.5], [-0.5], 1.0), sample([], [], 0.0)],
        [sample([-3.0], [-1.0], 0.0), sample([-0.1, -0.2, -0.3], [-0.2, -0.2, -0.2], 0.5)],
    ]
    coef = 0.25
    kl_cfg = KLConfig(coef=coef, mode="reward")
    # Σ_t (log μ − log π_ref) per response (k1, the reward mode's default); an empty response has none.
    seq_kl = [0.5 - 1.0, 0.0, 0.0, -2.0, 0.1 + 0.0 - 0.1]
    assert [sequence_kl(s, "k1") for g in groups for s in g] == pytest.approx(seq_kl, abs=1e-12)
    shaped = [1.0, 1.0, 0.0, 0.0, 0.5]
    metrics = apply_kl_penalty(groups, kl_cfg, AdvantageConfig())
    expected, _ = grpo_advantages(torch.tensor([r - coef * k for r, k in zip(shaped, seq_kl)], dtype=torch.float64),
                                  torch.tensor([0, 0, 0, 1, 1]))
    assert [s.advantage for g in groups for s in g] == pytest.approx(expected.tolist(), abs=1e-6)
    assert metrics["kl/seq_kl_mean"] == pytest.approx(sum(seq_kl) / 5)
    assert metrics["kl/reward_penalty_mean"] == pytest.approx(coef * sum(seq_kl) / 5)
    assert metrics["kl/penalized_reward_mean"] == pytest.approx(sum(shaped) / 5 - coef * sum(seq_kl) / 5)

    # The same rewards in a group no longer make it flat: the penalty alone ranks the responses.
    flat = [[sample([-1.0], [-2.0], 1.0), sample([-1.0], [-1.0], 1.0)]]
    apply_kl_penalty(flat, kl_cfg, AdvantageConfig())
    assert flat[0][0].advantage < 0 < flat[0][1].advantage  # the response further from π_ref loses


def test_reward_penalty_needs_reference_logprobs_and_shaped_rewards():
    kl_cfg = KLConfig(coef=0.1, mode="reward")
    no_ref = sample([-1.0], [-1.0], 1.0)
    no_ref.ref_logp = None
    with pytest.raises(ValueError, match="reference log-prob of each of the 1 response tokens"):
        apply_kl_penalty([[no_ref, sample([-1.0], [-1.0], 0.0)]], kl_cfg, AdvantageConfig())
    unshaped = sample([-1.0], [-1.0], 1.0)
    unshaped.shaped_reward = None
    with pytest.raises(ValueError, match=r"shaped_reward .* samples \[0\]"):
        apply_kl_penalty([[unshaped]], kl_cfg, AdvantageConfig())
