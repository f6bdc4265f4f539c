"""M rollout servers behind sglang-router, with supervision.

Servers are started through a launcher (launch.py): local subprocesses, or Ray actors in a
placement group (ray_launcher.py, ``placement.launcher: ray``); the fleet only polls and stops the
process handles they return, so supervision is the same for both.

Lifecycle: launch every server, start the router, wait for each server's /health and register it.
A supervisor thread polls each process and its /health; a server that exited (or failed
``health_failures_to_restart`` checks in a row) is removed from the router, restarted, brought to
the fleet's current weights and version by the registered restorer, and re-added. Clients talking
to the router retry the dead server's in-flight requests elsewhere (see client.py).

Weight updates hold ``update_lock`` (see :meth:`Fleet.updating`), so a restart's restore step and an
update never interleave: a restarted server always ends at the newest version.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from rollout_sglang.config import FleetConfig, ServerConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.launch import LocalLauncher, ServerLauncher, ServerProcess
from rollout_sglang.net import http_json, is_healthy
from rollout_sglang.router import RouterProcess

logger = logging.getLogger(__name__)


@dataclass
class ManagedServer:
    """One server process and what the supervisor knows about it."""

    index: int
    cfg: ServerConfig
    log_path: Path
    host: str = ""  # where the fleet reaches it (set by the launcher: cfg.host locally, the node's IP under Ray)
    port: int = 0  # set by the launcher at the first launch; kept across restarts where possible
    proc: Optional[ServerProcess] = None
    state: str = "new"  # new | starting | healthy | restarting | dead (restart failed) | failed | stopped
    restarts: int = 0
    health_failures: int = 0
    events: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host or self.cfg.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class WeightState:
    """The fleet's current weights: the version every server should report, and where to get them."""

    version: str = "default"
    disk_path: Optional[str] = None


Restorer = Callable[[ManagedServer, WeightState], None]


class Fleet:
    """Start, supervise and stop a fleet; fan control calls out to every healthy server."""

    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="rollout_fleet_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers = [ManagedServer(index=i, cfg=s, port=s.port, log_path=self.log_dir / f"server_{i}.log")
                        for i, s in enumerate(cfg.servers)]
        self.launcher = make_launcher(cfg)
        self.router = RouterProcess(cfg.router, self.log_dir / "router.log")
        self.weights = WeightState()
        self.update_lock = threading.RLock()
        self._restorers: list[Restorer] = [self._restore_from_disk]
        self._stop = threading.Event()
        self._supervisor: Optional[threading.Thread] = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Fleet":
        try:
            for server in self.servers:
                self._spawn(server)
            self.router.start()
            with ThreadPoolExecutor(len(self.servers)) as pool:
                list(pool.map(self._wait_healthy, self.servers))
            for server in self.servers:
                self.router.add_worker(server.url)
                server.state = "healthy"
        except BaseException:
            self.stop()
            raise
        if self.cfg.supervise:
            self.start_supervision()
        return self

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def router_url(self) -> str:
        return self.router.url

    def healthy_servers(self) -> list[ManagedServer]:
        return [s for s in self.servers if s.state == "healthy"]

    def _spawn(self, server: ManagedServer) -> None:
        server.proc, server.host, server.port = self.launcher.launch(server.index, server.cfg, server.port, server.log_path)
        server.state = "starting"
        server.health_failures = 0

    def _wait_healthy(self, server: ManagedServer) -> None:
        deadline = time.monotonic() + server.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            code = server.proc.poll()
            if code is not None:
                raise RolloutError(f"server {server.index} ({server.url}) exited with code {code}:\n{server.proc.log_tail()}")
            if is_healthy(server.url):
                return
            time.sleep(0.2)
        raise RolloutError(f"server {server.index} ({server.url}) not healthy within {server.cfg.startup_timeout_s}s; see {server.log_path}")

    def stop(self) -> None:
        self.stop_supervision()
        self.router.stop()
        for server in self.servers:
            self.terminate(server)
            server.state = "stopped"
        self.launcher.shutdown()

    @staticmethod
    def terminate(server: ManagedServer) -> None:
        if server.proc is not None:
            server.proc.terminate()

    # ---- supervision -------------------------------------------------------------------------
    def start_supervision(self) -> None:
        if self._supervisor is not None and self._supervisor.is_alive():
            return
        self._stop.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="fleet-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervision(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)
            self._supervisor = None

    def add_restorer(self, restorer: Restorer) -> None:
        """Called (under ``update_lock``) to bring a restarted server to ``self.weights``; newest first."""
        self._restorers.insert(0, restorer)

    def _supervise(self) -> None:
        while not self._stop.wait(self.cfg.health_interval_s):
            for server in self.servers:
                if self._stop.is_set():
                    break
                if server.state == "dead":  # a previous restart failed: try again
                    self._try_restart(server)
                    continue
                if server.state != "healthy":
                    continue
                if server.alive() and is_healthy(server.url):
                    server.health_failures = 0
                    continue
                server.health_failures += 1
                if server.alive() and server.health_failures < self.cfg.health_failures_to_restart:
                    continue
                self._try_restart(server)

    def _try_restart(self, server: ManagedServer) -> None:
        try:
            self.restart(server)
        except Exception as exc:  # keep supervising the others; retried while restarts remain
            logger.error("server %d: restart failed: %s", server.index, exc)
            server.events.append(f"restart failed: {exc}")
            self.terminate(server)
            if server.state != "failed":
                server.state = "dead"

    def restart(self, server: ManagedServer) -> None:
        """Remove from the router, relaunch, restore the current weights, re-add."""
        self.relaunch(server)
        with self.update_lock:
            self.restore_and_register(server)

    def relaunch(self, server: ManagedServer) -> None:
        """Deregister, stop and start the process again; wait for /health (no weights restored yet)."""
        reason = "exited" if not server.alive() else "stopped for restart"
        logger.warning("server %d (%s) %s; restarting", server.index, server.url, reason)
        server.events.append(f"{reason}; restarting")
        server.state = "restarting"
        try:
            self.router.remove_worker(server.url)
        except (RolloutError, OSError) as exc:
            logger.warning("server %d: router removal failed: %s", server.index, exc)
        self.terminate(server)
        if server.restarts >= self.cfg.max_restarts:
            server.state = "failed"
            raise RolloutError(f"server {server.index}: exceeded max_restarts={self.cfg.max_restarts}")
        server.restarts += 1
        self._spawn(server)
        self._wait_healthy(server)

    def restore_and_register(self, server: ManagedServer) -> None:
        """Bring a relaunched server to ``self.weights`` and put it back behind the router.

        Callers hold ``update_lock`` (so no update can slip in between restore and registration).
        """
        with self.update_lock:
            for restore in self._restorers:
                if self.weights.version == "default" and self.weights.disk_path is None:
                    break  # never updated: the launch weights are current
                try:
                    restore(server, self.weights)
                    break
                except NotImplementedError:
                    continue
            (reported,) = self.weight_versions([server], timeout_s=10)
            if reported is not None and str(reported) != self.weights.version:
                raise RolloutError(f"server {server.index}: restored to version {reported!r}, "
                                   f"expected {self.weights.version!r}")
            self.router.add_worker(server.url)
            server.state = "healthy"
        server.events.append(f"restarted at version {self.weights.version}")

    def _restore_from_disk(self, server: ManagedServer, weights: WeightState) -> None:
        if weights.disk_path is None:
            raise NotImplementedError("no disk copy of the current weights")
        status, data = http_json("POST", server.url + "/update_weights_from_disk",
                                 {"model_path": weights.disk_path, "weight_version": weights.version}, timeout_s=600)
        if status != 200 or not isinstance(data, dict) or not data.get("success"):
            raise RolloutError(f"server {server.index}: restoring {weights.disk_path} failed: HTTP {status}: {str(data)[:200]}")

    # ---- fan-out control ---------------------------------------------------------------------
    def call_all(self, method: str, endpoint: str, body: Optional[dict] = None, timeout_s: float = 60.0,
                 servers: Optional[list[ManagedServer]] = None) -> list[tuple[int, object]]:
        """The same request to every healthy server, concurrently; returns (status, body) per server."""
        targets = self.healthy_servers() if servers is None else servers
        if not targets:
            return []
        with ThreadPoolExecutor(len(targets)) as pool:
            return list(pool.map(lambda s: http_json(method, s.url + endpoint, body, timeout_s=timeout_s), targets))

    def weight_versions(self, servers: Optional[list[ManagedServer]] = None,
                        timeout_s: float = 60.0) -> list[Optional[str]]:
        """The weight version each healthy server (or each of ``servers``) reports; None where it gave none."""
        return [data.get("weight_version") if isinstance(data, dict) else None
                for _, data in self.call_all("GET", "/get_weight_version", servers=servers, timeout_s=timeout_s)]

    def abort_all(self) -> None:
        """Abort every request in flight on every healthy server (each returns its partial output)."""
        self.call_all("POST", "/abort_request", {"abort_all": True}, timeout_s=30)

    def pause_generation(self, mode: str = "in_place", servers: Optional[list[ManagedServer]] = None) -> None:
        self.call_all("POST", "/pause_generation", {"mode": mode}, servers=servers)

    def continue_generation(self, servers: Optional[list[ManagedServer]] = None) -> None:
        self.call_all("POST", "/continue_generation", {}, servers=servers)

    def flush_cache(self, servers: Optional[list[ManagedServer]] = None) -> None:
        self.call_all("POST", "/flush_cache", servers=servers)

    @contextlib.contextmanager
    def updating(self, pause_mode: str = "in_place") -> Iterator[list[ManagedServer]]:
        """Pause generation on every healthy server, yield them, then flush the cache and continue.

        Holds ``update_lock`` throughout, so the supervisor cannot restore a server mid-update.
        """
        with self.update_lock:
            targets = self.healthy_servers()
            self.pause_generation(pause_mode, servers=targets)
            try:
                yield targets
                # Flush is refused while requests are held in place; those keep their KV cache, as in SGLang.
                self.flush_cache(servers=targets)
            finally:
                self.continue_generation(servers=targets)

    def record_weights(self, version: str, disk_path: Optional[str] = None) -> None:
        self.weights = WeightState(version=str(version), disk_path=disk_path)


def make_launcher(cfg: FleetConfig) -> ServerLauncher:
    """The launcher ``cfg.placement.launcher`` names."""
    if cfg.placement.launcher == "ray":
        from rollout_sglang.ray_launcher import RayLauncher  # Ray is imported only when asked for

        return RayLauncher(cfg.placement, cfg.servers)
    return LocalLauncher()
