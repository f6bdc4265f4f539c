"""Command lines for rollout servers and the router, and the local way to run a server process.

A fleet starts servers through a :class:`ServerLauncher`; what it gets back is a
:class:`ServerProcess` it can poll and stop. :class:`LocalLauncher` runs each server as a subprocess
of this process; ``rollout_sglang.ray_launcher.RayLauncher`` runs it from a Ray actor on some node.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Protocol

from rollout_sglang.config import RouterConfig, ServerConfig
from rollout_sglang.net import find_free_port


def _python(executable: str) -> str:
    return executable or sys.executable


def build_server_command(cfg: ServerConfig, port: int) -> list[str]:
    """The argv that starts one server listening on ``cfg.host:port``."""
    if cfg.kind == "command":
        subst = {"host": cfg.host, "port": str(port), "model_path": cfg.model_path}
        return [part.format(**subst) for part in cfg.command] + list(cfg.extra_args)
    if cfg.kind == "cpu":
        deterministic = ["--enable-deterministic-inference"] if cfg.deterministic_inference else []
        return [_python(cfg.python), "-m", "rollout_sglang.cpu_server", "--model-path", cfg.model_path,
                "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype, *deterministic, *cfg.extra_args]
    cmd = [_python(cfg.python), "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp), "--ep-size", str(cfg.ep),
           "--mem-fraction-static", str(cfg.mem_fraction_static), "--skip-server-warmup"]
    if cfg.dtype not in ("", "auto"):
        cmd += ["--dtype", {"fp32": "float32", "bf16": "bfloat16"}.get(cfg.dtype, cfg.dtype)]
    if cfg.enable_return_routed_experts:
        cmd.append("--enable-return-routed-experts")
    if cfg.quantization:
        cmd += ["--quantization", cfg.quantization]
    if cfg.deterministic_inference:
        cmd.append("--enable-deterministic-inference")
    if cfg.nnodes > 1:
        if not cfg.dist_init_addr:
            raise ValueError("dist_init_addr: required when nnodes > 1")
        cmd += ["--nnodes", str(cfg.nnodes), "--node-rank", str(cfg.node_rank), "--dist-init-addr", cfg.dist_init_addr]
    return cmd + list(cfg.extra_args)


MEMORY_SAVER_FLAG = "--enable-memory-saver"


def with_memory_saver(cfg: ServerConfig) -> ServerConfig:
    """A colocated engine's config: an SGLang server launches with ``--enable-memory-saver``, without which its
    /release_memory_occupation frees nothing (and still answers 200). The CPU server always frees."""
    if cfg.kind != "sglang" or MEMORY_SAVER_FLAG in cfg.extra_args:
        return cfg
    return dataclasses.replace(cfg, extra_args=[*cfg.extra_args, MEMORY_SAVER_FLAG])


def resident_bytes(pid: int) -> Optional[int]:
    """Resident memory of a process on this node (``VmRSS`` of /proc/<pid>/status); None when unreadable."""
    try:
        with open("/proc/{}/status".format(pid)) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def build_router_command(cfg: RouterConfig, port: int, prometheus_port: int, worker_urls: list[str] = ()) -> list[str]:
    """The argv that starts sglang-router (0.3.x CLI) on ``cfg.host:port``."""
    cmd = [_python(cfg.python), "-m", "sglang_router.launch_router", "--host", cfg.host, "--port", str(port),
           "--policy", cfg.policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
           "--request-timeout-secs", str(cfg.request_timeout_s),
           "--health-check-interval-secs", str(cfg.health_check_interval_s), "--log-level", cfg.log_level,
           "--shutdown-grace-period-secs", "2"]
    cmd += ["--worker-urls", *worker_urls] if worker_urls else []
    return cmd + list(cfg.extra_args)


def terminate_process(proc: Optional[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still alive after ``timeout_s``; no-op if already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_log_tail(path: str | Path, chars: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


def open_server_log(path: str | Path, cmd: list[str]):
    """Append-mode log file with a header naming the launch; the caller passes it to Popen and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "ab")
    log.write(f"\n=== launch {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
    log.flush()
    return log


class ServerProcess(Protocol):
    """A running (or exited) server process, wherever it runs."""

    pid: int  # on the node that runs it

    def poll(self) -> Optional[int]:
        """None while it runs; its exit code (or -1 if its host is gone) once it stopped."""

    def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; no-op if already gone."""

    def log_tail(self, chars: int = 2000) -> str:
        """The end of its log (for error messages)."""


class ServerLauncher(Protocol):
    """Starts the process of one fleet server and tells the fleet where it listens."""

    def launch(self, index: int, cfg: ServerConfig, port: int, log_path: Path) -> tuple[ServerProcess, str, int]:
        """Start server ``index``; ``port`` 0 picks one. Returns (process, host to reach it at, port)."""

    def shutdown(self) -> None:
        """Release what the launcher holds (actors, placement groups); processes are stopped already."""


class LocalServerProcess:
    """A server started with Popen in this process."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def terminate(self, timeout_s: float = 10.0) -> None:
        terminate_process(self.proc, timeout_s)

    def log_tail(self, chars: int = 2000) -> str:
        return read_log_tail(self.log_path, chars)


def popen_owned(cmd: list[str], log, env: Optional[dict[str, str]] = None,
                die_with_parent: bool = True) -> subprocess.Popen:
    """Popen in its own session (a signal to our group never reaches it, and stopping it never signals
    us); with ``die_with_parent`` (Linux) it is SIGKILLed when the launching *thread* exits (see
    :mod:`rollout_sglang.die_with_parent`): call it from a thread that lives as long as the process,
    e.g. through a :class:`Spawner`."""
    if die_with_parent and sys.platform.startswith("linux"):
        cmd = [sys.executable, "-m", "rollout_sglang.die_with_parent", str(os.getpid()), *cmd]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class Spawner:
    """One long-lived thread that starts the fleet's processes (servers, router), so that the kernel
    kills every one of them when this process dies, however it dies (SIGKILL included): the parent-death
    signal fires when the thread that forked exits, and this thread lives until :meth:`close`."""

    def __init__(self) -> None:
        import concurrent.futures

        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fleet-spawner")

    def popen(self, cmd: list[str], log, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        return self._thread.submit(popen_owned, cmd, log, env).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def spawn_server(cfg: ServerConfig, port: int, log_path: Path, extra_env: Optional[dict[str, str]] = None,
                 die_with_parent: bool = False, spawner: Optional[Spawner] = None) -> subprocess.Popen:
    """Popen the server command in its own session, logging to ``log_path``: through ``spawner`` (dies
    with this process), or from the calling thread, killed when that thread exits if ``die_with_parent``
    (for launchers that can vanish without stopping it, e.g. a killed Ray actor)."""
    cmd = build_server_command(cfg, port)
    env = {**os.environ, **cfg.env, **(extra_env or {})}
    log = open_server_log(log_path, cmd)
    try:
        if spawner is not None:
            return spawner.popen(cmd, log, env)
        return popen_owned(cmd, log, env, die_with_parent=die_with_parent)
    finally:
        log.close()


class LocalLauncher:
    """Servers as subprocesses of this process, bound to ``cfg.host``; they die with it (``spawner``)."""

    def __init__(self, spawner: Spawner):
        self.spawner = spawner

    def launch(self, index: int, cfg: ServerConfig, port: int, log_path: Path) -> tuple[LocalServerProcess, str, int]:
        port = port or cfg.port or find_free_port(cfg.host)
        return LocalServerProcess(spawn_server(cfg, port, log_path, spawner=self.spawner), log_path), cfg.host, port

    def shutdown(self) -> None:
        pass
