"""The trainer's weights on the fleet: export from the parallel model, push, check the version.

- :meth:`WeightPublisher.gather` (collective): every rank takes part in the export of HF-named
  tensors (:class:`~megatron_vespo.checkpoint.export.HFWeightExporter`: TP slices, EP experts and PP
  stages assembled by each stage's leader); the tensors end up on rank 0 (CPU).
- :meth:`WeightPublisher.push` (rank 0): the tensors go to every server in buckets of
  ``rollout.weight_sync.bucket_bytes`` through the configured transport (a
  :class:`~rollout_sglang.contracts.WeightSync`), then every server must report the new version.
  ``around_push`` wraps the push: the asynchronous loop holds generation there (and aborts what is
  in flight) instead of the driver knowing about generation.
- A server the fleet restarts is brought to the fleet's version from :meth:`buckets_of`; a failed
  push is tried once more (see :meth:`WeightPublisher.push`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from rollout_sglang.contracts import Bucket, RolloutFleet, WeightSync
from rollout_sglang.errors import RolloutError, WeightSyncError
from rollout_sglang.weight_sync.common import iter_buckets

NamedTensors = list[tuple[str, torch.Tensor]]
PUSH_ATTEMPTS = 2  # a push that fails once (a server died mid-push) is tried again


def gather_hf_weights(exporter: HFWeightExporter) -> NamedTensors:
    """All HF-named tensors on rank 0 (CPU); an empty list elsewhere. Collective over the world.

    Each stage leader holds its stage's tensors after the export; with PP > 1 they are sent to rank
    0 as pickled CPU tensors (fine for small and medium models; very large models want a streaming
    transport from every stage leader instead).
    """
    mine = [(name, t.detach().cpu()) for bucket in exporter.buckets() for name, t in bucket]
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    parts: Optional[list] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return [item for part in parts for item in part] if parts is not None else []


class WeightPublisher:
    """Export, push and version check of the trainer's weights (see the module docstring)."""

    def __init__(self, exporter: HFWeightExporter, bucket_bytes: int):
        self.exporter = exporter
        self.bucket_bytes = bucket_bytes
        self.version = "0"  # the version the fleet holds (= optimizer steps at the last push)
        self.fleet: Optional[RolloutFleet] = None
        self.weight_sync: Optional[WeightSync] = None
        self.around_push: Callable[[], ContextManager] = contextlib.nullcontext
        # Rank 0: pushed weights by version, the fleet's current one and, during a push, the new one: a server
        # restarted mid-push is brought to whichever version the fleet has recorded at that moment.
        self._pushed: dict[str, NamedTensors] = {}

    def gather(self) -> NamedTensors:
        """Collective: the current weights, HF-named, on rank 0 (an empty list elsewhere)."""
        return gather_hf_weights(self.exporter)

    def connect(self, fleet: RolloutFleet, weight_sync: WeightSync) -> None:
        """Rank 0: where :meth:`push` sends to (once the fleet runs)."""
        self.fleet, self.weight_sync = fleet, weight_sync

    def buckets_of(self, version: str) -> Iterator[Bucket]:
        """Rank 0: the pushed weights of ``version`` in buckets (what a restarted server is brought to)."""
        if version not in self._pushed:
            raise WeightSyncError(f"weights of version {version} are not held (held: {sorted(self._pushed)})")
        return iter_buckets(self._pushed[version], self.bucket_bytes)

    def push(self, named: NamedTensors, version: str) -> None:
        """Rank 0: send ``named`` to every server as ``version`` and check that each one that answers reports it.

        A failed push leaves the fleet at the previous version (the transport restarts the servers it
        half-updated, at the version the fleet recorded), so it is tried once more: a server that died
        mid-push does not end the run. A server that is restarting meanwhile is brought to this version
        by the fleet when it is back."""
        with self.around_push():
            self._pushed[version] = named
            for attempt in range(1, PUSH_ATTEMPTS + 1):
                try:
                    self.weight_sync.push(iter_buckets(named, self.bucket_bytes), version)
                    break
                except RolloutError as exc:
                    if attempt == PUSH_ATTEMPTS:
                        if version != self.version:
                            del self._pushed[version]
                        raise
                    print(f"[weights] push of version {version} failed ({exc}); the fleet is back at version "
                          f"{self.version}; pushing again", flush=True)
            for old in [v for v in self._pushed if v != version]:
                del self._pushed[old]
            self.version = version
            reported = self.fleet.weight_versions()
            if any(v != version for v in reported):
                raise WeightSyncError(f"weight sync: pushed version {version}, servers report {reported}")
            if not reported:
                print(f"[weights] version {version}: no server answered (restarting); each gets it when it is back",
                      flush=True)
