"""Per-token estimators of KL(π ‖ π_ref) from log-probs (Schulman, "Approximating KL divergence").

With d = log π − log π_ref and tokens drawn from π:

- ``k1`` = d: unbiased, high variance, negative for some tokens;
- ``k2`` = d² / 2: biased (low for small KL), low variance, never negative;
- ``k3`` = (π_ref / π) − 1 − log(π_ref / π) = exp(−d) − 1 + d: unbiased and never negative.

All three are differentiable in ``logp`` (``ref_logp`` is a constant). ``k3``'s exponent is clamped to
±LOG_RATIO_CLAMP like the policy losses' ratios, so it stays finite in float32 whatever the inputs.
"""
from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor

from megatron_vespo.config.schema import KLEstimator
from megatron_vespo.losses.ratio_losses import LOG_RATIO_CLAMP

KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref), elementwise over ``logp`` (log π) and ``ref_logp`` (log π_ref)."""
    d = logp - ref_logp.detach()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
