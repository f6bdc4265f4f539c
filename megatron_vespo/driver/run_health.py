"""Runs that cannot learn stop with an error instead of finishing with rc 0.

Two signs, each read from a rollout batch's metrics, must hold for ``run.max_failed_steps``
consecutive batches before the run stops (one bad batch is noise; several in a row are a broken data
file, verifier or model):

- every response failed verification (``reward/verifier_errors``: the verifier raised, e.g. answers
  it cannot parse): the rewards are all 0 and carry no signal; the first error is shown;
- every response was aborted (``rollout/finish_abort``): the servers return nothing complete, e.g.
  non-finite weights or a broken engine.

Non-finite initial weights are refused before the fleet boots (:func:`check_finite_weights`).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


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
