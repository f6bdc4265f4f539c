"""Typed configuration of the rollout fleet: servers, router, supervision, weight sync.

Built from YAML mappings with ``typed_config.build`` (unknown keys and bad values fail
with the dotted field path). Server kinds: ``cpu`` (the CPU rollout server, not SGLang), ``sglang``
(``python -m sglang.launch_server``) and ``command`` (any command line, with ``{host}``, ``{port}``
and ``{model_path}`` placeholders). Launchers (``placement.launcher``): ``local`` subprocesses of the
driver, or ``ray``: one Ray actor per server in a placement group (a bundle per server).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from typed_config import ConfigError, field


@dataclass(kw_only=True)
class ServerConfig:
    """One rollout server process."""

    kind: Literal["cpu", "sglang", "command"] = field("cpu", help="which server to launch")
    python: str = field("", help="python executable for cpu/sglang servers; empty: the current interpreter")
    command: list[str] = field(default_factory=list, help="full command line for kind 'command'")
    model_path: str = field("", help="Hugging Face model directory")
    host: str = field("127.0.0.1", help="bind address")
    port: int = field(0, ge=0, le=65535, help="0 picks a free port")
    dtype: str = field("float32", help="cpu: float32 or bfloat16; sglang: passed as --dtype unless 'auto'")
    tp: int = field(1, ge=1, help="sglang --tp (also the number of ranks the server takes in a weight-sync group)")
    ep: int = field(1, ge=1, help="sglang --ep-size")
    mem_fraction_static: float = field(0.8, gt=0, le=1, help="sglang --mem-fraction-static")
    enable_return_routed_experts: bool = field(False, help="sglang --enable-return-routed-experts")
    quantization: Optional[str] = field(None, help="sglang --quantization (e.g. fp8)")
    deterministic_inference: bool = field(False, help="--enable-deterministic-inference (sglang and cpu): every sample "
                                          "of a request is sampled with its seed, so the client sends one request "
                                          "per sample")
    nnodes: int = field(1, ge=1, help="sglang multi-node: --nnodes")
    node_rank: int = field(0, ge=0, help="sglang multi-node: --node-rank")
    dist_init_addr: Optional[str] = field(None, help="sglang multi-node: --dist-init-addr host:port")
    extra_args: list[str] = field(default_factory=list, help="appended verbatim to the command line")
    env: dict[str, str] = field(default_factory=dict, help="extra environment variables")
    startup_timeout_s: float = field(600.0, gt=0, help="how long to wait for /health after launch")
    num_gpus: Optional[int] = field(None, ge=0, help="ray launcher: GPUs of this server's bundle (its "
                                    "CUDA_VISIBLE_DEVICES); null: tp for sglang, 0 otherwise")
    num_cpus: float = field(1.0, ge=0, help="ray launcher: CPUs of this server's bundle")

    def gpus(self) -> int:
        """GPUs the engine occupies (its Ray bundle)."""
        if self.num_gpus is not None:
            return self.num_gpus
        return self.tp if self.kind == "sglang" else 0

    def validate(self, path: str) -> None:
        p = lambda name: f"{path}.{name}" if path else name  # noqa: E731
        if self.kind == "command" and not self.command:
            raise ConfigError(p("command"), "is required for kind 'command'")
        if self.kind != "command" and not self.model_path:
            raise ConfigError(p("model_path"), f"is required for kind {self.kind!r}")
        if self.kind == "cpu" and self.dtype not in ("float32", "fp32", "bfloat16", "bf16"):
            raise ConfigError(p("dtype"), f"the CPU server supports float32 or bfloat16; got {self.dtype!r}")
        if self.node_rank >= self.nnodes:
            raise ConfigError(p("node_rank"), f"must be < nnodes={self.nnodes}; got {self.node_rank}")


@dataclass(kw_only=True)
class RouterConfig:
    """The sglang-router process (``python -m sglang_router.launch_router``)."""

    python: str = field("", help="python executable with sglang-router; empty: the current interpreter")
    host: str = field("127.0.0.1")
    port: int = field(0, ge=0, le=65535, help="0 picks a free port")
    policy: Literal["round_robin", "cache_aware", "random", "power_of_two"] = field("round_robin")
    prometheus_port: int = field(0, ge=0, le=65535, help="0 picks a free port (the router always serves metrics)")
    request_timeout_s: int = field(1800, ge=1)
    health_check_interval_s: int = field(5, ge=1)
    log_level: Literal["debug", "info", "warn", "error"] = field("warn")
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = field(60.0, gt=0)


@dataclass(kw_only=True)
class PlacementConfig:
    """Where server processes run: local subprocesses, or Ray actors in one placement group."""

    launcher: Literal["local", "ray"] = field("local", help="local: subprocesses of the driver; ray: one actor "
                                              "per server, each in its own placement-group bundle")
    ray_address: str = field("", help="ray.init address when Ray is not initialised yet ('auto', 'ray://h:p'); "
                             "empty: RAY_ADDRESS or a new local instance")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = field(
        "PACK", help="Ray placement-group strategy over the per-server bundles")
    ready_timeout_s: float = field(600.0, gt=0, help="how long to wait for the placement group's resources")
    colocate: bool = field(False, help="trainer and rollout engines time-share the same GPUs (sync mode only): "
                           "engines release memory while the trainer updates, the trainer offloads while they generate")


@dataclass(kw_only=True)
class FleetConfig:
    """M servers behind one router, with supervision."""

    servers: list[ServerConfig] = field(default_factory=list, help="one entry per server")
    router: RouterConfig = field(default_factory=RouterConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    supervise: bool = field(True, help="restart dead servers and bring them to the current weights")
    health_interval_s: float = field(1.0, gt=0, help="supervisor poll period")
    health_timeout_s: float = field(5.0, gt=0, help="how long one /health check may take (SGLang's generates a token)")
    health_failures_to_restart: int = field(3, ge=1, help="consecutive failed /health checks that count as dead")
    flush_retry_s: float = field(30.0, gt=0, help="after a weight update, how long a flush_cache the server refuses "
                                 "(requests still running) is retried before the update fails")
    max_restarts: int = field(5, ge=0, help="per server; past this it stays down")
    log_dir: str = field("", help="server/router logs; empty: a temporary directory")

    def validate(self, path: str) -> None:
        where = f"{path}.servers" if path else "servers"
        if not self.servers:
            raise ConfigError(where, "needs at least one server")
        if self.placement.launcher == "ray":
            for i, server in enumerate(self.servers):
                if server.nnodes > 1:  # one actor launches one process; a multi-node engine needs one per node
                    raise ConfigError(f"{where}[{i}].nnodes", "multi-node engines are not supported by the ray "
                                      "launcher; use one server per node group with the local launcher")


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How new weights reach the fleet."""

    transport: Literal["disk", "distributed", "ipc"] = field(
        "distributed", help="disk: HF safetensors + /update_weights_from_disk; distributed: broadcast over a "
        "process group (gloo/nccl); ipc: CUDA-IPC handles via /update_weights_from_tensor (colocated GPU engines)")
    disk_dir: str = field("", help="disk transport: where versions are written (HF safetensors dirs)")
    keep_versions: int = field(2, ge=1, help="disk transport: versions kept on disk")
    backend: Literal["gloo", "nccl"] = field("gloo", help="distributed transport backend (nccl on GPUs)")
    master_address: str = field("127.0.0.1", help="the trainer's address, reachable from every server")
    master_port: int = field(0, ge=0, le=65535, help="0 picks a free port")
    group_name: str = field("vespo_weight_sync")
    group_timeout_s: float = field(120.0, gt=0, help="rendezvous timeout when forming the group")
    bucket_bytes: int = field(512 << 20, gt=0, help="bytes per broadcast bucket")
    flattened_bucket: bool = field(False, help="send each bucket as one uint8 buffer (SGLang 'flattened_bucket'); "
                                   "per-tensor broadcasts avoid the pack/unpack copies (faster on CPU, see bench_router)")
    ipc_flattened_bucket: bool = field(True, help="ipc transport: one CUDA-IPC handle per bucket (per dtype) "
                                       "instead of one per tensor")
    pause_mode: Literal["abort", "in_place", "retract"] = field(
        "retract", help="pause_generation mode around an update: retract (running requests go back to the queue "
        "and continue on the new weights after their KV is recomputed), abort (they return their partial "
        "output), in_place (they keep their old-weight KV; the cache flush after the update is refused until they "
        "finish, and the update fails once the fleet's flush_retry_s has passed)")
