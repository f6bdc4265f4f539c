"""Command lines for rollout servers and the router, built from typed configs, and how to stop them."""
from __future__ import annotations

import subprocess
import sys
from typing import Optional

from rollout_sglang.config import RouterConfig, ServerConfig


def _python(executable: str) -> str:
    return executable or sys.executable


def build_server_command(cfg: ServerConfig, port: int) -> list[str]:
    """The argv that starts one server listening on ``cfg.host:port``."""
    if cfg.kind == "command":
        subst = {"host": cfg.host, "port": str(port), "model_path": cfg.model_path}
        return [part.format(**subst) for part in cfg.command] + list(cfg.extra_args)
    if cfg.kind == "cpu":
        return [_python(cfg.python), "-m", "rollout_sglang.cpu_server", "--model-path", cfg.model_path,
                "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype, *cfg.extra_args]
    cmd = [_python(cfg.python), "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--host", cfg.host, "--port", str(port), "--tp", str(cfg.tp), "--ep-size", str(cfg.ep),
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
