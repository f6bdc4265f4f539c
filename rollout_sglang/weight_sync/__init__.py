"""Pushing new policy weights (HF names and dtypes) to the rollout fleet, with a version per update.

One module per transport; each has the fleet owner's side (a
:class:`~rollout_sglang.contracts.StagedWeightSync`, also a one-process
:class:`~rollout_sglang.contracts.WeightSync`) and a sender (a
:class:`~rollout_sglang.contracts.WeightSender`) that any trainer process holding a pipeline stage's
buckets runs, so that each stage sends its own tensors and no process holds the whole model:

- :mod:`.disk`: every stage writes its own safetensors files into ``v<version>.tmp``; one index at the
  end, the rename commits the version, then ``/update_weights_from_disk`` (works across machines with a
  shared filesystem; a restarted server reloads the last committed version);
- :mod:`.distributed`: one process group per stage with every server's ranks, each stage broadcasting
  its buckets in turn (``/update_weights_from_distributed``; gloo on CPU, NCCL on GPUs);
- :mod:`.ipc`: CUDA-IPC handles of the trainer's GPU tensors (``/update_weights_from_tensor``,
  engines on the trainer's node only).

:mod:`.common` holds what they share (bucketing, answer checks, the open/commit bookkeeping, restarting
half-updated servers). All follow SGLang's protocol (``engine_api``): pause generation (``Fleet.updating``),
update (distributed and tensor updates inside a begin/end weight-update session), flush the cache (a
refused flush is retried), continue. Only the last bucket carries the new ``weight_version``, so a
server reports the new version only once it holds all of the new weights. A failed update (a flush that
never succeeds included) leaves a server half-updated: it is restarted at the last good version.
Without a committed disk version, a restarted server waits outside the router for the next push.
"""
from __future__ import annotations

from typing import Optional

import torch

from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import StagedWeightSync, WeightSender
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import iter_buckets
from rollout_sglang.weight_sync.disk import DiskWeightSync, ShardWriter
from rollout_sglang.weight_sync.distributed import BroadcastSender, DistributedWeightSync


def make_weight_sync(fleet: Fleet, cfg: WeightSyncConfig, *, config_dir: Optional[str] = None) -> StagedWeightSync:
    """The fleet owner's side of the transport ``cfg.transport`` names (``config_dir``: HF config files for
    disk versions)."""
    if cfg.transport == "disk":
        return DiskWeightSync(fleet, cfg, config_dir=config_dir)
    if cfg.transport == "ipc":
        from rollout_sglang.weight_sync.ipc import IPCWeightSync

        return IPCWeightSync(fleet, cfg)
    return DistributedWeightSync(fleet, cfg)


def make_sender(cfg: WeightSyncConfig, *, address: Optional[str] = None, device: Optional[torch.device] = None,
                stage_comm=None) -> WeightSender:
    """A pipeline stage's sender for ``cfg.transport`` (any trainer process; no fleet needed). ``address``:
    where servers reach this process (broadcast groups; default ``cfg.master_address``). ``stage_comm`` (IPC,
    an :class:`~rollout_sglang.weight_sync.ipc.StageComm`): every rank of the stage sends from its own GPU."""
    if cfg.transport == "disk":
        return ShardWriter()
    if cfg.transport == "ipc":
        from rollout_sglang.weight_sync.ipc import IPCSender

        return IPCSender(cfg, stage_comm)
    return BroadcastSender(cfg, address=address, device=device)


__all__ = ["BroadcastSender", "DiskWeightSync", "DistributedWeightSync", "ShardWriter", "iter_buckets",
           "make_sender", "make_weight_sync"]
