"""A standalone torch.distributed process group, created exactly the way SGLang creates its side.

SGLang's ``/init_weights_update_group`` builds its group with a TCPStore rendezvous on
``tcp://master_address:master_port``, wraps the store in ``PrefixStore(group_name, store)`` and calls
``_new_process_group_helper`` — without touching the default (WORLD) group. The trainer's side must
be built the same way (same prefix, same rank numbering) or both sides wait for each other forever.
The trainer is rank 0 (it hosts the TCPStore); server ranks are ``rank_offset + tp_rank``.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import PrefixStore
from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous


def init_custom_process_group(
    *,
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the group ``group_name``; blocks until all ranks arrive."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl'; got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group = _new_process_group_helper(
        world_size, rank, [], backend, store, group_name=group_name, timeout=timeout,
    )
    if isinstance(group, tuple):  # torch >= 2.6 returns (group, store)
        group = group[0]
    # Collectives translate "global" ranks through this table; this group has its own numbering.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Release a group made by :func:`init_custom_process_group`."""
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError, AssertionError):
        # destroy_process_group insists on a default group in some torch versions; drop our entries.
        _world.pg_group_ranks.pop(group, None)
        _world.pg_map.pop(group, None)
        _world.pg_names.pop(group, None)
