"""GRPO advantages: each sample's reward relative to the other samples of its prompt (its group).

A_j = (r_j − mean_g) / (std_g + eps), std_g the unbiased standard deviation of group g; with
``normalize_std: false`` A_j = r_j − mean_g (Dr. GRPO). A group whose rewards are all equal (a group
of one sample included) carries no learning signal: its advantages are exactly 0 and it is counted in
the stats.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from megatron_vespo.config.schema import AdvantageConfig


def _group_index(groups: Union[Tensor, int], num_samples: int) -> Tensor:
    """Dense group index [num_samples] in [0, num_groups) from ids or an equal group size."""
    if isinstance(groups, int):
        if groups < 1 or num_samples % groups:
            raise ValueError(f"group size {groups} must be >= 1 and divide the number of samples {num_samples}")
        return torch.arange(num_samples) // groups
    if tuple(groups.shape) != (num_samples,):
        raise ValueError(f"group_ids must have shape [{num_samples}] like rewards; got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point:
        raise ValueError(f"group_ids must be integers; got {groups.dtype}")
    return torch.unique(groups, return_inverse=True)[1]


def grpo_advantages(rewards: Tensor, group_ids: Union[Tensor, int],
                    cfg: Optional[AdvantageConfig] = None) -> tuple[Tensor, dict[str, float]]:
    """(advantages [num_samples] float32, stats) for ``rewards`` grouped by ``group_ids``.

    ``group_ids`` is a tensor of group ids (any integers; samples of a group need not be contiguous) or
    an int: the size of equal, contiguous groups. Stats: ``adv/num_groups``, ``adv/zero_std_groups``
    (all rewards equal), ``adv/zero_std_fraction``, ``adv/mean``, ``adv/abs_mean``, ``adv/reward_mean``.
    """
    cfg = cfg or AdvantageConfig()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [num_samples] tensor; got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards must be finite; samples {bad[:10]} are not")
    if n == 0:
        return torch.zeros(0), {"adv/num_groups": 0.0, "adv/zero_std_groups": 0.0, "adv/zero_std_fraction": 0.0}
    index = _group_index(group_ids, n).to(rewards.device)
    num_groups = int(index.max()) + 1
    r = rewards.detach().to(torch.float64)

    size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros_like(size).index_add_(0, index, r) / size
    centred = r - mean[index]
    # Exact equality, not std < eps: rewards like 0/1 are exact, and a tiny real spread is still signal.
    group_max = torch.full_like(size, -torch.inf).scatter_reduce(0, index, r, "amax")
    group_min = torch.full_like(size, torch.inf).scatter_reduce(0, index, r, "amin")
    flat = group_max == group_min
    if cfg.normalize_std:
        var = torch.zeros_like(size).index_add_(0, index, centred * centred) / (size - 1).clamp_min(1.0)
        centred = centred / (var.sqrt() + cfg.eps)[index]
    adv = torch.where(flat[index], torch.zeros_like(centred), centred)

    zero_groups = int(flat.sum())
    stats = {
        "adv/num_groups": float(num_groups),
        "adv/zero_std_groups": float(zero_groups),
        "adv/zero_std_fraction": zero_groups / num_groups,
        "adv/mean": float(adv.mean()),
        "adv/abs_mean": float(adv.abs().mean()),
        "adv/reward_mean": float(r.mean()),
    }
    return adv.to(torch.float32), stats
