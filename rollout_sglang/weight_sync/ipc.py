"""CUDA-IPC transport for engines colocated with the trainer (same node, the trainer's GPU visible to
the engine): each bucket is shared as CUDA-IPC handles through ``/update_weights_from_tensor``; the
engine maps the trainer's memory and copies from it, only handles cross the socket (payload:
:func:`ipc_update_payload`). Inside SGLang's begin/end weight-update session; each TP rank of an
engine gets a payload serialized for it alone (rank r deserializes entry r; one payload shared by all
ranks would break the producer's CUDA-IPC reference counts).
"""
from __future__ import annotations

import base64
import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch

from rollout_sglang import engine_api as api
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket, PushPlan
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import (
    OpenPush, call_checked, check_update_response, defer_to_next_push, one_dtype_buckets, post, push_target,
    restart_half_updated, with_last,
)

# SGLang's /update_weights_from_tensor takes ``serialized_named_tensors``: one string per TP rank of
# the engine, each base64(ForkingPickler(obj)), where CUDA tensors pickle as IPC handles. The server
# unpickles with an allow-list (builtins, collections, types, torch, multiprocessing, sglang), so the
# payload may reference nothing from this package: the bucket metadata are SimpleNamespaces and the
# rebuild function is torch's own. SGLang patches torch's CUDA rebuild to take the device *UUID* in
# place of the ordinal (argument 6), since the engine and the trainer number GPUs differently (their
# CUDA_VISIBLE_DEVICES differ); our reducer writes the UUID there without patching torch globally.

_CUDA_REBUILD_DEVICE_ARG = 6  # the storage device in torch.multiprocessing.reductions.rebuild_cuda_tensor's args


def _reduce_tensor_for_sglang(tensor: torch.Tensor):
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    device = args[_CUDA_REBUILD_DEVICE_ARG] if len(args) > _CUDA_REBUILD_DEVICE_ARG else None
    # An int ordinal only: if SGLang's own patch is active in this process, it already wrote the UUID.
    if rebuild is reductions.rebuild_cuda_tensor and isinstance(device, int):
        uuid_str = str(torch.cuda.get_device_properties(device).uuid)
        args = (*args[:_CUDA_REBUILD_DEVICE_ARG], uuid_str, *args[_CUDA_REBUILD_DEVICE_ARG + 1:])
    return rebuild, args


class _SGLangPickler(ForkingPickler):
    """ForkingPickler (tensors as shared-memory / CUDA-IPC handles) with device UUIDs for CUDA tensors."""

    def __init__(self, *args):
        import torch.multiprocessing  # noqa: F401  (registers torch's reducers with ForkingPickler)

        super().__init__(*args)
        self.dispatch_table[torch.Tensor] = _reduce_tensor_for_sglang
        self.dispatch_table[torch.nn.Parameter] = _reduce_tensor_for_sglang


def serialize_for_sglang(obj: Any) -> str:
    """base64 of ``obj`` pickled the way SGLang's ``MultiprocessingSerializer.deserialize`` reads it."""
    buf = io.BytesIO()
    _SGLangPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def ipc_update_payload(bucket: list[tuple[str, torch.Tensor]], flattened: bool) -> tuple[Any, list[torch.Tensor]]:
    """The object SGLang's ModelRunner.update_weights_from_tensor expects, and the tensors to keep alive.

    ``flattened``: ``{"flattened_tensor": 1-D tensor, "metadata": [.name .shape .dtype .start_idx
    .end_idx .numel]}`` (``load_format="flattened_bucket"``), one IPC handle per bucket; otherwise a
    list of ``(name, tensor)`` (``load_format`` None).
    """
    tensors = [(name, t.detach().contiguous()) for name, t in bucket]
    if not flattened:
        return tensors, [t for _, t in tensors]
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype; got {sorted(map(str, dtypes))} (use one_dtype_buckets)")
    flat = torch.cat([t.reshape(-1) for _, t in tensors])
    metadata, start = [], 0
    for name, t in tensors:
        metadata.append(SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                        end_idx=start + t.numel(), numel=t.numel()))
        start += t.numel()
    return {"flattened_tensor": flat, "metadata": metadata}, [flat]


def per_rank_payloads(payload: Any, tp: int) -> list[str]:
    """What ``serialized_named_tensors`` holds for an engine of ``tp`` ranks: the payload serialized once
    per rank (rank r deserializes entry r only; a handle is taken once, so a shared entry would break
    the producer-side reference counts)."""
    return [serialize_for_sglang(payload) for _ in range(tp)]


def physical_gpu(visible_devices: Optional[str], index: int) -> str:
    """The entry naming device ``index`` of a process whose CUDA_VISIBLE_DEVICES is ``visible_devices``."""
    if not visible_devices:
        return str(index)
    entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
    return entries[index] if index < len(entries) else str(index)


def engine_sees(engine_visible_devices: Optional[str], trainer_gpu: str) -> bool:
    """Whether an engine launched with CUDA_VISIBLE_DEVICES=``engine_visible_devices`` (None: inherited from
    the trainer) can open memory of the trainer's GPU ``trainer_gpu`` (a physical id or UUID)."""
    if engine_visible_devices is None:
        return True
    return trainer_gpu in {e.strip() for e in engine_visible_devices.split(",")}


def _is_local_address(host: str) -> bool:
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        return socket.gethostbyname(host) in local
    except OSError:
        return False


class IPCSender:
    """A stage's source of buckets for the IPC transport: every bucket made resident on this process's CUDA
    device, pickled as IPC handles (once per TP rank of each engine: each rank maps the trainer's memory and
    copies what it needs) and posted to every target's ``/update_weights_from_tensor``. The bucket stays
    alive until every server answered."""

    def __init__(self, cfg: WeightSyncConfig):
        if not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.transport=ipc: CUDA IPC needs a CUDA device and none is available "
                                  "here; use transport 'disk' or 'distributed'")
        self.cfg = cfg
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._plan: Optional[PushPlan] = None
        self._sent = 0
        self._pool: Optional[ThreadPoolExecutor] = None

    def begin(self, plan: PushPlan, stage: int) -> None:
        self._plan, self._sent = plan, 0
        if self._pool is None and plan.targets:
            self._pool = ThreadPoolExecutor(len(plan.targets))

    def send(self, bucket: Bucket, last: bool) -> None:
        if not self._plan.targets:
            return
        flattened = self.cfg.ipc_flattened_bucket
        route = api.UPDATE_WEIGHTS_FROM_TENSOR
        parts = one_dtype_buckets([bucket], self.cfg.bucket_bytes) if flattened else [bucket]
        for part, last_part in with_last(parts):
            resident = [(name, t.detach().to(self.device, non_blocking=True)) for name, t in part]
            payload, keep_alive = ipc_update_payload(resident, flattened=flattened)
            torch.cuda.current_stream(self.device).synchronize()  # the engine reads on its own stream
            version = self._plan.version if last and last_part else None
            futures = [self._pool.submit(post, t, route, api.tensor_update_body(
                per_rank_payloads(payload, t.tp), flattened=flattened, weight_version=version), 600)
                for t in self._plan.targets]
            for t, fut in zip(self._plan.targets, futures):
                check_update_response(t, route, *fut.result())
            self._sent += sum(x.numel() * x.element_size() for x in keep_alive)
            del payload, keep_alive, resident
        torch.cuda.ipc_collect()  # release the IPC reference counts the engines have dropped

    def end(self) -> dict:
        return {"bytes": self._sent}

    def reset(self) -> None:
        pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class IPCWeightSync:
    """The fleet owner's side of the IPC transport (engines on this node that see the trainer's GPUs).

    Opens a push (pause, ``/begin_weight_update``), lets the stages' :class:`IPCSender` s post their
    buckets, commits (``/end_weight_update``, flush, version) or restarts the half-updated servers. A
    restarted server waits for the next push (no copy of the weights is kept)."""

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig):
        if not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.transport=ipc: CUDA IPC needs a CUDA device and none is available "
                                  "here; use transport 'disk' or 'distributed'")
        remote = [f"servers[{s.index}] ({s.host or s.cfg.host})" for s in fleet.servers
                  if not _is_local_address(s.host or s.cfg.host)]
        if remote:
            raise WeightSyncError(f"weight_sync.transport=ipc: CUDA IPC only reaches engines on this node; "
                                  f"{', '.join(remote)} are elsewhere (use 'distributed')")
        self.device = torch.device("cuda", torch.cuda.current_device())
        ours = physical_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"), self.device.index)
        blind = [f"servers[{s.index}] (CUDA_VISIBLE_DEVICES={s.cfg.env['CUDA_VISIBLE_DEVICES']})"
                 for s in fleet.servers if not engine_sees(s.cfg.env.get("CUDA_VISIBLE_DEVICES"), ours)]
        if blind:
            raise WeightSyncError(f"weight_sync.transport=ipc: the engine must see the trainer's GPU {ours} to map "
                                  f"its memory; {', '.join(blind)} do not")
        self.fleet = fleet
        self.cfg = cfg
        self._open: Optional[OpenPush] = None
        fleet.add_restorer(defer_to_next_push)

    def open_push(self, version: str, restore_only: bool = False) -> PushPlan:
        push = OpenPush.open(self.fleet, version, self.cfg.pause_mode, restore_only)
        try:
            if push.servers:
                call_checked(self.fleet, push.servers, api.BEGIN_WEIGHT_UPDATE, api.begin_weight_update_body(),
                             timeout_s=120)
        except Exception:
            restart_half_updated(self.fleet, push.servers)
            push.close()
            raise
        self._open = push
        return PushPlan(version=str(version), targets=tuple(push_target(s) for s in push.servers))

    def commit_push(self, receipts: list[dict]) -> int:
        push, self._open = self._open, None
        try:
            if push.servers:
                try:
                    call_checked(self.fleet, push.servers, api.END_WEIGHT_UPDATE, api.end_weight_update_body())
                    self.fleet.flush_cache(push.servers)
                except Exception:
                    restart_half_updated(self.fleet, push.servers)
                    raise
            self.fleet.record_weights(push.version, disk_path=None)
            push.register_restored(self.fleet)
        finally:
            push.close()
        return sum(int(r.get("bytes", 0)) for r in receipts if r)

    def abort_push(self) -> None:
        push, self._open = self._open, None
        if push is None:
            return
        try:
            restart_half_updated(self.fleet, push.servers)
        finally:
            push.close()

    def sender(self) -> IPCSender:
        return IPCSender(self.cfg)

    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Send every bucket to every healthy server from this process; returns the bytes shared."""
        plan = self.open_push(str(version))
        sender = self.sender()
        try:
            sender.begin(plan, 0)
            for bucket, last in with_last(buckets):
                sender.send(bucket, last)
            receipt = sender.end()
        except Exception:
            self.abort_push()
            raise
        finally:
            sender.close()
        return self.commit_push([receipt])

    def close(self) -> None:
        pass
