"""Train/inference correction weights from π_old (``behavior_logp``) and μ (``rollout_logp``).

Only meaningful when π_old is recomputed (the ratio denominator is then π_old, and μ is the rollout
engine's log-prob). All weights are detached. Modes (``CorrectionConfig.mode``):

- ``token_tis``: log ρ_t = min(b_t − μ_t, log tis_cap)
- ``seq_tis``:   log ρ_i = min(Σ_t m_t (b_t − μ_t), log tis_cap)
- ``token_mis``: drop tokens whose ratio exp(b_t − μ_t) lies outside [mis_lower, mis_upper]
- ``seq_mis``:   drop whole sequences whose ratio exp(Σ_t m_t (b_t − μ_t)) lies outside it

VESPO adds the log weights to log W (in log space); the other losses multiply their per-token loss by
exp(log ρ). Dropped (MIS) tokens get zero loss in every loss. Mode ``none`` or no ``rollout_logp``
gives an empty correction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron_vespo.config.schema import CorrectionConfig
from megatron_vespo.losses.batch import ScreenedBatch
from megatron_vespo.metrics import MetricBag


@dataclass
class Correction:
    """Ratio losses multiply in :meth:`token_log_weight`; VESPO adds the log weights to log W itself
    (:func:`~megatron_vespo.losses.vespo.sequence_log_weight`: token weights before the length
    normalisation of the ablations, sequence weights after it)."""

    token_log_rho: Optional[Tensor] = None  # [N] (0 at inactive tokens)
    seq_log_rho: Optional[Tensor] = None  # [num_seqs]
    keep: Optional[Tensor] = None  # [N] bool: false for tokens masked out by MIS

    def token_log_weight(self, inputs: ScreenedBatch) -> Optional[Tensor]:
        """log ρ_t + log ρ_i per token (what ratio losses multiply in as exp), or None."""
        out = self.token_log_rho
        if self.seq_log_rho is not None:
            seq = self.seq_log_rho[inputs.seq_index]
            out = seq if out is None else out + seq
        return out


def _log_bound(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def compute_correction(inputs: ScreenedBatch, cfg: Optional[CorrectionConfig], metrics: MetricBag) -> Correction:
    """The correction of ``cfg.mode`` for this micro-batch; adds ``correction/*`` counts to ``metrics``."""
    if cfg is None or cfg.mode == "none" or inputs.rollout_logp is None:
        return Correction()
    active = inputs.active
    log_ratio = inputs.behavior_logp - inputs.rollout_logp  # log π_old/μ, 0 at inactive tokens
    log_cap = math.log(cfg.tis_cap)
    lower, upper = _log_bound(cfg.mis_lower), math.log(cfg.mis_upper)

    if cfg.mode == "token_tis":
        truncated = active & (log_ratio > log_cap)
        log_rho = torch.clamp(log_ratio, max=log_cap)
        metrics.add_sum("correction/tis_truncated_tokens", truncated)
        metrics.add_mean("correction/tis_weight_mean", log_rho.exp(), active)
        return Correction(token_log_rho=torch.where(active, log_rho, torch.zeros_like(log_rho)))

    seq_log_ratio = inputs.seq_sum(log_ratio)
    if cfg.mode == "seq_tis":
        metrics.add_sum("correction/tis_truncated_seqs", inputs.seq_active & (seq_log_ratio > log_cap),
                        weights=inputs.seq_share)
        seq_log_rho = torch.clamp(seq_log_ratio, max=log_cap)
        metrics.add_mean("correction/tis_weight_mean", seq_log_rho.exp(), inputs.seq_active, inputs.seq_share)
        return Correction(seq_log_rho=seq_log_rho)

    if cfg.mode == "token_mis":
        inside = (log_ratio >= lower) & (log_ratio <= upper)
        metrics.add_sum("correction/mis_masked_tokens", active & ~inside)
        metrics.add_mean("correction/mis_masked_token_frac", ~inside, active)
        return Correction(keep=inside | ~active)

    if cfg.mode == "seq_mis":
        inside = (seq_log_ratio >= lower) & (seq_log_ratio <= upper)
        metrics.add_sum("correction/mis_masked_seqs", inputs.seq_active & ~inside, weights=inputs.seq_share)
        metrics.add_sum("correction/mis_masked_tokens", active & ~inside[inputs.seq_index])
        return Correction(keep=inside[inputs.seq_index] | ~active)

    raise ValueError(f"unknown correction mode {cfg.mode!r}; expected none, token_tis, seq_tis, token_mis or seq_mis")
