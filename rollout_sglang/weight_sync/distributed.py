"""Distributed transport: broadcast buckets over a process group of {trainer rank 0} ∪ {every
server's ranks}, formed exactly as SGLang forms its side (:mod:`rollout_sglang.process_group`; the HTTP
``/init_weights_update_group`` calls and the trainer's own group creation run concurrently), while
each server waits in ``/update_weights_from_distributed``. gloo on CPU, NCCL on GPUs.

Per push (SGLang's order): pause -> (re)form the group when the membership changed ->
``begin_weight_update`` -> one ``update_weights_from_distributed`` per bucket, the last carrying the
version -> ``end_weight_update`` -> flush -> continue. With the NCCL backend every bucket is sent from
this process's CUDA device (a CPU tensor cannot go through NCCL). A flattened bucket holds one dtype
(``common.one_dtype_buckets``).

A failed collective leaves the group unusable and the servers half-updated: the group is dropped and
the servers restarted at the last good version. A server the fleet restarts is brought to the current
weights through a one-off group of two, from ``state_provider`` (the buckets of the fleet's version).
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import torch

from rollout_sglang import engine_api as api
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet, ManagedServer, WeightState
from rollout_sglang.net import find_free_port
from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group
from rollout_sglang.weight_sync.common import (
    check_update_response, dtype_name, flatten_bucket, one_dtype_buckets, restart_half_updated,
    weight_update_session, with_last,
)


class DistributedWeightSync:
    """Trainer side of the broadcast transport; call :meth:`push` after each optimizer round.

    ``state_provider`` (optional) returns a version's weights as buckets; with it, a server restarted
    by the fleet is brought to the current weights through its own one-off group.
    """

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig,
                 state_provider: Optional[Callable[[str], Iterable[Bucket]]] = None):
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.backend=nccl: NCCL sends from a CUDA device and none is available "
                                  "here; use backend 'gloo'")
        self.fleet = fleet
        self.cfg = cfg
        self.state_provider = state_provider
        # Where the tensors are sent from: NCCL takes CUDA tensors only, gloo takes them where they are.
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.backend == "nccl" else None
        self._group: Optional[torch.distributed.ProcessGroup] = None
        self._group_name = ""
        self._members: list[ManagedServer] = []
        self._member_ids: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        if state_provider is not None:
            fleet.add_restorer(self._restore)

    # ---- group management ----------------------------------------------------------------------
    def _form_group(self, servers: list[ManagedServer], group_name: str) -> torch.distributed.ProcessGroup:
        """Create the group: HTTP init on every server and our rank-0 creation, concurrently."""
        port = self.cfg.master_port or find_free_port(self.cfg.master_address)
        offsets, world = [], 1
        for s in servers:
            offsets.append(world)
            world += s.cfg.tp
        pool = ThreadPoolExecutor(len(servers) + 1)
        futures = [pool.submit(self.fleet.call, s, api.INIT_WEIGHTS_UPDATE_GROUP, api.init_group_body(
            master_address=self.cfg.master_address, master_port=port, rank_offset=off, world_size=world,
            group_name=group_name, backend=self.cfg.backend), timeout_s=self.cfg.group_timeout_s + 30)
            for s, off in zip(servers, offsets)]
        ours = pool.submit(init_custom_process_group, backend=self.cfg.backend, master_address=self.cfg.master_address,
                           master_port=port, world_size=world, rank=0, group_name=group_name,
                           timeout_s=self.cfg.group_timeout_s)
        try:
            # Fail fast if a server refuses to join, instead of waiting out the rendezvous timeout.
            while not ours.done():
                for s, fut in zip(servers, futures):
                    if fut.done():
                        status, data = fut.result()
                        check_update_response(s, api.INIT_WEIGHTS_UPDATE_GROUP, status, data)
                time.sleep(0.02)
            try:
                group = ours.result()
            except Exception as exc:
                raise WeightSyncError(f"creating weight-sync group {group_name!r} (world {world}) failed: {exc}") from exc
            for s, fut in zip(servers, futures):
                status, data = fut.result()
                check_update_response(s, api.INIT_WEIGHTS_UPDATE_GROUP, status, data)
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"joining servers to {group_name!r} failed: {exc}") from exc
        pool.shutdown(wait=True)
        return group

    def connect(self) -> None:
        """(Re)form the group over the currently healthy servers."""
        with self._lock:
            self._disconnect_locked()
            servers = self.fleet.healthy_servers()
            if not servers:
                raise WeightSyncError("no healthy servers to connect to")
            name = f"{self.cfg.group_name}_{uuid.uuid4().hex[:8]}"
            self._group = self._form_group(servers, name)
            self._group_name = name
            self._members = servers
            self._member_ids = self._identity(servers)

    def _disconnect_locked(self) -> None:
        if self._group is None:
            return
        live = [s for s, ident in zip(self._members, self._member_ids)
                if s.state == "healthy" and s.alive() and self._identity([s])[0] == ident]
        self.fleet.call_all(api.DESTROY_WEIGHTS_UPDATE_GROUP, api.destroy_group_body(self._group_name), servers=live)
        destroy_custom_process_group(self._group)
        self._group, self._members, self._member_ids = None, [], []

    def close(self) -> None:
        with self._lock:
            self._disconnect_locked()

    @staticmethod
    def _identity(servers: list[ManagedServer]) -> list[tuple[int, int]]:
        # A restarted server is a new process that is not in the old group: compare pids too.
        return [(s.index, s.proc.pid if s.proc is not None else -1) for s in servers]

    def _membership_current(self) -> bool:
        healthy = self.fleet.healthy_servers()
        return self._identity(healthy) == self._member_ids and all(s.alive() for s in healthy)

    # ---- pushing -------------------------------------------------------------------------------
    def _sendable(self, bucket: Bucket) -> list[torch.Tensor]:
        """The tensors one broadcast sends for ``bucket``, on the backend's device."""
        tensors = [t.detach() if self.device is None else t.detach().to(self.device, non_blocking=True)
                   for _, t in bucket]
        if self.cfg.flattened_bucket:
            return [flatten_bucket([(name, t) for (name, _), t in zip(bucket, tensors)])]
        return [t.contiguous() for t in tensors]

    def _broadcast(self, group, group_name: str, servers: list[ManagedServer], buckets: Iterable[Bucket],
                   version: str) -> int:
        total = 0
        if self.cfg.flattened_bucket:
            buckets = one_dtype_buckets(buckets, self.cfg.bucket_bytes)
        route = api.UPDATE_WEIGHTS_FROM_DISTRIBUTED
        with ThreadPoolExecutor(len(servers)) as pool:
            for bucket, last in with_last(buckets):
                body = api.distributed_update_body(
                    names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for _, t in bucket],
                    shapes=[list(t.shape) for _, t in bucket], group_name=group_name,
                    weight_version=version if last else None,  # the version changes once every tensor is in
                    flattened=self.cfg.flattened_bucket)
                futures = [pool.submit(self.fleet.call, s, route, body, 600) for s in servers]
                sending = self._sendable(bucket)
                handles = [torch.distributed.broadcast(t, group=group, group_src=0, async_op=True) for t in sending]
                # A server that refused the request never joins the collective: notice it instead of hanging.
                while not all(h.is_completed() for h in handles):
                    for s, fut in zip(servers, futures):
                        if fut.done():
                            status, data = fut.result()
                            check_update_response(s, route, status, data)
                    time.sleep(0.0005)
                for h in handles:
                    h.wait()
                total += sum(t.numel() * t.element_size() for t in sending)
                for s, fut in zip(servers, futures):
                    status, data = fut.result()
                    check_update_response(s, route, status, data)
        return total

    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Broadcast every bucket to every healthy server; returns the bytes sent."""
        with self.fleet.updating(self.cfg.pause_mode) as servers:
            if not servers:  # every server is restarting: each is brought to this version when it is back
                self.fleet.record_weights(str(version), disk_path=None)
                return 0
            if self._group is None or not self._membership_current():
                self.connect()  # a server died or came back since the group was formed
            with self._lock:
                try:
                    with weight_update_session(self.fleet, self._members):
                        sent = self._broadcast(self._group, self._group_name, self._members, buckets, str(version))
                    self.fleet.flush_cache(self._members)
                except Exception:
                    members = list(self._members)
                    self._disconnect_locked()  # a failed collective leaves the group unusable
                    restart_half_updated(self.fleet, members)
                    raise
            self.fleet.record_weights(str(version), disk_path=None)
        return sent

    def _restore(self, server: ManagedServer, weights: WeightState) -> None:
        """Bring one restarted server to the current weights through a one-off group of two."""
        if self.state_provider is None or weights.disk_path is not None:
            raise NotImplementedError
        name = f"{self.cfg.group_name}_restore_{uuid.uuid4().hex[:8]}"
        group = self._form_group([server], name)
        try:
            with weight_update_session(self.fleet, [server]):
                self._broadcast(group, name, [server], self.state_provider(weights.version), weights.version)
        finally:
            self.fleet.call(server, api.DESTROY_WEIGHTS_UPDATE_GROUP, api.destroy_group_body(name), timeout_s=30)
            destroy_custom_process_group(group)
