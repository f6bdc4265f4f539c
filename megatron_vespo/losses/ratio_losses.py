"""Baseline policy losses built on the importance ratio r_t = exp(clamp(ℓ_t − b_t, −20, 20)).

- ``ppo_clip``: max(−A r, −A clip(r, 1−ε_lo, 1+ε_hi)), and for A < 0 at most −A·c (dual clip)
- ``gspo``:     the same clip on the sequence ratio s_i = exp(mean_t (ℓ_t − b_t)), in the token form
                s_it = exp(sg[log s_i] + ℓ_t − sg[ℓ_t]) (value s_i, gradient s_i ∇ℓ_t)
- ``sapo``:     −A · sigmoid(τ (r − 1)) · 4/τ, τ = τ_pos for A >= 0, τ_neg for A < 0
- ``cispo``:    −sg[clip(r, 1−ε_lo, 1+ε_hi)] · A · ℓ_t

Each returns the per-token loss ([N], finite, 0 at inactive tokens after aggregation) and adds its
metrics. A correction's weights exp(log ρ) multiply the per-token loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_vespo.config.schema import CISPOConfig, GSPOConfig, PPOClipConfig, SAPOConfig
from megatron_vespo.losses.batch import ScreenedBatch
from megatron_vespo.losses.correction import Correction
from megatron_vespo.metrics import MetricBag

LOG_RATIO_CLAMP = 20.0  # keeps exp(ℓ − b) finite in float32 whatever the inputs


def _token_log_ratio(inputs: ScreenedBatch) -> Tensor:
    return torch.clamp(inputs.logp - inputs.behavior_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _corrected(token_loss: Tensor, inputs: ScreenedBatch, correction: Correction) -> Tensor:
    log_weight: Optional[Tensor] = correction.token_log_weight(inputs)
    return token_loss if log_weight is None else token_loss * torch.exp(log_weight)


def _ratio_metrics(metrics: MetricBag, prefix: str, ratio: Tensor, active: Tensor) -> None:
    metrics.add_mean(f"{prefix}/ratio_mean", ratio, active)
    metrics.add_max(f"{prefix}/ratio_max", ratio, active)


def ppo_clip_token_loss(inputs: ScreenedBatch, cfg: PPOClipConfig, correction: Correction,
                        metrics: MetricBag) -> Tensor:
    adv = inputs.token_advantages
    ratio = torch.exp(_token_log_ratio(inputs))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)
    metrics.add_mean("ppo/clip_frac", clipped.detach() > unclipped.detach(), inputs.active)
    if cfg.dual_clip is not None:
        bound = -adv * cfg.dual_clip
        dual = (adv < 0) & (loss.detach() > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
        metrics.add_mean("ppo/dual_clip_frac", dual, inputs.active)
    _ratio_metrics(metrics, "ppo", ratio.detach(), inputs.active)
    return _corrected(loss, inputs, correction)


def gspo_token_loss(inputs: ScreenedBatch, cfg: GSPOConfig, correction: Correction, metrics: MetricBag) -> Tensor:
    adv = inputs.token_advantages
    with torch.no_grad():
        seq_log_ratio = inputs.seq_sum(_token_log_ratio(inputs)) / inputs.seq_tokens.clamp_min(1.0)
    token_log = seq_log_ratio[inputs.seq_index] + inputs.logp - inputs.logp.detach()
    ratio = torch.exp(token_log)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)

    seq_ratio = torch.exp(seq_log_ratio)
    seq_adv = inputs.advantages
    seq_clipped = -seq_adv * torch.clamp(seq_ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) > -seq_adv * seq_ratio
    on, share = inputs.seq_active, inputs.seq_share
    metrics.add_mean("gspo/clip_frac", seq_clipped, on, share)
    metrics.add_mean("gspo/seq_ratio_mean", seq_ratio, on, share)
    metrics.add_max("gspo/seq_ratio_max", seq_ratio, on)
    metrics.add_min("gspo/seq_ratio_min", seq_ratio, on)
    return _corrected(loss, inputs, correction)


def sapo_token_loss(inputs: ScreenedBatch, cfg: SAPOConfig, correction: Correction, metrics: MetricBag) -> Tensor:
    adv = inputs.token_advantages
    ratio = torch.exp(_token_log_ratio(inputs))
    tau = torch.where(adv < 0, adv.new_tensor(cfg.tau_neg), adv.new_tensor(cfg.tau_pos))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    metrics.add_mean("sapo/gate_mean", gate.detach(), inputs.active)
    _ratio_metrics(metrics, "sapo", ratio.detach(), inputs.active)
    return _corrected(-gate * adv, inputs, correction)


def cispo_token_loss(inputs: ScreenedBatch, cfg: CISPOConfig, correction: Correction, metrics: MetricBag) -> Tensor:
    adv = inputs.token_advantages
    ratio = torch.exp(_token_log_ratio(inputs)).detach()
    weight = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    metrics.add_mean("cispo/clip_frac", weight != ratio, inputs.active)
    _ratio_metrics(metrics, "cispo", ratio, inputs.active)
    return _corrected(-weight * adv * inputs.logp, inputs, correction)
