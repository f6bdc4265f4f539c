"""The KL reward penalty (``loss.kl.mode: reward``): each response's reward, before its advantage, loses
coef × its sequence KL to the frozen reference model.

KL_i = Σ_t k(log μ_t, log π_ref,t) over the response's tokens (every token, also those a loss mask
leaves out of the update: the penalty scores the sequence that was generated), k the estimator of
:mod:`megatron_vespo.losses.kl` (k1 by default: the sequence's log-ratio log μ(y|x) − log π_ref(y|x)).
The numerator is μ, the behaviour policy's log-probs as the rollout engine returned them, not π_θ
recomputed by the trainer: the tokens were sampled from μ, so Σ_t k1 is an unbiased one-sample estimate
of KL(μ ‖ π_ref) for the prompt (with π_θ's log-probs it would be only as long as π_θ = μ), and it costs
no forward pass and means the same in the synchronous and the asynchronous loop. The price: a
train/inference mismatch (another dtype or kernel in the engine) shows up in the penalty, by about
``mismatch/logp_gap_mean`` per token.

The advantage is then recomputed per prompt group (:func:`megatron_vespo.advantages.grpo_advantages`)
from ``TrainSample.shaped_reward`` − coef · KL_i, over the same responses as before (a group's complete
responses, empty ones included). Groups whose verifier rewards agree (what dynamic sampling filters)
are no longer flat: the penalty alone ranks their responses.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config.schema import AdvantageConfig, KLConfig
from megatron_vespo.losses.kl import kl_estimate
from megatron_vespo.train.sample import TrainSample


def sequence_kl(sample: TrainSample, estimator: str) -> float:
    """Σ_t k(log μ_t, log π_ref,t) over the response of ``sample`` (0 for an empty response)."""
    if not sample.response_ids:
        return 0.0
    if sample.ref_logp is None or len(sample.ref_logp) != len(sample.rollout_logp):
        have = None if sample.ref_logp is None else len(sample.ref_logp)
        raise ValueError(f"the KL reward penalty needs the reference log-prob of each of the "
                         f"{len(sample.rollout_logp)} response tokens; the sample has {have}")
    mu = torch.tensor(sample.rollout_logp, dtype=torch.float64)
    return float(kl_estimate(mu, torch.tensor(sample.ref_logp, dtype=torch.float64), estimator).sum())


def apply_kl_penalty(groups: Sequence[Sequence[TrainSample]], kl_cfg: KLConfig,
                     advantage_cfg: AdvantageConfig) -> dict[str, float]:
    """Recompute every sample's ``advantage`` from its penalised reward (in place; see the module docstring);
    the penalty's metrics: ``kl/reward_penalty_mean`` (mean coef · KL_i), ``kl/seq_kl_mean``,
    ``kl/penalized_reward_mean`` and the new ``adv/abs_mean``."""
    samples = [s for g in groups for s in g]
    if not samples:
        return {}
    missing = [i for i, s in enumerate(samples) if s.shaped_reward is None]
    if missing:
        raise ValueError(f"the KL reward penalty needs TrainSample.shaped_reward (the reward the advantage is "
                         f"computed from); samples {missing[:10]} have none")
    kls = torch.tensor([sequence_kl(s, kl_cfg.resolved_estimator) for s in samples], dtype=torch.float64)
    penalised = torch.tensor([s.shaped_reward for s in samples], dtype=torch.float64) - kl_cfg.coef * kls
    group_ids = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    advantages, stats = grpo_advantages(penalised, group_ids, advantage_cfg)
    for sample, advantage in zip(samples, advantages.tolist()):
        sample.advantage = advantage
    return {"kl/reward_penalty_mean": float(kl_cfg.coef * kls.mean()), "kl/seq_kl_mean": float(kls.mean()),
            "kl/penalized_reward_mean": float(penalised.mean()), "adv/abs_mean": stats["adv/abs_mean"]}
