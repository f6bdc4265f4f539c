"""Pushing new policy weights (HF names and dtypes) to the rollout fleet, with a version per update.

Three transports (:func:`make_weight_sync` picks one from ``WeightSyncConfig.transport``):

* :class:`DiskWeightSync` writes an HF safetensors directory per version and asks every server to
  ``/update_weights_from_disk`` (works across machines with a shared filesystem; always
  recoverable: a restarted server reloads the same directory).
* :class:`DistributedWeightSync` forms one process group {trainer rank 0} ∪ {every server's ranks}
  exactly as SGLang does (see process_group.py; the HTTP ``/init_weights_update_group`` calls and the
  trainer's own group creation run concurrently), then broadcasts buckets of tensors while each
  server waits in ``/update_weights_from_distributed``. gloo on CPU, NCCL on GPUs.
* :class:`IPCWeightSync` (colocated GPU engines only) sends CUDA-IPC handles of the trainer's GPU
  tensors through ``/update_weights_from_tensor``: the engine maps the trainer's memory and copies
  from it; only handles cross the socket (payload format: :func:`ipc_update_payload`).

All pause generation (in place), update, flush and continue (``Fleet.updating``), and only the
last bucket carries the new ``weight_version``, so a server reports the new version only once it
holds all of the new weights. A failed update leaves a server half-updated: it is restarted.
"""
from __future__ import annotations

import base64
import io
import itertools
import logging
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import torch
from safetensors.torch import save_file

from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet, ManagedServer, WeightState
from rollout_sglang.net import find_free_port, http_json
from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group

T = TypeVar("T")

logger = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _named_tensor_bytes(item: tuple[str, torch.Tensor]) -> int:
    return item[1].numel() * item[1].element_size()


def iter_buckets(items: Iterable[T], bucket_bytes: int,
                 nbytes: Callable[[T], int] = _named_tensor_bytes) -> Iterator[list[T]]:
    """Group items (default: ``(name, tensor)`` pairs) in order into buckets of at most
    ``bucket_bytes`` as measured by ``nbytes``; an item bigger than that goes alone."""
    bucket: list[T] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """SGLang's FlattenedTensorBucket layout: each tensor's bytes, concatenated in order, as uint8."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def _capture(fn: Callable, *args) -> Optional[Exception]:
    try:
        fn(*args)
        return None
    except Exception as exc:
        return exc


def _check(server: ManagedServer, endpoint: str, status: int, data: object) -> None:
    if status != 200 or not isinstance(data, dict) or data.get("success") is False:
        raise WeightSyncError(f"server {server.index} ({server.url}){endpoint}: HTTP {status}: {str(data)[:300]}")


def restart_half_updated(fleet: Fleet, servers: list[ManagedServer]) -> None:
    """After a failed update every member may hold a mix of versions: restart them at the last good one.

    Runs inside ``Fleet.updating`` (this thread holds ``update_lock``): relaunch concurrently, then
    restore and re-register here.
    """
    if not servers:
        return
    logger.error("weight update failed; restarting %d server(s) at version %s", len(servers), fleet.weights.version)
    with ThreadPoolExecutor(len(servers)) as pool:
        outcomes = list(pool.map(lambda s: _capture(fleet.relaunch, s), servers))
    for server, error in zip(servers, outcomes):
        error = error or _capture(fleet.restore_and_register, server)
        if error is not None:
            logger.error("server %d: restart after the failed update failed: %s", server.index, error)
            if server.state != "failed":
                server.state = "dead"  # the supervisor keeps trying
            fleet.terminate(server)


class DiskWeightSync:
    """Write ``<disk_dir>/v<version>/model.safetensors`` (+ config files) and reload it on every server."""

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig, config_dir: Optional[str] = None):
        if not cfg.disk_dir:
            raise WeightSyncError("weight_sync.disk_dir: required for the disk transport")
        self.fleet = fleet
        self.cfg = cfg
        self.root = Path(cfg.disk_dir)
        self.config_dir = Path(config_dir) if config_dir else None
        self._written: list[Path] = []

    def write(self, named_tensors: NamedTensors, version: str) -> Path:
        path = self.root / f"v{version}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in named_tensors}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt", "weight_version": str(version)})
        if self.config_dir is not None:  # SGLang reloads a full HF directory
            for f in self.config_dir.iterdir():
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, path / f.name)
        return path

    def push(self, named_tensors: NamedTensors, version: str) -> Path:
        path = self.write(named_tensors, version)
        with self.fleet.updating(self.cfg.pause_mode) as servers:
            body = {"model_path": str(path), "weight_version": str(version)}
            results = self.fleet.call_all("POST", "/update_weights_from_disk", body, timeout_s=600, servers=servers)
            for server, (status, data) in zip(servers, results):
                _check(server, "/update_weights_from_disk", status, data)
            self.fleet.record_weights(str(version), str(path))
        self._written.append(path)
        while len(self._written) > self.cfg.keep_versions:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return path


class DistributedWeightSync:
    """Trainer side of the broadcast transport; call :meth:`push` after each optimizer round.

    ``state_provider`` (optional) returns the current named tensors; with it, a server restarted
    by the fleet is brought to the current weights through its own one-off group.
    """

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig,
                 state_provider: Optional[Callable[[], NamedTensors]] = None):
        self.fleet = fleet
        self.cfg = cfg
        self.state_provider = state_provider
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
        futures = [pool.submit(http_json, "POST", s.url + "/init_weights_update_group", {
            "master_address": self.cfg.master_address, "master_port": port, "rank_offset": off,
            "world_size": world, "group_name": group_name, "backend": self.cfg.backend},
            timeout_s=self.cfg.group_timeout_s + 30) for s, off in zip(servers, offsets)]
        ours = pool.submit(init_custom_process_group, backend=self.cfg.backend, master_address=self.cfg.master_address,
                           master_port=port, world_size=world, rank=0, group_name=group_name,
                           timeout_s=self.cfg.group_timeout_s)
        try:
            # Fail fast if a server refuses to join, instead of waiting out the rendezvous timeout.
            while not ours.done():
                for s, fut in zip(servers, futures):
                    if fut.done():
                        status, data = fut.result()
                        _check(s, "/init_weights_update_group", status, data)
                time.sleep(0.02)
            try:
                group = ours.result()
            except Exception as exc:
                raise WeightSyncError(f"creating weight-sync group {group_name!r} (world {world}) failed: {exc}") from exc
            for s, fut in zip(servers, futures):
                status, data = fut.result()
                _check(s, "/init_weights_update_group", status, data)
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
        self.fleet.call_all("POST", "/destroy_weights_update_group", {"group_name": self._group_name}, servers=live)
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
    def _broadcast(self, group, group_name: str, servers: list[ManagedServer], named_tensors: NamedTensors,
                   version: str) -> int:
        total = 0
        buckets = list(iter_buckets(named_tensors, self.cfg.bucket_bytes))
        flat_format = "flattened_bucket" if self.cfg.flattened_bucket else None
        with ThreadPoolExecutor(len(servers)) as pool:
            for i, bucket in enumerate(buckets):
                body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
                        "flush_cache": False}
                if flat_format:
                    body["load_format"] = flat_format
                if i == len(buckets) - 1:
                    body["weight_version"] = str(version)
                futures = [pool.submit(http_json, "POST", s.url + "/update_weights_from_distributed", body, timeout_s=600)
                           for s in servers]
                if flat_format:
                    sending = [flatten_bucket(bucket)]
                else:
                    sending = [t.detach().contiguous() for _, t in bucket]
                handles = [torch.distributed.broadcast(t, group=group, group_src=0, async_op=True) for t in sending]
                # A server that refused the request never joins the collective: notice it instead of hanging.
                while not all(h.is_completed() for h in handles):
                    for s, fut in zip(servers, futures):
                        if fut.done():
                            status, data = fut.result()
                            _check(s, "/update_weights_from_distributed", status, data)
                    time.sleep(0.0005)
                for h in handles:
                    h.wait()
                total += sum(t.numel() * t.element_size() for t in sending)
                for s, fut in zip(servers, futures):
                    status, data = fut.result()
                    _check(s, "/update_weights_from_distributed", status, data)
        return total

    def push(self, named_tensors: NamedTensors, version: str) -> int:
        """Broadcast all tensors to every healthy server; returns the bytes sent."""
        with self.fleet.updating(self.cfg.pause_mode):
            if self._group is None or not self._membership_current():
                self.connect()  # a server died or came back since the group was formed
            with self._lock:
                try:
                    sent = self._broadcast(self._group, self._group_name, self._members, named_tensors, str(version))
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
            self._broadcast(group, name, [server], self.state_provider(), weights.version)
        finally:
            http_json("POST", server.url + "/destroy_weights_update_group", {"group_name": name}, timeout_s=30)
            destroy_custom_process_group(group)


# ---- CUDA IPC ------------------------------------------------------------------------------------
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


def ipc_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Size-bounded buckets (iter_buckets) that never mix dtypes, in order.

    One dtype per bucket keeps a flattened bucket readable by both generations of SGLang's
    FlattenedTensorBucket (element offsets into a tensor of that dtype; newer versions also view
    the slice as the tensor's dtype, a no-op here).
    """
    for _, run in itertools.groupby(named_tensors, key=lambda item: item[1].dtype):
        yield from iter_buckets(run, bucket_bytes)


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
        raise ValueError(f"a flattened bucket holds one dtype; got {sorted(map(str, dtypes))} (use ipc_buckets)")
    flat = torch.cat([t.reshape(-1) for _, t in tensors])
    metadata, start = [], 0
    for name, t in tensors:
        metadata.append(SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                        end_idx=start + t.numel(), numel=t.numel()))
        start += t.numel()
    return {"flattened_tensor": flat, "metadata": metadata}, [flat]


def _is_local_address(host: str) -> bool:
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        return socket.gethostbyname(host) in local
    except OSError:
        return False


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag telling whether it is the last one (one item of lookahead)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


class IPCWeightSync:
    """CUDA-IPC transport for engines colocated with the trainer (same node, GPUs visible to both).

    Every bucket is made resident on this process's current CUDA device, pickled as IPC handles and
    posted to every server's ``/update_weights_from_tensor`` (the same handles for each of an
    engine's TP ranks: each rank maps the trainer's memory and copies what it needs). The bucket
    stays alive until every server answered. ``state_provider`` (optional) lets a restarted server
    be brought to the current weights the same way.
    """

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig,
                 state_provider: Optional[Callable[[], NamedTensors]] = None):
        if not torch.cuda.is_available():
            raise WeightSyncError("weight_sync.transport=ipc: CUDA IPC needs a CUDA device and none is available "
                                  "here; use transport 'disk' or 'distributed'")
        remote = [f"servers[{s.index}] ({s.host or s.cfg.host})" for s in fleet.servers
                  if not _is_local_address(s.host or s.cfg.host)]
        if remote:
            raise WeightSyncError(f"weight_sync.transport=ipc: CUDA IPC only reaches engines on this node; "
                                  f"{', '.join(remote)} are elsewhere (use 'distributed')")
        self.fleet = fleet
        self.cfg = cfg
        self.state_provider = state_provider
        self.device = torch.device("cuda", torch.cuda.current_device())
        if state_provider is not None:
            fleet.add_restorer(self._restore)

    def _send(self, servers: list[ManagedServer], named_tensors: NamedTensors, version: str) -> int:
        sent = 0
        load_format = "flattened_bucket" if self.cfg.ipc_flattened_bucket else None
        with ThreadPoolExecutor(len(servers)) as pool:
            for bucket, last in _with_last(ipc_buckets(named_tensors, self.cfg.bucket_bytes)):
                resident = [(name, t.detach().to(self.device, non_blocking=True)) for name, t in bucket]
                payload, keep_alive = ipc_update_payload(resident, flattened=load_format is not None)
                torch.cuda.current_stream(self.device).synchronize()  # the engine reads on its own stream
                serialized = serialize_for_sglang(payload)
                futures = []
                for s in servers:
                    body = {"serialized_named_tensors": [serialized] * s.cfg.tp, "load_format": load_format,
                            "flush_cache": False}
                    if last:  # the version changes only once the server holds every new tensor
                        body["weight_version"] = str(version)
                    futures.append(pool.submit(http_json, "POST", s.url + "/update_weights_from_tensor", body,
                                               timeout_s=600))
                for s, fut in zip(servers, futures):
                    status, data = fut.result()
                    _check(s, "/update_weights_from_tensor", status, data)
                sent += sum(t.numel() * t.element_size() for t in keep_alive)
                del payload, keep_alive, resident
        torch.cuda.ipc_collect()  # release the IPC reference counts the engines have dropped
        return sent

    def push(self, named_tensors: NamedTensors, version: str) -> int:
        """Send all tensors to every healthy server; returns the bytes shared."""
        with self.fleet.updating(self.cfg.pause_mode) as servers:
            if servers:
                try:
                    sent = self._send(servers, named_tensors, str(version))
                except Exception:
                    restart_half_updated(self.fleet, servers)
                    raise
            else:
                sent = 0
            self.fleet.record_weights(str(version), disk_path=None)
        return sent

    def _restore(self, server: ManagedServer, weights: WeightState) -> None:
        if self.state_provider is None or weights.disk_path is not None:
            raise NotImplementedError
        self._send([server], self.state_provider(), weights.version)

    def close(self) -> None:
        pass


def make_weight_sync(fleet: Fleet, cfg: WeightSyncConfig, *, config_dir: Optional[str] = None,
                     state_provider: Optional[Callable[[], NamedTensors]] = None):
    """The transport ``cfg.transport`` names (``config_dir``: HF config files for disk versions)."""
    if cfg.transport == "disk":
        return DiskWeightSync(fleet, cfg, config_dir=config_dir)
    if cfg.transport == "ipc":
        return IPCWeightSync(fleet, cfg, state_provider=state_provider)
    return DistributedWeightSync(fleet, cfg, state_provider=state_provider)
