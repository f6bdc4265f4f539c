"""Pushing new policy weights (HF names and dtypes) to the rollout fleet, with a version per update.

One module per transport, each a :class:`~rollout_sglang.contracts.WeightSync`:

- :mod:`.disk`: an HF safetensors directory per version and ``/update_weights_from_disk`` (works
  across machines with a shared filesystem; always recoverable);
- :mod:`.distributed`: a broadcast over a process group of the trainer and every server's ranks
  (``/update_weights_from_distributed``; gloo on CPU, NCCL on GPUs);
- :mod:`.ipc`: CUDA-IPC handles of the trainer's GPU tensors (``/update_weights_from_tensor``,
  engines on the trainer's node only).

:mod:`.common` holds what they share (bucketing, answer checks, restarting half-updated servers).
All follow SGLang's protocol (``engine_api``): pause generation (``Fleet.updating``), update (distributed
and tensor updates inside a begin/end weight-update session), flush the cache (a refused flush is
retried), continue. Only the last bucket carries the new ``weight_version``, so a server reports the
new version only once it holds all of the new weights. A failed update (a flush that never succeeds
included) leaves a server half-updated: it is restarted at the last good version.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket, WeightSync
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import iter_buckets
from rollout_sglang.weight_sync.disk import DiskWeightSync
from rollout_sglang.weight_sync.distributed import DistributedWeightSync


def make_weight_sync(fleet: Fleet, cfg: WeightSyncConfig, *, config_dir: Optional[str] = None,
                     state_provider: Optional[Callable[[str], Iterable[Bucket]]] = None) -> WeightSync:
    """The transport ``cfg.transport`` names (``config_dir``: HF config files for disk versions;
    ``state_provider``: the weights of a version as buckets, to bring a restarted server to the fleet's version)."""
    if cfg.transport == "disk":
        return DiskWeightSync(fleet, cfg, config_dir=config_dir)
    if cfg.transport == "ipc":
        from rollout_sglang.weight_sync.ipc import IPCWeightSync

        return IPCWeightSync(fleet, cfg, state_provider=state_provider)
    return DistributedWeightSync(fleet, cfg, state_provider=state_provider)


__all__ = ["DiskWeightSync", "DistributedWeightSync", "iter_buckets", "make_weight_sync"]
