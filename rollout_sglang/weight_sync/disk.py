"""Disk transport: an HF safetensors directory per version, written by every pipeline stage, reloaded by
every server (``/update_weights_from_disk``).

- :class:`ShardWriter` runs on a stage's source rank: each bucket becomes one safetensors file of its
  own (``model-pp<stage>-<k>.safetensors``), written tensor by tensor, so it holds nothing beyond the
  bucket it was given. Every stage writes into the same directory (a shared filesystem across nodes).
- :class:`DiskWeightSync` runs where the fleet is: it opens ``<disk_dir>/v<version>.tmp``, and once
  every stage has reported its files complete it writes the one index
  (``model.safetensors.index.json``) and the config files, renames the directory to
  ``v<version>`` — only then is the version committed — and reloads it on every server (pause,
  reload, flush, continue). A restarted server reloads the last committed directory (the fleet's own
  restorer), so this transport needs no trainer to restore a server.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

import torch

from rollout_sglang import engine_api as api
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket, PushPlan
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import OpenPush, push_from_one_process

INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


_WRITE_CHUNK_BYTES = 64 << 20


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> int:
    """Write ``tensor``'s bytes (row-major) at the file's position, through host copies of at most 64 MiB.

    Never through a numpy view of the tensor itself: numpy marks the storage it views not resizable for good,
    and a CPU trainer's parameters must stay resizable (a colocated trainer frees them by resizing their
    storage to 0, ``megatron_vespo/models/offload.py``). The copies also bound the host memory a GPU tensor
    takes on its way out."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _WRITE_CHUNK_BYTES):
        f.write(memoryview(flat[start:start + _WRITE_CHUNK_BYTES].to("cpu", copy=True).numpy()))
    return flat.numel()


def write_safetensors(path: Path, bucket: Bucket, metadata: Optional[dict[str, str]] = None) -> int:
    """``bucket`` as one safetensors file, written tensor by tensor (no serialised copy of the whole bucket:
    a CUDA tensor is copied to host one at a time). Returns the bytes of tensor data."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in bucket:
        if t.dtype not in _ST_DTYPES:
            raise WeightSyncError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in bucket:
            write_tensor_bytes(f, t)
        f.flush()
        os.fsync(f.fileno())  # complete on disk before the stage reports it (the commit relies on it)
    return offset


class ShardWriter:
    """A stage's source of buckets for the disk transport: one safetensors file per bucket (module docstring)."""

    def __init__(self) -> None:
        self._dir: Optional[Path] = None
        self._stage = 0
        self._files: dict[str, str] = {}  # tensor name -> file
        self._bytes = 0

    def begin(self, plan: PushPlan, stage: int) -> None:
        if not plan.directory:
            raise WeightSyncError("disk push: the plan names no directory")
        self._dir, self._stage, self._files, self._bytes = Path(plan.directory), stage, {}, 0

    def send(self, bucket: Bucket, last: bool) -> None:
        if not bucket:
            return
        file = f"model-pp{self._stage:02d}-{len(set(self._files.values())):05d}.safetensors"
        self._bytes += write_safetensors(self._dir / file, bucket)
        self._files.update({name: file for name, _ in bucket})

    def end(self) -> dict:
        return {"bytes": self._bytes, "weight_map": dict(self._files)}

    def reset(self) -> None:
        self._files, self._bytes = {}, 0

    def close(self) -> None:
        pass


def open_version_dir(root: Path, version: str) -> Path:
    """The temporary directory a version is written into (emptied if a killed run left one)."""
    tmp = root / f"v{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_version_dir(tmp: Path, receipts: list[dict], config_dir: Optional[Path] = None,
                       metadata: Optional[dict] = None) -> Path:
    """Every stage's shards are complete: write the one index and the config files, then rename ``tmp``
    (``…/v<version>.tmp``) to its final name — the commit. Returns the final directory."""
    weight_map: dict[str, str] = {}
    total = 0
    for receipt in receipts:
        if not receipt:
            continue
        clash = set(weight_map) & set(receipt["weight_map"])
        if clash:
            raise WeightSyncError(f"disk push: tensors written by two stages: {sorted(clash)[:3]}")
        weight_map.update(receipt["weight_map"])
        total += int(receipt["bytes"])
    missing = sorted({f for f in weight_map.values() if not (tmp / f).is_file()})
    if missing:
        raise WeightSyncError(f"disk push: shard files reported but absent in {tmp}: {missing[:3]}")
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if config_dir is not None:  # SGLang reloads a full HF directory
        for f in config_dir.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
                shutil.copy2(f, tmp / f.name)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


class DiskWeightSync:
    """The fleet owner's side of the disk transport (see the module docstring)."""

    def __init__(self, fleet: Fleet, cfg: WeightSyncConfig, config_dir: Optional[str] = None):
        if not cfg.disk_dir:
            raise WeightSyncError("weight_sync.disk_dir: required for the disk transport")
        self.fleet = fleet
        self.cfg = cfg
        self.root = Path(cfg.disk_dir)
        self.config_dir = Path(config_dir) if config_dir else None
        self._written: list[Path] = []
        self._open: Optional[tuple[str, Path]] = None

    # ---- StagedWeightSync -----------------------------------------------------------------------
    def open_push(self, version: str, restore_only: bool = False) -> PushPlan:
        """Nothing is paused while the stages write: only the reload is an update (``commit_push``).
        ``restore_only``: nothing to do (a restarted server reloads the last committed version by itself)."""
        if restore_only:
            self._open = None
            return PushPlan(version=str(version))
        tmp = open_version_dir(self.root, str(version))
        self._open = (str(version), tmp)
        return PushPlan(version=str(version), directory=str(tmp))

    def commit_push(self, receipts: list[dict]) -> int:
        """Commit the directory, then (pause, reload, flush, continue) on every server; a server that fails
        is restarted at the last good version. Returns the bytes written."""
        if self._open is None:  # a restore-only push
            return 0
        version, tmp = self._open
        self._open = None
        path = commit_version_dir(tmp, receipts, self.config_dir, metadata={"weight_version": version})
        push = OpenPush.open(self.fleet, version, self.cfg.pause_mode, restore_only=False)
        push.finish(self.fleet, api.UPDATE_WEIGHTS_FROM_DISK, api.disk_update_body(str(path), version),
                    disk_path=str(path))
        self._written.append(path)
        while len(self._written) > self.cfg.keep_versions:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return sum(int(r.get("bytes", 0)) for r in receipts if r)

    def abort_push(self) -> None:
        if self._open is not None:
            shutil.rmtree(self._open[1], ignore_errors=True)
            self._open = None

    def sender(self) -> ShardWriter:
        return ShardWriter()

    # ---- WeightSync: everything in this process ---------------------------------------------------
    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Write the version (one file per bucket), commit it and reload it on every server; bytes written."""
        return push_from_one_process(self, self.sender(), buckets, version)

    def close(self) -> None:
        pass
