"""VESPO: a closed-form kernel φ(W) on the sequence-level importance weight (README.md, "The VESPO objective").

Per sequence i (valid tokens t, current log-probs ℓ_t, behaviour log-probs b_t, advantage A_i):

1. r_t = clamp(ℓ_t − b_t, −C, C)
2. log W_i = clamp(Σ_t r_t [+ Σ_t log ρ_t + log ρ_i], log w_min, log_w_max): the true sequence ratio,
   no length normalisation (the ablations divide the token sum by T_i or √T_i first)
3. (c1, c2) = (k_pos, λ_pos) if A_i >= 0 else (k_neg, λ_neg)
4. φ_i = exp(c2 + c1 log W_i − c2 W_i) = W^c1 e^{c2 (1 − W)}, non-finite -> 0, detached
5. per-token loss −φ_i A_i ℓ_t, so ∇ = −φ_i A_i ∇ log π_θ (REINFORCE with a reshaped weight)
"""
from __future__ import annotations

import math
from typing import Literal, Union

import torch
from torch import Tensor

from megatron_vespo.config.schema import VespoConfig
from megatron_vespo.losses.batch import ScreenedBatch
from megatron_vespo.losses.correction import Correction
from megatron_vespo.metrics import MetricBag

LengthNorm = Literal["none", "length", "sqrt"]
Scalar = Union[float, Tensor]


def vespo_log_phi(log_w: Tensor, c1: Scalar, c2: Scalar) -> Tensor:
    """log φ(W) = c2 + c1 log W − c2 W, from log W (W is only formed from the clamped log W)."""
    return c2 + c1 * log_w - c2 * torch.exp(log_w)


def vespo_phi(log_w: Tensor, c1: Scalar, c2: Scalar) -> Tensor:
    """φ(W) = W^c1 · exp(c2 (1 − W)) evaluated from log W; non-finite values become 0."""
    phi = torch.exp(vespo_log_phi(log_w, c1, c2))
    return torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))


def sequence_log_weight(inputs: ScreenedBatch, cfg: VespoConfig, correction: Correction,
                        length_norm: LengthNorm = "none") -> tuple[Tensor, Tensor]:
    """(log W_i after the clamps, the sum before them) for every sequence; detached."""
    with torch.no_grad():
        token_log = torch.clamp(inputs.logp.detach() - inputs.behavior_logp,
                                -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        if correction.token_log_rho is not None:
            token_log = token_log + correction.token_log_rho
        raw = inputs.seq_sum(token_log)  # 0 at inactive tokens, so only active tokens count
        if length_norm == "length":
            raw = raw / inputs.seq_tokens.clamp_min(1.0)
        elif length_norm == "sqrt":
            raw = raw / inputs.seq_tokens.clamp_min(1.0).sqrt()
        elif length_norm != "none":
            raise ValueError(f"unknown VESPO length_norm {length_norm!r}; expected none, length or sqrt")
        if correction.seq_log_rho is not None:
            raw = raw + correction.seq_log_rho
        log_w = torch.clamp(raw, math.log(cfg.w_min), cfg.log_w_max)
    return log_w, raw


def vespo_token_loss(inputs: ScreenedBatch, cfg: VespoConfig, correction: Correction, metrics: MetricBag,
                     length_norm: LengthNorm = "none") -> Tensor:
    """Per-token VESPO loss −φ_i A_i ℓ_t ([N]; 0 at inactive tokens); adds ``vespo/*`` metrics."""
    log_w, raw = sequence_log_weight(inputs, cfg, correction, length_norm)
    adv = inputs.advantages
    positive = adv >= 0
    c1 = torch.where(positive, log_w.new_tensor(cfg.k_pos), log_w.new_tensor(cfg.k_neg))
    c2 = torch.where(positive, log_w.new_tensor(cfg.lambda_pos), log_w.new_tensor(cfg.lambda_neg))
    seq_active = inputs.seq_active
    phi = torch.where(seq_active, vespo_phi(log_w, c1, c2),
                      torch.zeros_like(log_w))
    coeff = (phi * adv).detach()  # φ is a scale, not part of the graph
    token_loss = -coeff[inputs.seq_index] * inputs.logp

    _add_metrics(metrics, inputs, cfg, log_w, raw, phi)
    return token_loss


def _add_metrics(metrics: MetricBag, inputs: ScreenedBatch, cfg: VespoConfig, log_w: Tensor, raw: Tensor,
                 phi: Tensor) -> None:
    # Sequence statistics are weighted by this rank's share of each sequence's tokens, so that under
    # context parallelism a sequence counts once after reducing over the CP ranks.
    on, share = inputs.seq_active, inputs.seq_share
    pos, neg = on & (inputs.advantages >= 0), on & (inputs.advantages < 0)
    w = torch.exp(log_w)
    for stat, values in (("W", w), ("logW", log_w), ("phi", phi)):
        metrics.add_mean(f"vespo/{stat}_mean", values, on, share)
        metrics.add_max(f"vespo/{stat}_max", values, on)
        metrics.add_min(f"vespo/{stat}_min", values, on)
    metrics.add_std("vespo/W_std", w, on, share)
    metrics.add_sum("vespo/seqs_pos", pos, weights=share)
    metrics.add_sum("vespo/seqs_neg", neg, weights=share)
    for sign, sel in (("pos", pos), ("neg", neg)):
        metrics.add_mean(f"vespo/W_mean_{sign}", w, sel, share)
        metrics.add_mean(f"vespo/phi_mean_{sign}", phi, sel, share)
    metrics.add_sum("vespo/neg_W_gt_100", neg & (w > 100.0), weights=share)
    metrics.add_mean("vespo/approx_kl", -log_w / inputs.seq_tokens.clamp_min(1.0), on, share)
    metrics.add_sum("vespo/logW_clamped_low", on & (raw < math.log(cfg.w_min)), weights=share)
    metrics.add_sum("vespo/logW_clamped_high", on & (raw > cfg.log_w_max), weights=share)
