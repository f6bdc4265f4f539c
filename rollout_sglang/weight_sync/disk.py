"""Disk transport: an HF safetensors directory per version, reloaded by every server.

Works across machines with a shared filesystem and is always recoverable: a restarted server
reloads the same directory (the fleet's own restorer).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional

from safetensors.torch import save_file

from rollout_sglang import engine_api as api
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import Bucket
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync.common import call_checked, restart_half_updated


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

    def write(self, buckets: Iterable[Bucket], version: str) -> Path:
        path = self.root / f"v{version}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for bucket in buckets for name, t in bucket}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt", "weight_version": str(version)})
        if self.config_dir is not None:  # SGLang reloads a full HF directory
            for f in self.config_dir.iterdir():
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, path / f.name)
        return path

    def push(self, buckets: Iterable[Bucket], version: str) -> int:
        """Write the version, then (pause, reload, flush, continue) on every healthy server; a server that
        fails is restarted at the last good version. Returns the bytes written."""
        path = self.write(buckets, version)
        with self.fleet.updating(self.cfg.pause_mode) as servers:
            try:
                call_checked(self.fleet, servers, api.UPDATE_WEIGHTS_FROM_DISK, api.disk_update_body(str(path), version))
                self.fleet.flush_cache(servers)
            except Exception:
                restart_half_updated(self.fleet, servers)
                raise
            self.fleet.record_weights(str(version), str(path))
        self._written.append(path)
        while len(self._written) > self.cfg.keep_versions:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return (path / "model.safetensors").stat().st_size

    def close(self) -> None:
        pass
