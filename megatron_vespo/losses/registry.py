"""One entry point for every policy loss: screen the batch, correct, compute per-token loss, aggregate.

Regularisers are added to whichever policy loss runs, aggregated like it (same token weights, so the
mini-batch total does not depend on the micro-batch split or the token order):

- KL to a frozen reference (``loss.kl``, mode ``loss``): + coef · Σ_t w_t k(ℓ_t, log π_ref,t), k the
  estimator of :mod:`megatron_vespo.losses.kl`; reported as ``loss/kl`` whenever the batch carries
  reference log-probs (mode ``reward`` too, where it is only a diagnostic);
- entropy bonus (``loss.entropy_coef``): − coef · Σ_t w_t H_t; reported as ``loss/entropy`` whenever
  the batch carries entropies.

Both act on every active token (an MIS correction's dropped tokens included: they keep the policy
close to the reference whatever their importance weight).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_vespo.config.schema import CorrectionConfig, LossConfig
from megatron_vespo.losses.aggregation import aggregate
from megatron_vespo.losses.batch import LossOutput, Normalizer, PolicyBatch, ScreenedBatch, SeqSumReduce, screen
from megatron_vespo.losses.correction import Correction, compute_correction
from megatron_vespo.losses.kl import kl_estimate
from megatron_vespo.losses.ratio_losses import (
    cispo_token_loss, gspo_token_loss, ppo_clip_token_loss, sapo_token_loss,
)
from megatron_vespo.losses.vespo import vespo_token_loss
from megatron_vespo.metrics import MetricBag

TokenLossFn = Callable[[ScreenedBatch, object, Correction, MetricBag], Tensor]


@dataclass(frozen=True)
class _LossSpec:
    fn: TokenLossFn
    config_field: str  # the LossConfig sub-config the loss reads


_LOSSES: dict[str, _LossSpec] = {
    "vespo": _LossSpec(partial(vespo_token_loss, length_norm="none"), "vespo"),
    "vespo_length_norm": _LossSpec(partial(vespo_token_loss, length_norm="length"), "vespo"),
    "vespo_sqrt_length_norm": _LossSpec(partial(vespo_token_loss, length_norm="sqrt"), "vespo"),
    "ppo_clip": _LossSpec(ppo_clip_token_loss, "ppo_clip"),
    "gspo": _LossSpec(gspo_token_loss, "gspo"),
    "sapo": _LossSpec(sapo_token_loss, "sapo"),
    "cispo": _LossSpec(cispo_token_loss, "cispo"),
}


def available_losses() -> list[str]:
    return list(_LOSSES)


def compute_policy_loss(
    batch: PolicyBatch,
    normalizer: Normalizer,
    loss_cfg: LossConfig,
    correction_cfg: Optional[CorrectionConfig] = None,
    seq_sum_reduce: Optional[SeqSumReduce] = None,
) -> LossOutput:
    """This micro-batch's share of the mini-batch policy loss, and its metrics.

    Summing ``loss`` over the micro-batches (and data-parallel ranks, and CP ranks when
    ``seq_sum_reduce`` all-reduces over CP) of a mini-batch gives the mini-batch loss, whatever the
    split. Sequences with non-finite inputs contribute nothing and are counted in ``loss/bad_seqs``.
    """
    spec = _LOSSES.get(loss_cfg.name)
    if spec is None:
        raise ValueError(f"unknown policy loss {loss_cfg.name!r}; available: {', '.join(_LOSSES)}")
    normalizer.validate()
    metrics = MetricBag()
    inputs = screen(batch, seq_sum_reduce)
    correction = compute_correction(inputs, correction_cfg, metrics)
    token_loss = spec.fn(inputs, getattr(loss_cfg, spec.config_field), correction, metrics)
    if correction.keep is not None:  # MIS: dropped tokens carry no loss in any loss
        token_loss = torch.where(correction.keep, token_loss, torch.zeros_like(token_loss))
    loss = aggregate(token_loss, inputs, normalizer, loss_cfg.resolved_aggregation)

    metrics.add_sum("loss/policy_loss", loss.detach())
    loss = loss + _regularizers(inputs, normalizer, loss_cfg, metrics)
    _add_common_metrics(metrics, inputs)
    return LossOutput(loss=loss, metrics=metrics)


def _regularizers(inputs: ScreenedBatch, normalizer: Normalizer, loss_cfg: LossConfig, metrics: MetricBag) -> Tensor:
    """The KL and entropy terms of this micro-batch (a scalar; 0 when both are off); adds their metrics."""
    mode = loss_cfg.resolved_aggregation
    total = torch.zeros((), dtype=inputs.dtype, device=inputs.logp.device)
    kl_cfg = loss_cfg.kl
    if inputs.ref_logp is not None:
        kl = aggregate(kl_estimate(inputs.logp, inputs.ref_logp, kl_cfg.resolved_estimator), inputs, normalizer, mode)
        metrics.add_sum("loss/kl", kl.detach())
        if kl_cfg.enabled and kl_cfg.mode == "loss":
            total = total + kl_cfg.coef * kl
    elif kl_cfg.enabled and kl_cfg.mode == "loss":
        raise ValueError("loss.kl (mode 'loss') needs the reference log-probs of every token (PolicyBatch.ref_logp)")
    if inputs.entropy is not None:
        entropy = aggregate(inputs.entropy, inputs, normalizer, mode)
        metrics.add_sum("loss/entropy", entropy.detach())
        if loss_cfg.entropy_coef > 0:
            total = total - loss_cfg.entropy_coef * entropy
    elif loss_cfg.entropy_coef > 0:
        raise ValueError("loss.entropy_coef > 0 needs the token entropies (PolicyBatch.entropy)")
    return total


def _add_common_metrics(metrics: MetricBag, inputs: ScreenedBatch) -> None:
    metrics.add_sum("loss/valid_tokens", inputs.active)
    metrics.add_sum("loss/valid_seqs", inputs.seq_active, weights=inputs.seq_share)
    metrics.add_sum("loss/bad_seqs", inputs.seq_bad, weights=inputs.seq_share)
    # Train-vs-rollout gap |ℓ − μ|: μ is the rollout engine's log-prob (the ratio denominator unless
    # π_old was recomputed).
    mu = inputs.rollout_logp if inputs.rollout_logp is not None else inputs.behavior_logp
    gap = (inputs.logp.detach() - mu).abs()
    metrics.add_mean("mismatch/logp_gap_mean", gap, inputs.active)
    metrics.add_max("mismatch/logp_gap_max", gap, inputs.active)
    # Sequence log-ratio log π_θ(y|x) − log μ(y|x) (unclamped, every loss): its spread is the tail of
    # plain sequence-level importance sampling's weight W = exp(it).
    seq_log_ratio = inputs.seq_sum(torch.where(inputs.active, inputs.logp.detach() - mu, torch.zeros_like(gap)))
    on, share = inputs.seq_active, inputs.seq_share
    metrics.add_mean("mismatch/seq_log_ratio_mean", seq_log_ratio, on, share)
    metrics.add_std("mismatch/seq_log_ratio_std", seq_log_ratio, on, share)
    metrics.add_max("mismatch/seq_log_ratio_max", seq_log_ratio, on)
    metrics.add_min("mismatch/seq_log_ratio_min", seq_log_ratio, on)
    metrics.add_mean("mismatch/seq_log_ratio_abs_mean", seq_log_ratio.abs(), on, share)
