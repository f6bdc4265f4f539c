"""CUDA-IPC transport for engines colocated with the trainer (same node, the trainer's GPUs visible to
the engine): each bucket is shared as CUDA-IPC handles through ``/update_weights_from_tensor``; the
engine maps the trainer's memory and copies from it, only handles cross the socket (payload:
:func:`ipc_update_payload`). Inside SGLang's begin/end weight-update session; each TP rank of an
engine gets a payload serialized for it alone (rank r deserializes entry r; one payload shared by all
ranks would break the producer's CUDA-IPC reference counts).

Per pipeline stage (:class:`IPCSender` with a :class:`StageComm`): every rank of the stage takes part.
The stage's source rank broadcasts each bucket (one flattened buffer per dtype) to the stage's ranks on
device, every rank serialises handles of *its own* copy for the engine TP ranks that run on its GPU,
and the source rank gathers those strings (small: handles, never tensor data) and posts them, so each
engine TP rank maps memory of its own GPU (a device-local copy, no peer access needed). An engine rank
on a GPU no trainer rank of the stage holds gets handles of the source rank's copy. The GPUs of an
engine's TP ranks come from its launch config (:func:`engine_gpus`).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from rollout_sglang import engine_api as api
from rollout_sglang.config import ServerConfig, WeightSyncConfig
from rollout_sglang.contracts import Bucket, PushPlan
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import (
    OpenPush, call_checked, check_update_response, defer_to_next_push, one_dtype_buckets, post, push_from_one_process,
    push_target, restart_half_updated, with_last,
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


def engine_gpus(cfg: ServerConfig, trainer_visible: Optional[str] = None) -> tuple[str, ...]:
    """The physical GPU of each TP rank of an engine launched with ``cfg``: SGLang puts TP rank r on visible
    device ``base_gpu_id + r * gpu_id_step`` (``--base-gpu-id``, ``--gpu-id-step`` in ``extra_args``) of
    its CUDA_VISIBLE_DEVICES (its ``env``, else inherited from the trainer: ``trainer_visible``)."""
    def flag(name: str, default: int) -> int:
        args = list(cfg.extra_args)
        for i, arg in enumerate(args):
            if arg == name and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith(name + "="):
                return int(arg.split("=", 1)[1])
        return default

    visible = cfg.env.get("CUDA_VISIBLE_DEVICES", trainer_visible)
    base, step = flag("--base-gpu-id", 0), flag("--gpu-id-step", 1)
    return tuple(physical_gpu(visible, base + r * step) for r in range(cfg.tp))


def this_gpu() -> str:
    """The physical GPU of this process's current CUDA device (as :func:`engine_gpus` names them)."""
    return physical_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.current_device())


@dataclass(frozen=True)
class StageComm:
    """How the ranks of one pipeline stage work together on an IPC push (the trainer makes it): ``tensors``
    carries the buckets (NCCL on GPUs), ``objects`` the small handle strings (gloo); ranks are global."""

    tensors: dist.ProcessGroup
    objects: dist.ProcessGroup
    leader: int
    rank: int


def _owners(targets: tuple, gpus_of_ranks: dict[int, str], leader: int) -> dict[tuple[int, int], int]:
    """(target, engine TP rank) -> the trainer rank whose copy that engine rank maps: the rank on its GPU
    (the source rank when several share it), else the source rank."""
    by_gpu: dict[str, int] = {}
    for rank, gpu in sorted(gpus_of_ranks.items(), key=lambda item: (item[0] != leader, item[0])):
        by_gpu.setdefault(gpu, rank)
    return {(i, r): by_gpu.get(t.gpus[r], leader) if r < len(t.gpus) else leader
            for i, t in enumerate(targets) for r in range(t.tp)}


class IPCSender:
    """A stage's source of buckets for the IPC transport (see the module docstring).

    Without ``comm`` only the source rank takes part: every bucket is made resident on its CUDA device,
    pickled as IPC handles once per TP rank of each engine and posted. With ``comm`` (``stage_collective``)
    every rank of the stage calls :meth:`begin`, :meth:`send` and :meth:`end` (an empty bucket off the
    source rank), and each engine TP rank gets handles of the copy on its own GPU. The buckets stay alive
    until every server answered. ``device``, ``gpu``, ``serialize`` and ``post_fn`` default to CUDA, this
    process's GPU, :func:`serialize_for_sglang` and an HTTP post (tests replace them)."""

    def __init__(self, cfg: WeightSyncConfig, comm: Optional[StageComm] = None, *, device: Optional[torch.device] = None,
                 gpu: Optional[str] = None, serialize: Callable[[Any], str] = None, post_fn: Callable = None):
        if device is None:
            if not torch.cuda.is_available():
                raise WeightSyncError("weight_sync.transport=ipc: CUDA IPC needs a CUDA device and none is "
                                      "available here; use transport 'disk' or 'distributed'")
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg = cfg
        self.comm = comm
        self.device = device
        self.gpu = gpu if gpu is not None else (this_gpu() if device.type == "cuda" else "cpu")
        self.serialize = serialize or serialize_for_sglang
        self.post = post_fn or post
        self._plan: Optional[PushPlan] = None
        self._sent = 0
        self._owners: dict[tuple[int, int], int] = {}
        self._failed = False
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def stage_collective(self) -> bool:
        return self.comm is not None

    @property
    def _is_source(self) -> bool:
        return self.comm is None or self.comm.rank == self.comm.leader

    def begin(self, plan: PushPlan, stage: int) -> None:
        self._plan, self._sent, self._failed = plan, 0, False
        if self.comm is not None:  # who holds which GPU, once per push (membership may change between pushes)
            ranks = dist.get_process_group_ranks(self.comm.objects)
            gpus: list = [None] * len(ranks)
            dist.all_gather_object(gpus, self.gpu, group=self.comm.objects)
            self._owners = _owners(plan.targets, dict(zip(ranks, gpus)), self.comm.leader)
        if self._pool is None and plan.targets and self._is_source:
            self._pool = ThreadPoolExecutor(len(plan.targets))

    def _post_all(self, bodies: list[dict]) -> None:
        route = api.UPDATE_WEIGHTS_FROM_TENSOR
        futures = [self._pool.submit(self.post, t, route, body, 600) for t, body in zip(self._plan.targets, bodies)]
        for t, fut in zip(self._plan.targets, futures):
            check_update_response(t, route, *fut.result())

    def send(self, bucket: Bucket, last: bool) -> None:
        if not self._plan.targets:
            return
        if self.comm is not None:
            self._send_from_every_gpu(bucket, last)
            return
        flattened = self.cfg.ipc_flattened_bucket
        parts = one_dtype_buckets([bucket], self.cfg.bucket_bytes) if flattened else [bucket]
        for part, last_part in with_last(parts):
            resident = [(name, t.detach().to(self.device, non_blocking=True)) for name, t in part]
            payload, keep_alive = ipc_update_payload(resident, flattened=flattened)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the engine reads on its own stream
            version = self._plan.version if last and last_part else None
            self._post_all([api.tensor_update_body([self.serialize(payload) for _ in range(t.tp)], flattened=flattened,
                                                   weight_version=version) for t in self._plan.targets])
            self._sent += sum(x.numel() * x.element_size() for x in keep_alive)
            del payload, keep_alive, resident
        self._collect()

    def _collect(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # release the IPC reference counts the engines have dropped

    def _send_from_every_gpu(self, bucket: Bucket, last: bool) -> None:
        """Stage-collective send: the bucket to every rank of the stage, handles from each rank's own copy."""
        comm = self.comm
        source = comm.rank == comm.leader
        parts = list(one_dtype_buckets([bucket], self.cfg.bucket_bytes)) if source and not self._failed else []
        shapes = None if self._failed else [[(name, tuple(t.shape), t.dtype) for name, t in part] for part in parts]
        box = [shapes]
        dist.broadcast_object_list(box, src=comm.leader, group=comm.objects)  # names, shapes, dtypes: small
        shapes = box[0]
        if shapes is None:  # the push failed on the source rank: the stage walks on without sending
            self._failed = True
            return
        error: Optional[Exception] = None
        for k, meta in enumerate(shapes):
            dtype = meta[0][2]
            numel = sum(math.prod(shape) for _, shape, _ in meta)
            if source:
                flat = torch.cat([t.detach().to(self.device).reshape(-1) for _, t in parts[k]])
            else:
                flat = torch.empty(numel, dtype=dtype, device=self.device)
            dist.broadcast(flat, src=comm.leader, group=comm.tensors)
            metadata, start = [], 0
            for name, shape, dt in meta:
                n = math.prod(shape)
                metadata.append(SimpleNamespace(name=name, shape=torch.Size(shape), dtype=dt, start_idx=start,
                                                end_idx=start + n, numel=n))
                start += n
            payload = {"flattened_tensor": flat, "metadata": metadata}
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the engines read on their own streams
            try:
                mine = {key: self.serialize(payload) for key, owner in self._owners.items() if owner == comm.rank}
            except Exception as exc:  # noqa: BLE001 -- told to the source rank, which fails the push
                mine = {"error": f"rank {comm.rank}: {type(exc).__name__}: {exc}"}
            gathered: Optional[list] = [None] * dist.get_world_size(comm.objects) if source else None
            dist.gather_object(mine, gathered, dst=comm.leader, group=comm.objects)
            if source and error is None:
                entries = {key: value for part in gathered for key, value in part.items()}
                version = self._plan.version if last and k == len(shapes) - 1 else None
                try:
                    if "error" in entries:
                        raise WeightSyncError(f"IPC handles: {entries['error']}")
                    self._post_all([api.tensor_update_body([entries[(i, r)] for r in range(t.tp)], flattened=True,
                                                           weight_version=version)
                                    for i, t in enumerate(self._plan.targets)])
                    self._sent += flat.numel() * flat.element_size()
                except Exception as exc:  # noqa: BLE001 -- the stage finishes this bucket's collectives first
                    error = exc
                    self._failed = True  # the next buckets are not sent (the other ranks learn it from the metadata)
            dist.barrier(group=comm.objects)  # every rank keeps its copy until the engines copied
            del payload, flat
        self._collect()
        if error is not None:
            raise error

    def end(self) -> dict:
        return {"bytes": self._sent} if self._is_source else {}

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
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return PushPlan(version=str(version), targets=tuple(
            dataclasses.replace(push_target(s), gpus=engine_gpus(s.cfg, visible)) for s in push.servers))

    def commit_push(self, receipts: list[dict]) -> int:
        push, self._open = self._open, None
        push.finish(self.fleet, api.END_WEIGHT_UPDATE, api.end_weight_update_body())
        return sum(int(r.get("bytes", 0)) for r in receipts if r)

    def abort_push(self) -> None:
        push, self._open = self._open, None
        if push is not None:
            push.abort(self.fleet)

    def sender(self) -> IPCSender:
        return IPCSender(self.cfg)

    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Send every bucket to every healthy server from this process; returns the bytes shared."""
        sender = self.sender()
        try:
            return push_from_one_process(self, sender, buckets, version)
        finally:
            sender.close()

    def close(self) -> None:
        pass
