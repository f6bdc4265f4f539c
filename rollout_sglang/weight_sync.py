"""Pushing new policy weights (HF names and dtypes) to the rollout fleet, with a version per update.

Two transports:

* :class:`DiskWeightSync` writes an HF safetensors directory per version and asks every server to
  ``/update_weights_from_disk`` (works across machines with a shared filesystem; always
  recoverable: a restarted server reloads the same directory).
* :class:`DistributedWeightSync` forms one process group {trainer rank 0} ∪ {every server's ranks}
  exactly as SGLang does (see process_group.py; the HTTP ``/init_weights_update_group`` calls and the
  trainer's own group creation run concurrently), then broadcasts buckets of tensors while each
  server waits in ``/update_weights_from_distributed``. gloo on CPU, NCCL on GPUs.

Both pause generation (in place), update, flush and continue (``Fleet.updating``), and only the
last bucket carries the new ``weight_version``, so a server reports the new version only once it
holds all of the new weights. A failed update leaves a server half-updated: it is restarted.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

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
                    self._restart_half_updated(members)
                    raise
            self.fleet.record_weights(str(version), disk_path=None)
        return sent

    def _restart_half_updated(self, servers: list[ManagedServer]) -> None:
        """After a failed update every member may hold a mix of versions: restart them at the last good one.

        Runs inside ``Fleet.updating`` (this thread holds ``update_lock``): relaunch concurrently, then
        restore and re-register here.
        """
        logger.error("weight update failed; restarting %d server(s) at version %s", len(servers), self.fleet.weights.version)
        with ThreadPoolExecutor(len(servers)) as pool:
            outcomes = list(pool.map(lambda s: _capture(self.fleet.relaunch, s), servers))
        for server, error in zip(servers, outcomes):
            error = error or _capture(self.fleet.restore_and_register, server)
            if error is not None:
                logger.error("server %d: restart after the failed update failed: %s", server.index, error)
                if server.state != "failed":
                    server.state = "dead"  # the supervisor keeps trying
                self.fleet.terminate(server)

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
