"""Distributed transport: every pipeline stage of the trainer broadcasts its own buckets to the servers.

Two halves, so that no process ever holds more than its stage's current bucket:

- :class:`BroadcastSender` runs on a stage's source rank (any trainer process, any node). It forms one
  process group with every target server's ranks, exactly as SGLang forms its side
  (:mod:`rollout_sglang.process_group`): it hosts the rendezvous (rank 0 of the group) while its HTTP
  ``/init_weights_update_group`` calls ask each server to join; then per bucket it calls
  ``/update_weights_from_distributed`` on every server (names, dtypes, shapes) and broadcasts the
  tensors while they wait in it. gloo on CPU, NCCL on GPUs.
- :class:`DistributedWeightSync` runs where the fleet is (trainer rank 0). It opens a push (pause,
  ``/begin_weight_update``) and says which servers the senders update and under which group names
  (:class:`~rollout_sglang.contracts.PushPlan`), and commits it (``/end_weight_update``, flush,
  version, continue) or, when a sender failed, restarts the half-updated servers at the last good
  version.

One group per stage (``<prefix>_pp<stage>``), kept across pushes while the membership is the same.
The caller sends the stages one after another: SGLang's scheduler handles one update call at a time,
so two stages broadcasting at once could each wait for a server busy with the other's group. Only the
last bucket of the last stage carries the version.

A restarted server cannot be restored from here (the weights exist only in the live trainer): it waits
outside the router until the next push includes it (``common.defer_to_next_push``).

``push(buckets, version)`` (the :class:`~rollout_sglang.contracts.WeightSync` contract) does all of it
in this process, for callers that hold the buckets themselves (tests, tools, benchmarks).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import torch

from rollout_sglang import engine_api as api
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket, PushPlan, PushTarget
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet, ManagedServer
from rollout_sglang.net import find_free_port
from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group
from rollout_sglang.weight_sync.common import (
    OpenPush, check_update_response, call_checked, defer_to_next_push, dtype_name, flatten_bucket,
    one_dtype_buckets, post, push_from_one_process, push_target, restart_half_updated, with_last,
)

logger = logging.getLogger(__name__)


def stage_group_name(prefix: str, stage: int) -> str:
    return f"{prefix}_pp{stage}"


class BroadcastSender:
    """A stage's source of buckets for the broadcast transport (see the module docstring).

    ``address``: where the servers reach this process to join its group (default
    ``cfg.master_address``; a stage on another node passes its own). ``device``: where tensors are
    sent from (NCCL needs CUDA tensors; default: the current CUDA device with NCCL, in place with gloo).
    """

    def __init__(self, cfg: WeightSyncConfig, address: Optional[str] = None, port: Optional[int] = None,
                 device: Optional[torch.device] = None):
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.backend=nccl: NCCL sends from a CUDA device and none is available "
                                  "here; use backend 'gloo'")
        self.cfg = cfg
        self.address = address or cfg.master_address
        self.port = cfg.master_port if port is None else port
        if device is None and cfg.backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._group: Optional[torch.distributed.ProcessGroup] = None
        self._group_name = ""
        self._members: tuple[PushTarget, ...] = ()
        self._version = ""
        self._sent = 0
        self._timing = {"broadcast_s": 0.0, "answer_s": 0.0}
        self._pool: Optional[ThreadPoolExecutor] = None

    # ---- the group ------------------------------------------------------------------------------
    def _form(self, targets: tuple[PushTarget, ...], name: str) -> torch.distributed.ProcessGroup:
        """HTTP init on every server and our own rank-0 creation, concurrently; fail fast on a refusal."""
        port = self.port or find_free_port(self.address)
        offsets, world = [], 1
        for t in targets:
            offsets.append(world)
            world += t.tp
        pool = ThreadPoolExecutor(len(targets) + 1)
        futures = [pool.submit(post, t, api.INIT_WEIGHTS_UPDATE_GROUP, api.init_group_body(
            master_address=self.address, master_port=port, rank_offset=off, world_size=world,
            group_name=name, backend=self.cfg.backend), self.cfg.group_timeout_s + 30)
            for t, off in zip(targets, offsets)]
        ours = pool.submit(init_custom_process_group, backend=self.cfg.backend, master_address=self.address,
                           master_port=port, world_size=world, rank=0, group_name=name,
                           timeout_s=self.cfg.group_timeout_s)
        try:
            while not ours.done():  # a server that refuses never joins: notice it instead of waiting out the timeout
                for t, fut in zip(targets, futures):
                    if fut.done():
                        check_update_response(t, api.INIT_WEIGHTS_UPDATE_GROUP, *fut.result())
                time.sleep(0.02)
            try:
                group = ours.result()
            except Exception as exc:
                raise WeightSyncError(f"creating weight-sync group {name!r} (world {world}) failed: {exc}") from exc
            for t, fut in zip(targets, futures):
                check_update_response(t, api.INIT_WEIGHTS_UPDATE_GROUP, *fut.result())
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"joining servers to {name!r} failed: {exc}") from exc
        pool.shutdown(wait=True)
        return group

    def _leave(self) -> None:
        """Destroy our group here and, best effort, on its members (a restarted one no longer has it)."""
        if self._group is None:
            return
        for t in self._members:
            try:
                post(t, api.DESTROY_WEIGHTS_UPDATE_GROUP, api.destroy_group_body(self._group_name), timeout_s=30)
            except OSError:
                pass
        destroy_custom_process_group(self._group)
        self._group, self._group_name, self._members = None, "", ()

    # ---- WeightSender ---------------------------------------------------------------------------
    def begin(self, plan: PushPlan, stage: int) -> None:
        name = stage_group_name(plan.group_prefix, stage)
        if self._group is None or name != self._group_name or plan.targets != self._members:
            self._leave()
            if plan.targets:
                self._group = self._form(plan.targets, name)
                self._group_name, self._members = name, plan.targets
        self._version, self._sent = plan.version, 0
        self._timing = {"broadcast_s": 0.0, "answer_s": 0.0}
        if self._pool is None and plan.targets:
            self._pool = ThreadPoolExecutor(len(plan.targets))

    def _sendable(self, bucket: Bucket) -> list[torch.Tensor]:
        """The tensors one broadcast sends for ``bucket``, on the backend's device."""
        tensors = [t.detach() if self.device is None else t.detach().to(self.device, non_blocking=True)
                   for _, t in bucket]
        if self.cfg.flattened_bucket:
            return [flatten_bucket([(name, t) for (name, _), t in zip(bucket, tensors)])]
        return [t.contiguous() for t in tensors]

    def send(self, bucket: Bucket, last: bool) -> None:
        if not self._members:
            return
        parts = one_dtype_buckets([bucket], self.cfg.bucket_bytes) if self.cfg.flattened_bucket else [bucket]
        for part, last_part in with_last(parts):
            self._broadcast(part, self._version if last and last_part else None)

    def _broadcast(self, bucket: Bucket, version: Optional[str]) -> None:
        route = api.UPDATE_WEIGHTS_FROM_DISTRIBUTED
        body = api.distributed_update_body(
            names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for _, t in bucket],
            shapes=[list(t.shape) for _, t in bucket], group_name=self._group_name,
            weight_version=version,  # the version changes once every tensor is in
            flattened=self.cfg.flattened_bucket)
        t0 = time.perf_counter()
        futures = [self._pool.submit(post, t, route, body, 600) for t in self._members]
        sending = self._sendable(bucket)
        handles = [torch.distributed.broadcast(t, group=self._group, group_src=0, async_op=True) for t in sending]
        # A server that refused the request never joins the collective: notice it instead of hanging. (The
        # group runs its broadcasts in order: the last one done means all are.)
        while not handles[-1].is_completed():
            for t, fut in zip(self._members, futures):
                if fut.done():
                    check_update_response(t, route, *fut.result())
            time.sleep(0.0005)
        for h in handles:
            h.wait()
        t1 = time.perf_counter()
        for t, fut in zip(self._members, futures):
            check_update_response(t, route, *fut.result())
        self._sent += sum(t.numel() * t.element_size() for t in sending)
        # Where a push's time goes: the broadcasts (HTTP call included), then the servers loading and answering.
        self._timing["broadcast_s"] += t1 - t0
        self._timing["answer_s"] += time.perf_counter() - t1

    def end(self) -> dict:
        return {"bytes": self._sent, **self._timing}

    def reset(self) -> None:
        """A failed collective leaves the group unusable (and its servers are being restarted)."""
        if self._group is not None:
            destroy_custom_process_group(self._group)
        self._group, self._group_name, self._members = None, "", ()

    def close(self) -> None:
        self._leave()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class DistributedWeightSync:
    """The fleet owner's side of the broadcast transport (see the module docstring)."""

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig):
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.backend=nccl: NCCL sends from a CUDA device and none is available "
                                  "here; use backend 'gloo'")
        self.fleet = fleet
        self.cfg = cfg
        self._prefix = ""
        self._member_ids: list[tuple[int, int]] = []
        self._open: Optional[OpenPush] = None
        self._local: Optional[BroadcastSender] = None
        self._lock = threading.Lock()
        fleet.add_restorer(defer_to_next_push)

    @staticmethod
    def _identity(servers: list[ManagedServer]) -> list[tuple[int, int]]:
        # A restarted server is a new process that is not in the old groups: compare pids too.
        return [(s.index, s.proc.pid if s.proc is not None else -1) for s in servers]

    # ---- StagedWeightSync -----------------------------------------------------------------------
    def open_push(self, version: str, restore_only: bool = False) -> PushPlan:
        if self._open is not None:
            raise WeightSyncError("a push is already open")
        push = OpenPush.open(self.fleet, version, self.cfg.pause_mode, restore_only)
        try:
            if push.servers:
                call_checked(self.fleet, push.servers, api.BEGIN_WEIGHT_UPDATE, api.begin_weight_update_body(),
                             timeout_s=120)
        except Exception:
            restart_half_updated(self.fleet, push.servers)
            push.close()
            raise
        identity = self._identity(push.servers)
        if identity != self._member_ids:  # new groups for the new membership
            self._prefix = f"{self.cfg.group_name}_{uuid.uuid4().hex[:8]}"
            self._member_ids = identity
        self._open = push
        return PushPlan(version=str(version), targets=tuple(push_target(s) for s in push.servers),
                        group_prefix=self._prefix)

    def commit_push(self, receipts: list[dict]) -> int:
        push, self._open = self._open, None
        push.finish(self.fleet, api.END_WEIGHT_UPDATE, api.end_weight_update_body(), on_failure=self._forget_groups)
        return sum(int(r.get("bytes", 0)) for r in receipts if r)

    def abort_push(self) -> None:
        push, self._open = self._open, None
        if push is not None:
            push.abort(self.fleet, on_failure=self._forget_groups)

    def _forget_groups(self) -> None:
        """The next push forms new groups (the failed ones are unusable)."""
        self._prefix, self._member_ids = "", []

    def sender(self) -> BroadcastSender:
        return BroadcastSender(self.cfg)

    # ---- WeightSync: everything in this process ---------------------------------------------------
    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Broadcast every bucket to every healthy server (and the restarted ones that wait); bytes sent."""
        with self._lock:
            if self._local is None:
                self._local = self.sender()
            return push_from_one_process(self, self._local, buckets, version, on_error=self._local.reset)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
