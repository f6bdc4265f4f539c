"""Runs that cannot learn stop with an error instead of finishing with rc 0.

Two signs, each read from a rollout batch's metrics, must hold for ``run.max_failed_steps``
consecutive batches before the run stops (one bad batch is noise; several in a row are a broken data
file, verifier or model):

- every response failed verification (``reward/verifier_errors``: the verifier raised, e.g. answers
  it cannot parse): the rewards are all 0 and carry no signal; the first error is shown;
- every response was aborted (``rollout/finish_abort``): the servers return nothing complete, e.g.
  non-finite weights or a broken engine.

Non-finite initial weights are refused before the fleet boots (:func:`check_finite_weights`).

The train/inference gate (:class:`TrainInferenceGate`, ``run.train_inference_gate``) stops a run whose
trainer and rollout engines compute different log-probs for the same tokens under the same weights. It
reads the ``mismatch/logp_gap_*`` metrics the loss already computes during the update, so it costs no
extra forward, and only on mini-batches trained at lag 0: there π_θ are the weights that sampled the
tokens, and any gap is a mismatch of the two implementations, not the policy moving.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from megatron_vespo.config.schema import TrainInferenceGateConfig


class CannotLearnError(RuntimeError):
    """The run stopped because nothing it generates can be learned from."""


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise :class:`CannotLearnError` naming the first tensor of ``named`` holding NaN or Inf."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CannotLearnError(f"{source}: weight {name} has {bad} non-finite value(s) of {tensor.numel()}; "
                                   "refusing to train from it")


class LearningGuard:
    """Counts consecutive rollout batches that carry no learning signal (see the module docstring)."""

    def __init__(self, max_failed_steps: int):
        self.max_failed_steps = max_failed_steps
        self.failed_in_a_row = 0

    def observe(self, metrics: dict[str, Any]) -> None:
        """One rollout batch's metrics; raises :class:`CannotLearnError` at the limit."""
        responses = float(metrics.get("rollout/num_responses", 0.0))
        reasons = []
        if responses > 0 and float(metrics.get("reward/verifier_errors", 0.0)) >= responses:
            first = metrics.get("reward/first_error") or "not recorded"
            reasons.append(f"every response failed verification (first error: {first})")
        if responses > 0 and float(metrics.get("rollout/finish_abort", 0.0)) >= responses:
            reasons.append("every response was aborted by the rollout servers (see fleet_logs/)")
        if not reasons:
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= self.max_failed_steps:
            raise CannotLearnError(f"{self.failed_in_a_row} rollout batches in a row without a learning signal: "
                                   + "; ".join(reasons) + " (run.max_failed_steps)")


class DynamicSamplingExhaustedError(CannotLearnError):
    """Dynamic sampling found too few prompt groups with reward variance within its budget (on_exhausted: error)."""


class TrainInferenceGateError(CannotLearnError):
    """The trainer's and the rollout engine's log-probs differ past the gate's thresholds at lag 0."""


# What makes the two sides disagree under the same weights, in the order it is usually found.
LIKELY_CAUSES = ("likely causes: the engines run other weights than the trainer (checkpoint.init_from vs the fleet's "
                 "model path, a weight push that did not apply), another dtype (precision.params_dtype vs the "
                 "servers' dtype, e.g. rollout.cpu_server_dtype or the fleet's --dtype), or another model or sampling "
                 "config (the model YAML vs the served config.json: rope_theta, norm_topk_prob, vocabulary, "
                 "tokenizer; rollout.temperature)")


class TrainInferenceGate:
    """Checks lag-0 training records against ``run.train_inference_gate`` (rank 0; see the module docstring).

    The first check is the first mini-batch trained at lag 0 after the run starts (or resumes: reloaded
    weights can be the wrong ones too); with ``every_step`` every later lag-0 mini-batch is checked as well.
    """

    def __init__(self, cfg: TrainInferenceGateConfig):
        self.cfg = cfg
        self.checks = 0

    def due(self, record: dict[str, Any]) -> bool:
        """Whether this training record is one the gate checks."""
        if not self.cfg.enabled or (self.checks and not self.cfg.every_step):
            return False
        # A step without trained tokens (every response empty) carries no gap to compare.
        return record.get("lag") == 0 and record.get("mismatch/logp_gap_mean") is not None

    def observe(self, record: dict[str, Any]) -> dict[str, float]:
        """Check ``record`` if due: raises :class:`TrainInferenceGateError`, else returns ``{"gate/checked": 1}``
        ({} when not due)."""
        if not self.due(record):
            return {}
        self.checks += 1
        mean = float(record["mismatch/logp_gap_mean"])
        top: Optional[float] = record.get("mismatch/logp_gap_max")
        failed = []
        if not mean <= self.cfg.max_logp_gap_mean:  # NaN fails too
            failed.append(f"mean |log π_θ - log μ| = {mean:.4g} per token > max_logp_gap_mean={self.cfg.max_logp_gap_mean}")
        if self.cfg.max_logp_gap_max is not None and top is not None and not float(top) <= self.cfg.max_logp_gap_max:
            failed.append(f"max |log π_θ - log μ| = {float(top):.4g} > max_logp_gap_max={self.cfg.max_logp_gap_max}")
        if failed:
            which = "the first mini-batch" if self.checks == 1 else f"train step {record.get('train_step')}"
            raise TrainInferenceGateError(
                f"train/inference gate (run.train_inference_gate): the trainer's log-probs differ from the rollout "
                f"engine's on {which} at lag 0 (same weights): " + "; ".join(failed)
                + (f" (max {float(top):.4g})" if top is not None and len(failed) == 1 and "max |" not in failed[0]
                   else "") + f"; {LIKELY_CAUSES}")
        return {"gate/checked": 1.0}
