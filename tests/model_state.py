"""Test-side reader of a Megatron model's weights: the full (unsharded) state dict of any layout.

:func:`gather_full_state_dict` assembles the global tensors of
:mod:`megatron_vespo.models.full_state`'s canonical naming (dist-checkpoint keys and global shapes,
the same in every TP/PP/EP/DP layout) from the main-replica shards of all ranks, through one
process. The tests compare weights across layouts and runs with it and feed it back through
:func:`~megatron_vespo.models.full_state.load_full_state_dict`. Importable as ``tests.model_state``
(the repository root is on ``sys.path`` under ``python -m pytest`` and in the torchrun workers).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_vespo.models.full_state import local_shards


def gather_full_state_dict(
    model_chunks: Sequence[torch.nn.Module] | torch.nn.Module, dst: int | None = 0
) -> dict[str, torch.Tensor] | None:
    """Assemble the full weights (fp32, CPU) from every rank's main-replica shards.

    Collective: every rank must call it. Returns the dict on rank ``dst`` (on every rank when
    ``dst`` is None) and ``None`` elsewhere. Raises if some element of a global tensor is not
    covered by any shard.
    """
    mine = [
        (s.key, s.global_shape, s.index(), s.tensor.detach().to("cpu", torch.float32).clone())
        for s in local_shards(model_chunks) if s.main_replica
    ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        if dst is None:
            parts: list = [None] * world
            dist.all_gather_object(parts, mine)
        else:
            parts = [None] * world if dist.get_rank() == dst else None
            dist.gather_object(mine, parts, dst=dst)
            if dist.get_rank() != dst:
                return None
    else:
        parts = [mine]
    return _assemble(item for part in parts for item in part)


def _assemble(items: Iterable[tuple]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for key, global_shape, index, tensor in items:
        if key not in full:
            full[key] = torch.zeros(global_shape, dtype=torch.float32)
            covered[key] = torch.zeros(global_shape, dtype=torch.bool)
        full[key][index] = tensor
        covered[key][index] = True
    missing = [k for k, c in covered.items() if not bool(c.all())]
    if missing:
        raise RuntimeError(f"shards do not cover the full tensors of: {missing[:5]}")
    return dict(sorted(full.items()))


def gather_hf_weights(exporter) -> list[tuple[str, torch.Tensor]]:
    """Every HF-named tensor of an :class:`~megatron_vespo.checkpoint.export.HFWeightExporter` on rank 0
    (CPU; an empty list elsewhere), through one process: for tests on small models only (weight sync
    streams from every stage instead). Collective over the world."""
    mine = [(name, t.detach().cpu()) for bucket in exporter.buckets() for name, t in bucket]
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return [item for part in parts for item in part] if parts is not None else []
