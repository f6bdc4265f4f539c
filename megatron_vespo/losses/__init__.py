"""Policy losses (VESPO and baselines) over flat token batches, with mini-batch-global normalisation.

Entry point: :func:`compute_policy_loss` (dispatches on ``LossConfig.name``). Build a
:class:`Normalizer` for the whole mini-batch first (:func:`normalizer_from_masks`), then call the
loss once per micro-batch and backpropagate each ``LossOutput.loss`` as it is.
"""
from megatron_vespo.losses.aggregation import AGGREGATIONS, aggregate, token_weights
from megatron_vespo.losses.batch import (
    LossOutput, Normalizer, PolicyBatch, ScreenedBatch, SeqSumReduce, count_valid, normalizer_from_masks, screen,
    segment_sum,
)
from megatron_vespo.losses.correction import Correction, compute_correction
from megatron_vespo.losses.registry import available_losses, compute_policy_loss
from megatron_vespo.losses.vespo import vespo_log_phi, vespo_phi

__all__ = [
    "AGGREGATIONS", "Correction", "LossOutput", "Normalizer", "PolicyBatch", "ScreenedBatch", "SeqSumReduce",
    "aggregate", "available_losses", "compute_correction", "compute_policy_loss", "count_valid",
    "normalizer_from_masks", "screen", "segment_sum", "token_weights", "vespo_log_phi", "vespo_phi",
]
