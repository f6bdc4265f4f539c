"""The real sglang-router as a managed subprocess, with run-time worker registration.

sglang-router 0.3.2 (checked by running it): ``GET /workers`` lists workers as
``{"workers": [{"id", "url", "is_healthy", ...}], ...}``; ``POST /workers {"url"}`` queues an
addition (202, processed in the background: it probes the worker's /health, /server_info and
/model_info); ``DELETE /workers/{id}`` removes by worker id (not by URL). The router forwards
/generate but not the control endpoints (/abort_request, /pause_generation, weight updates answer
404), so those go to each server directly. It re-serialises /generate bodies and drops fields it
does not know (``return_routed_experts``), and it rejects a list ``rid``.
"""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Optional

from rollout_sglang.config import RouterConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.launch import Spawner, build_router_command, popen_owned, terminate_process
from rollout_sglang.net import find_free_port, http_json

logger = logging.getLogger(__name__)


class RouterProcess:
    """Start/stop sglang-router and add/remove workers while it runs."""

    def __init__(self, cfg: RouterConfig, log_path: str | Path, spawner: Optional[Spawner] = None):
        self.cfg = cfg
        self.spawner = spawner  # the router dies with this process when started through it
        self.log_path = Path(log_path)
        self.port = cfg.port or find_free_port(cfg.host)
        self.prometheus_port = cfg.prometheus_port or find_free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def start(self) -> None:
        cmd = build_router_command(self.cfg, self.port, self.prometheus_port)
        logger.info("starting sglang-router: %s", " ".join(cmd))
        log = open(self.log_path, "ab")
        try:
            self.proc = self.spawner.popen(cmd, log) if self.spawner is not None else \
                popen_owned(cmd, log, die_with_parent=False)
        finally:
            log.close()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RolloutError(f"sglang-router exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if http_json("GET", self.url + "/workers", timeout_s=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RolloutError(f"sglang-router at {self.url} not ready within {self.cfg.startup_timeout_s}s; see {self.log_path}")

    def workers(self) -> list[dict]:
        status, data = http_json("GET", self.url + "/workers", timeout_s=5)
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("workers"), list):
            raise RolloutError(f"{self.url}/workers: unexpected answer {status}: {str(data)[:200]}")
        return data["workers"]

    def _find(self, url: str) -> Optional[dict]:
        url = url.rstrip("/")
        return next((w for w in self.workers() if str(w.get("url", "")).rstrip("/") == url), None)

    def add_worker(self, url: str, timeout_s: float = 30.0) -> None:
        """Register ``url`` and wait until the router lists it as healthy."""
        status, data = http_json("POST", self.url + "/workers", {"url": url}, timeout_s=10)
        if status not in (200, 201, 202):
            raise RolloutError(f"{self.url}/workers: adding {url} failed: HTTP {status}: {str(data)[:200]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            worker = self._find(url)
            if worker is not None and worker.get("is_healthy", True):
                return
            time.sleep(0.1)
        raise RolloutError(f"{self.url}: worker {url} not registered within {timeout_s}s")

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> bool:
        """Deregister ``url``; returns False if the router did not know it."""
        worker = self._find(url)
        if worker is None:
            return False
        status, data = http_json("DELETE", f"{self.url}/workers/{worker['id']}", timeout_s=10)
        if status not in (200, 202, 204):
            raise RolloutError(f"{self.url}/workers/{worker['id']}: removing {url} failed: HTTP {status}: {str(data)[:200]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._find(url) is None:
                return True
            time.sleep(0.1)
        raise RolloutError(f"{self.url}: worker {url} still listed after {timeout_s}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        terminate_process(self.proc)

    def __del__(self):  # never leave a router behind if the owner forgot stop()
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
