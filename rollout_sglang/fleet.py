"""M rollout servers behind sglang-router, with supervision.

Servers are started through a launcher (launch.py): local subprocesses, or Ray actors in a
placement group (ray_launcher.py, ``placement.launcher: ray``); the fleet only polls and stops the
process handles they return, so supervision is the same for both.

Lifecycle: launch every server, start the router, wait for each server's /health and register it.
A supervisor thread polls each process and its /health; a server that exited (or failed
``health_failures_to_restart`` checks in a row) is removed from the router, restarted, brought to
the fleet's current weights and version by the registered restorer, and re-added. A router that
exited is started again on its port and given every healthy server. Clients retry what a dead
server or router did not answer (the same request id, hence the same sample) until one answers,
for up to ``rollout.server_unavailable_s`` (see client.py and worker_pool.py).

Every process the fleet starts locally (servers, router) dies with this process, however it dies:
they are forked by one long-lived thread with a parent-death signal (:class:`launch.Spawner`).

Control calls that fan out (abort, pause, continue, version reads) skip a server that does not
answer: it is left to the supervisor, which restarts it at the current weights.

Weight updates hold ``update_lock`` (see :meth:`Fleet.updating`), so a restart's restore step and an
update never interleave: a restarted server always ends at the newest version. A restorer that cannot
restore on its own (the weights exist only in the live trainer, spread over its processes) raises
:class:`RestoreDeferred`: the server then waits outside the router (state ``awaiting_weights``) until
the trainer's next push includes it (:meth:`Fleet.awaiting_weights`, :meth:`Fleet.register_restored`). The supervisor never
restarts a server that is paused (SGLang's /health generates a token, which waits while generation
is paused) or while an update runs (it restarts what it breaks itself).

Colocated placement (``placement.colocate``): SGLang engines launch with the memory saver, and
:meth:`Fleet.release_memory_occupation` / :meth:`Fleet.resume_memory_occupation` free and take back their
memory between generation phases. A server that has released memory stays paused (no generation, no health
check) until all of it is resumed; each server's released regions are tracked here (SGLang reports none, and
its scheduler dies resuming a region that is not released), and a relaunched server has released nothing.

Every call to a server is one of ``engine_api``'s routes; at start (and after a restart) each
server's SGLang version is read from /server_info and refused unless this API speaks it.
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
from typing import Callable, Iterator, Optional, Sequence

from rollout_sglang import engine_api as api
from rollout_sglang.config import FleetConfig, ServerConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.launch import (
    LocalLauncher, LocalServerProcess, ServerLauncher, ServerProcess, Spawner, resident_bytes, with_memory_saver,
)
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
    state: str = "new"  # new | starting | healthy | restarting | awaiting_weights | dead (restart failed) | failed | stopped
    restarts: int = 0
    health_failures: int = 0
    paused: bool = False  # generation paused by the fleet (its /health would wait): not health-checked
    sglang_version: str = ""  # what /server_info reported
    samples_share_seed: bool = False  # /server_info: every sample of a request uses its one seed
    released: set[str] = field(default_factory=set)  # memory regions it released (colocated); none after a launch
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


class RestoreDeferred(Exception):
    """Raised by a restorer: the fleet's weights can only come from the trainer's next push (no copy here)."""


class Fleet:
    """Start, supervise and stop a fleet; fan control calls out to every healthy server."""

    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="rollout_fleet_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        launch_cfgs = [with_memory_saver(s) if cfg.placement.colocate else s for s in cfg.servers]
        self.servers = [ManagedServer(index=i, cfg=s, port=s.port, log_path=self.log_dir / f"server_{i}.log")
                        for i, s in enumerate(launch_cfgs)]
        self.spawner = Spawner()
        self.launcher = make_launcher(cfg, self.spawner)
        self.router = RouterProcess(cfg.router, self.log_dir / "router.log", spawner=self.spawner)
        self.router_restarts = 0
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
                list(pool.map(self._wait_ready, self.servers))
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

    @property
    def one_request_per_sample(self) -> bool:
        """Whether clients must send each sample as its own request: some server samples every copy of a
        request with its one seed (SGLang's deterministic inference)."""
        return any(s.samples_share_seed for s in self.servers)

    def healthy_servers(self) -> list[ManagedServer]:
        """Registered servers whose process runs (one that just exited is the supervisor's, not ours)."""
        return [s for s in self.servers if s.state == "healthy" and s.alive()]

    def _spawn(self, server: ManagedServer) -> None:
        server.proc, server.host, server.port = self.launcher.launch(server.index, server.cfg, server.port, server.log_path)
        server.state = "starting"
        server.health_failures = 0
        server.released = set()

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

    def _wait_ready(self, server: ManagedServer) -> None:
        """Healthy, and speaking a supported SGLang version."""
        self._wait_healthy(server)
        status, info = self.call(server, api.SERVER_INFO, timeout_s=30)
        version = info.get("version") if status == 200 and isinstance(info, dict) else None
        api.check_sglang_version(f"server {server.index} ({server.url})", version)
        server.sglang_version = str(version)
        server.samples_share_seed = api.samples_share_request_seed(info)

    def stop(self) -> None:
        self.stop_supervision()
        self.router.stop()
        for server in self.servers:
            self.terminate(server)
            server.state = "stopped"
        self.launcher.shutdown()
        self.spawner.close()

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
            if not self.router.alive() and not self._stop.is_set():
                self._restart_router()
            for server in self.servers:
                if self._stop.is_set():
                    break
                if server.state == "dead":  # a previous restart failed: try again
                    self._try_restart(server)
                    continue
                if server.state == "awaiting_weights":  # out of the router: only its process is watched
                    if not server.alive():
                        self._try_restart(server)
                    continue
                if server.state != "healthy" or server.paused:
                    continue
                if server.alive() and is_healthy(server.url, timeout_s=self.cfg.health_timeout_s):
                    server.health_failures = 0
                    continue
                server.health_failures += 1
                if server.alive() and server.health_failures < self.cfg.health_failures_to_restart:
                    continue
                self._try_restart(server)

    def _try_restart(self, server: ManagedServer) -> None:
        # Decided under the update lock, without waiting for it: an update in progress restarts the
        # servers it breaks itself, and a paused server's failed health checks say nothing.
        if not self.update_lock.acquire(blocking=False):
            return
        try:
            if server.paused or server.state not in ("healthy", "dead", "awaiting_weights"):
                return
            self.take_out(server)
        finally:
            self.update_lock.release()
        try:
            self.restart(server)
        except Exception as exc:  # keep supervising the others; retried while restarts remain
            logger.error("server %d: restart failed: %s", server.index, exc)
            server.events.append(f"restart failed: {exc}")
            self.terminate(server)
            if server.state != "failed":
                server.state = "dead"

    def _restart_router(self) -> None:
        """Start the router again on its port and give it every healthy server (under ``update_lock``, so
        no restart's registration interleaves). Clients retry meanwhile."""
        with self.update_lock:
            if self.router_restarts >= self.cfg.max_restarts:
                return  # past max_restarts it stays down; clients fail after server_unavailable_s
            self.router_restarts += 1
            logger.warning("sglang-router (%s) exited with code %s; restarting it (%d/%d)", self.router.url,
                           self.router.proc.returncode if self.router.proc else None, self.router_restarts,
                           self.cfg.max_restarts)
            try:
                self.router.start()
                for server in self.servers:
                    if server.state == "healthy":
                        self.router.add_worker(server.url)
            except (RolloutError, OSError) as exc:  # tried again at the next poll
                logger.error("sglang-router restart failed: %s", exc)
                self.router.stop()

    def restart(self, server: ManagedServer) -> None:
        """Remove from the router, relaunch, restore the current weights, re-add."""
        self.relaunch(server)
        with self.update_lock:
            self.restore_and_register(server)

    def take_out(self, server: ManagedServer) -> None:
        """Out of the router and of every update (state ``restarting``); callers hold ``update_lock``."""
        reason = "exited" if not server.alive() else "stopped for restart"
        logger.warning("server %d (%s) %s; restarting", server.index, server.url, reason)
        server.events.append(f"{reason}; restarting")
        server.state = "restarting"
        try:
            self.router.remove_worker(server.url)
        except (RolloutError, OSError) as exc:
            logger.warning("server %d: router removal failed: %s", server.index, exc)

    def relaunch(self, server: ManagedServer) -> None:
        """Deregister, stop and start the process again; wait until it is ready (no weights restored yet)."""
        if server.state != "restarting":
            with self.update_lock:
                self.take_out(server)
        self.terminate(server)
        server.paused = False
        if server.restarts >= self.cfg.max_restarts:
            server.state = "failed"
            raise RolloutError(f"server {server.index}: exceeded max_restarts={self.cfg.max_restarts}")
        server.restarts += 1
        self._spawn(server)
        self._wait_ready(server)

    def restore_and_register(self, server: ManagedServer) -> None:
        """Bring a relaunched server to ``self.weights`` and put it back behind the router.

        Callers hold ``update_lock`` (so no update can slip in between restore and registration).
        """
        with self.update_lock:
            expected = self.weights.version
            if expected != "default" or self.weights.disk_path is not None:  # else the launch weights are current
                for restore in self._restorers:
                    try:
                        restore(server, self.weights)
                        break
                    except NotImplementedError:
                        continue
                    except RestoreDeferred:
                        server.state = "awaiting_weights"
                        logger.warning("server %d (%s) is back; it waits for the trainer's next push (version %s "
                                       "is not held anywhere it could be read from)", server.index, server.url, expected)
                        server.events.append(f"awaiting weights (fleet version {expected})")
                        return
                (reported,) = self.weight_versions([server], timeout_s=10)
                if reported != expected:
                    raise RolloutError(f"server {server.index}: restored to version {reported!r}, expected {expected!r}")
            self.router.add_worker(server.url)
            server.state = "healthy"
        server.events.append(f"restarted at version {self.weights.version}")

    def awaiting_weights(self) -> list[ManagedServer]:
        """Restarted servers that wait outside the router for the trainer's next push (see :class:`RestoreDeferred`)."""
        return [s for s in self.servers if s.state == "awaiting_weights" and s.alive()]

    def register_restored(self, server: ManagedServer) -> None:
        """A server that waited for weights got the fleet's version: check it and put it behind the router."""
        with self.update_lock:
            (reported,) = self.weight_versions([server], timeout_s=10) or (None,)
            if reported != self.weights.version:
                raise RolloutError(f"server {server.index}: restored to version {reported!r}, expected "
                                   f"{self.weights.version!r}")
            self.router.add_worker(server.url)
            server.state = "healthy"
        server.events.append(f"restored by a push at version {self.weights.version}")

    def _restore_from_disk(self, server: ManagedServer, weights: WeightState) -> None:
        if weights.disk_path is None:
            raise NotImplementedError("no disk copy of the current weights")
        status, data = self.call(server, api.UPDATE_WEIGHTS_FROM_DISK,
                                 api.disk_update_body(weights.disk_path, weights.version), timeout_s=600)
        if status != 200 or not isinstance(data, dict) or not data.get("success"):
            raise RolloutError(f"server {server.index}: restoring {weights.disk_path} failed: HTTP {status}: {str(data)[:200]}")

    # ---- fan-out control ---------------------------------------------------------------------
    @staticmethod
    def call(server: ManagedServer, route: api.Route, body: Optional[dict] = None,
             timeout_s: float = 60.0) -> tuple[int, object]:
        """One call to one server; (status, parsed body). Raises OSError when it is unreachable."""
        return http_json(route.method, server.url + route.path, body, timeout_s=timeout_s)

    def call_all(self, route: api.Route, body: Optional[dict] = None, timeout_s: float = 60.0,
                 servers: Optional[list[ManagedServer]] = None) -> list[tuple[int, object]]:
        """The same call to every healthy server (or to ``servers``), concurrently; (status, body) per server.
        Raises OSError when one is unreachable (see :meth:`call_reachable` for calls that may skip it)."""
        targets = self.healthy_servers() if servers is None else servers
        if not targets:
            return []
        with ThreadPoolExecutor(len(targets)) as pool:
            return list(pool.map(lambda s: self.call(s, route, body, timeout_s), targets))

    def call_reachable(self, route: api.Route, body: Optional[dict] = None, timeout_s: float = 60.0,
                       servers: Optional[list[ManagedServer]] = None) -> list[tuple[ManagedServer, int, object]]:
        """Like :meth:`call_all`, but a server that does not answer is logged and left out of the result
        (it died: the supervisor restarts it at the current weights)."""
        targets = self.healthy_servers() if servers is None else servers

        def one(server: ManagedServer) -> Optional[tuple[ManagedServer, int, object]]:
            try:
                return (server, *self.call(server, route, body, timeout_s))
            except OSError as exc:
                logger.warning("server %d (%s)%s: unreachable (%s); left to the supervisor", server.index,
                               server.url, route.path, exc)
                server.events.append(f"{route.path} unreachable: {exc}")
                return None

        if not targets:
            return []
        with ThreadPoolExecutor(len(targets)) as pool:
            return [r for r in pool.map(one, targets) if r is not None]

    def weight_versions(self, servers: Optional[list[ManagedServer]] = None,
                        timeout_s: float = 60.0) -> list[Optional[str]]:
        """The weight version each reachable healthy server (or each of ``servers``) reports in /model_info;
        None where it gave none. A server that does not answer is left out (the supervisor restores it)."""
        return [api.weight_version_of(data) if status == 200 else None
                for _, status, data in self.call_reachable(api.MODEL_INFO, servers=servers, timeout_s=timeout_s)]

    def abort_all(self) -> None:
        """Abort every request in flight on every healthy server (each returns its partial output)."""
        self.call_reachable(api.ABORT_REQUEST, api.abort_body(), timeout_s=30)

    def pause_generation(self, mode: str = "retract", servers: Optional[list[ManagedServer]] = None
                         ) -> list[ManagedServer]:
        """Pause generation; returns the servers that paused (one that does not answer is not among them)."""
        targets = self.healthy_servers() if servers is None else servers
        for server in targets:  # before the call: from now on its /health may wait
            server.paused = True
        answered = {id(s) for s, _, _ in self.call_reachable(api.PAUSE_GENERATION, api.pause_body(mode),
                                                               servers=targets)}
        for server in targets:
            if id(server) not in answered:
                server.paused = False
        return [s for s in targets if id(s) in answered]

    def continue_generation(self, servers: Optional[list[ManagedServer]] = None) -> None:
        """Continue generation, except on servers with released memory (they stay paused until it is resumed)."""
        targets = [s for s in (self.healthy_servers() if servers is None else servers) if not s.released]
        if not targets:
            return
        self.call_reachable(api.CONTINUE_GENERATION, api.continue_body(), servers=targets)
        for server in targets:
            server.paused = False
            server.health_failures = 0

    def flush_cache(self, servers: Optional[list[ManagedServer]] = None) -> None:
        """Flush every server's cache (the prefix cache holds KV of the old weights). A server refuses
        while requests are still running; that is retried for ``flush_retry_s``, then an error names it."""
        pending = self.healthy_servers() if servers is None else list(servers)
        deadline = time.monotonic() + self.cfg.flush_retry_s
        delay = 0.05
        while pending:
            results = self.call_all(api.FLUSH_CACHE, servers=pending)
            refused = []
            for server, (status, data) in zip(pending, results):
                if status == 200:
                    continue
                if status != 400 or time.monotonic() > deadline:
                    raise RolloutError(f"server {server.index} ({server.url}) did not flush its cache "
                                       f"(HTTP {status}: {str(data).strip()[:200]}); requests still running keep "
                                       "KV computed with the old weights")
                refused.append(server)
            pending = refused
            if pending:
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    # ---- memory occupation (colocated placement) -------------------------------------------------
    def release_memory_occupation(self, tags: Sequence[str] = api.MEMORY_TAGS) -> list[ManagedServer]:
        """Pause generation (``retract``: SGLang asserts that nothing runs) and release the memory regions
        ``tags`` on every live server (in the router or waiting for weights); they stay paused until
        :meth:`resume_memory_occupation` gave everything back. A server that does not answer is left to the
        supervisor (a relaunch holds all its memory again). Returns the servers that released; raises
        :class:`RolloutError` naming one that refused."""
        body = api.memory_occupation_body(tags)
        with self.update_lock:
            candidates = [s for s in self.servers if s.alive() and s.state in ("healthy", "awaiting_weights")]
            targets = self.pause_generation("retract", servers=candidates)
            done = self._memory_call(api.RELEASE_MEMORY_OCCUPATION, {id(s): tags for s in targets}, targets)
            for server in done:
                server.released.update(tags)
            return done

    def resume_memory_occupation(self, tags: Sequence[str]) -> list[ManagedServer]:
        """Resume the regions ``tags`` on every live server that released them (each only what it released:
        SGLang's scheduler dies resuming a region that is not released). Weights resumed this way hold no model
        until the next weight update. Generation continues only once nothing is released
        (:meth:`continue_generation`). Returns the servers that resumed something; raises naming a refusal."""
        api.memory_occupation_body(tags)  # checks the names
        with self.update_lock:
            todo = {id(s): [t for t in tags if t in s.released] for s in self.servers if s.alive()}
            targets = [s for s in self.servers if todo.get(id(s))]
            done = self._memory_call(api.RESUME_MEMORY_OCCUPATION, todo, targets)
            for server in done:
                server.released.difference_update(todo[id(server)])
            return done

    def _memory_call(self, route: api.Route, tags_of: dict[int, list[str]],
                     servers: list[ManagedServer]) -> list[ManagedServer]:
        """``route`` with each server's own tags (one concurrent call per distinct tag list); the servers that
        answered 200 (an unreachable one is left to the supervisor). Raises naming the first that refused."""
        groups: dict[tuple[str, ...], list[ManagedServer]] = {}
        for server in servers:
            groups.setdefault(tuple(tags_of[id(server)]), []).append(server)
        answers = []
        for tags, group in groups.items():
            answers += self.call_reachable(route, api.memory_occupation_body(tags), timeout_s=600, servers=group)
        for server, status, data in answers:
            if status != 200:
                raise RolloutError(f"server {server.index} ({server.url}){route.path}: HTTP {status}: {str(data)[:300]}")
        return [server for server, _, _ in answers]

    def resident_memory(self) -> dict[int, int]:
        """Resident memory in bytes (/proc VmRSS) of every live server process on this node, by server index:
        what a CPU server holds (an SGLang engine's weights and KV cache are on its GPU instead)."""
        out = {}
        for server in self.servers:
            if isinstance(server.proc, LocalServerProcess) and server.alive():
                rss = resident_bytes(server.proc.pid)
                if rss is not None:
                    out[server.index] = rss
        return out

    @contextlib.contextmanager
    def updating(self, pause_mode: str = "retract") -> Iterator[list[ManagedServer]]:
        """Pause generation on every healthy server, yield them (the caller updates and flushes), continue.

        Holds ``update_lock`` throughout, so the supervisor cannot restart or restore a server mid-update.
        """
        with self.update_lock:
            candidates = self.healthy_servers()
            targets = self.pause_generation(pause_mode, servers=candidates)
            for server in candidates:
                if server not in targets:  # it would miss this update: restart it at the new weights
                    self.take_out(server)
                    server.state = "dead"
            try:
                yield targets
            finally:
                self.continue_generation(servers=targets)

    def record_weights(self, version: str, disk_path: Optional[str] = None) -> None:
        self.weights = WeightState(version=str(version), disk_path=disk_path)


def make_launcher(cfg: FleetConfig, spawner: Spawner) -> ServerLauncher:
    """The launcher ``cfg.placement.launcher`` names (local servers are forked through ``spawner``)."""
    if cfg.placement.launcher == "ray":
        from rollout_sglang.ray_launcher import RayLauncher  # Ray is imported only when asked for

        return RayLauncher(cfg.placement, cfg.servers)
    return LocalLauncher(spawner)
