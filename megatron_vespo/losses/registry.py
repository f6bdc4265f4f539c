"""One entry point for every policy loss: screen the batch, correct, compute per-token loss, aggregate."""
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
    _add_common_metrics(metrics, inputs)
    return LossOutput(loss=loss, metrics=metrics)


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
