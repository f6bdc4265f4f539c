"""Rollout servers as Ray actors: one placement group, one bundle and one actor per server.

Each bundle asks for ``{"GPU": cfg.gpus(), "CPU": cfg.num_cpus}`` (``placement.placement_strategy``
spreads or packs them over nodes). The actor, scheduled into its bundle, starts the same command
line as a local launch (launch.py) as a subprocess on its node, with ``CUDA_VISIBLE_DEVICES`` set to
the GPUs Ray assigned to it, picks the port on that node and reports ``host:port``. The fleet polls
and stops the process through the actor (:class:`RayServerProcess`), so supervision — router
removal, restart, weight restore, re-adding — is the same as for local processes. A restart reuses
the actor (same node, GPUs and port); if the actor itself died (its node went away) a new one is
placed into the same bundle, and the server comes back at a new address.

Ray must be importable only when this launcher is used; ``ray.init`` is called here only if Ray is
not initialised yet (``placement.ray_address``), and only then is it shut down at the end.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from typing import Optional

from rollout_sglang.config import PlacementConfig, ServerConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.launch import read_log_tail, spawn_server, terminate_process
from rollout_sglang.net import find_free_port

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")
ACTOR_CALL_TIMEOUT_S = 60.0


class ServerActor:
    """Runs inside a Ray worker on the server's node: owns the server subprocess there."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.port = 0
        self.log_path = ""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def start(self, cfg: ServerConfig, port: int, log_path: str) -> dict:
        """Start (or restart) the server; ``port`` 0 keeps the previous one or picks a free one here."""
        import ray

        terminate_process(self.proc)
        self.port = port or self.port or cfg.port or find_free_port("0.0.0.0" if cfg.host in ANY_ADDRESS else cfg.host)
        self.log_path = log_path
        env = {}
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if cfg.gpus() > 0:
            if len(gpu_ids) != cfg.gpus():
                raise RolloutError(f"server {self.index}: Ray assigned GPUs {gpu_ids}, expected {cfg.gpus()}")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)  # the engine sees exactly its bundle's GPUs
        self.proc = spawn_server(cfg, self.port, Path(log_path), env, die_with_parent=True)
        return {"pid": self.proc.pid, "port": self.port, "node_ip": self.node_ip(), "gpu_ids": gpu_ids}

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def terminate(self, timeout_s: float = 10.0) -> None:
        terminate_process(self.proc, timeout_s)

    def kill(self, sig: int = int(signal.SIGKILL)) -> None:
        """Signal the server process (tests and operators simulate crashes with this)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def log_tail(self, chars: int = 2000) -> str:
        return read_log_tail(self.log_path, chars)


class RayServerProcess:
    """The fleet's handle on a server run by a :class:`ServerActor`."""

    def __init__(self, actor, pid: int, node_ip: str, gpu_ids: list[str]):
        self.actor = actor
        self.pid = pid
        self.node_ip = node_ip
        self.gpu_ids = gpu_ids
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self.returncode is not None:
            return self.returncode
        try:
            self.returncode = ray.get(self.actor.poll.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
        except RayActorError:
            self.returncode = -1  # the actor (and with it the server's node or worker) is gone
        except GetTimeoutError:
            return None  # a slow actor is not a dead server: /health decides
        return self.returncode

    def terminate(self, timeout_s: float = 10.0) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(self.actor.terminate.remote(timeout_s), timeout=timeout_s + ACTOR_CALL_TIMEOUT_S)
        except RayActorError:
            pass

    def kill(self, sig: int = int(signal.SIGKILL)) -> None:
        import ray

        ray.get(self.actor.kill.remote(sig), timeout=ACTOR_CALL_TIMEOUT_S)

    def log_tail(self, chars: int = 2000) -> str:
        import ray
        from ray.exceptions import RayError

        try:
            return ray.get(self.actor.log_tail.remote(chars), timeout=ACTOR_CALL_TIMEOUT_S)
        except RayError as exc:
            return f"<log unavailable: {exc}>"


def _local_addresses() -> set[str]:
    names = {socket.gethostname(), "localhost"}
    addresses = set(LOOPBACK)
    for name in names:
        try:
            addresses.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return addresses


class RayLauncher:
    """One placement group with a bundle per server; one :class:`ServerActor` per bundle."""

    def __init__(self, cfg: PlacementConfig, servers: list[ServerConfig]):
        self.cfg = cfg
        self.bundles = [{"CPU": float(s.num_cpus), **({"GPU": float(s.gpus())} if s.gpus() else {})} for s in servers]
        self.group = None  # created at the first launch, so an unstarted fleet holds no cluster resources
        self.actors: dict[int, object] = {}
        self._owns_ray = False
        self.driver_ip = ""
        self._local: set[str] = set()

    def _ensure_group(self) -> None:
        if self.group is not None:
            return
        try:
            import ray
            from ray.util.placement_group import placement_group
        except ImportError as exc:
            raise RolloutError("fleet.placement.launcher=ray needs the 'ray' package") from exc
        if not ray.is_initialized():
            ray.init(address=self.cfg.ray_address or None, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        group = placement_group(self.bundles, strategy=self.cfg.placement_strategy)
        try:
            ray.get(group.ready(), timeout=self.cfg.ready_timeout_s)
        except Exception as exc:
            ray.util.remove_placement_group(group)
            raise RolloutError(f"placement group {self.bundles} ({self.cfg.placement_strategy}) not ready within "
                               f"{self.cfg.ready_timeout_s}s; cluster resources: {ray.cluster_resources()}: {exc}"
                               ) from exc
        self.group = group
        self.driver_ip = ray.util.get_node_ip_address()
        self._local = _local_addresses() | {self.driver_ip}

    def _new_actor(self, index: int, cfg: ServerConfig):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(ServerActor)
        return actor_cls.options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.gpus(), max_concurrency=4,  # poll while a start is under way
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        ).remote(index)

    def _actor_alive(self, actor) -> bool:
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(actor.node_ip.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
            return True
        except RayActorError:
            return False

    def launch(self, index: int, cfg: ServerConfig, port: int, log_path: Path) -> tuple[RayServerProcess, str, int]:
        import ray

        self._ensure_group()
        actor = self.actors.get(index)
        if actor is not None and not self._actor_alive(actor):
            logger.warning("server %d: its Ray actor died; placing a new one in bundle %d", index, index)
            actor, port = None, 0  # a new actor may land on another node: pick the port there
        if actor is None:
            actor = self.actors[index] = self._new_actor(index, cfg)
        # Check reachability before anything starts (the actor may still be coming up: be patient).
        host = self._address(index, cfg, ray.get(actor.node_ip.remote(), timeout=self.cfg.ready_timeout_s))
        info = ray.get(actor.start.remote(cfg, port, str(log_path)), timeout=ACTOR_CALL_TIMEOUT_S)
        return RayServerProcess(actor, info["pid"], info["node_ip"], info["gpu_ids"]), host, info["port"]

    def _address(self, index: int, cfg: ServerConfig, node_ip: str) -> str:
        """Where the driver reaches the server: its bind address, or the node's IP if it binds to all."""
        if cfg.host in ANY_ADDRESS:
            return node_ip
        if cfg.host in LOOPBACK and node_ip not in self._local:
            raise RolloutError(f"servers[{index}].host={cfg.host!r}: the server runs on node {node_ip}, which "
                               f"this driver ({self.driver_ip}) cannot reach over loopback; set host: 0.0.0.0")
        return cfg.host

    def shutdown(self) -> None:
        if self.group is None and not self.actors:
            return
        import ray

        for actor in self.actors.values():
            try:
                ray.get(actor.terminate.remote(5.0), timeout=30)
            except Exception:  # dead or unreachable actor: nothing left to stop
                pass
            ray.kill(actor)
        self.actors.clear()
        if self.group is not None:
            try:
                ray.util.remove_placement_group(self.group)
            except Exception as exc:
                logger.warning("removing the placement group failed: %s", exc)
            self.group = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
