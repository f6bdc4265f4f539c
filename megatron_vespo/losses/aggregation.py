"""Reduction of a per-token loss to one micro-batch's share of the mini-batch loss.

Every mode is a fixed (detached) weight per token, so the loss is linear in the token losses:

    token-mean               w_t = m_t / total_tokens
    seq-mean-token-mean      w_t = m_t / (T_i · total_seqs)
    seq-mean-token-sum       w_t = m_t / total_seqs
    seq-mean-token-sum-norm  w_t = m_t / (total_seqs · norm_constant)

with ``total_*`` from the mini-batch :class:`Normalizer` and T_i the valid tokens of the token's
sequence (summed over CP ranks). Because neither depends on the micro-batch split, summing the
micro-batch losses gives the same total and the same gradient however the mini-batch is split.
"""
from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor

from megatron_vespo.config.schema import Aggregation
from megatron_vespo.losses.batch import Normalizer, ScreenedBatch

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def _positive(count: float) -> float:
    # A zero count means the whole mini-batch has no valid token, so every numerator is 0 too.
    return count if count > 0 else 1.0


def token_weights(inputs: ScreenedBatch, normalizer: Normalizer, mode: str) -> Tensor:
    """[N] detached weight of each token's loss; 0 outside the active tokens."""
    active = inputs.active.to(inputs.dtype)
    if mode == "token-mean":
        return active / _positive(normalizer.total_tokens)
    if mode == "seq-mean-token-mean":
        per_seq = 1.0 / inputs.seq_tokens.clamp_min(1.0)
        return active * per_seq[inputs.seq_index] / _positive(normalizer.total_seqs)
    if mode == "seq-mean-token-sum":
        return active / _positive(normalizer.total_seqs)
    if mode == "seq-mean-token-sum-norm":
        if normalizer.norm_constant is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs Normalizer.norm_constant "
                             "(loss.norm_constant in the run config)")
        return active / (_positive(normalizer.total_seqs) * normalizer.norm_constant)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")


def aggregate(token_loss: Tensor, inputs: ScreenedBatch, normalizer: Normalizer, mode: str) -> Tensor:
    """Σ_t w_t · loss_t: this micro-batch's share of the mini-batch loss (a scalar)."""
    weights = token_weights(inputs, normalizer, mode)
    # where() keeps whatever sits at inactive tokens out of both the value and the gradient.
    safe = torch.where(inputs.active, token_loss, torch.zeros((), dtype=token_loss.dtype, device=token_loss.device))
    return (safe * weights).sum()
