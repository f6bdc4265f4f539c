"""Command construction for SGLang / CPU servers and sglang-router, and config validation.

The real-SGLang launch path runs in tests/gpu (skipped without CUDA and SGLang)."""
from __future__ import annotations

import sys

import pytest

from rollout_sglang.config import FleetConfig, RouterConfig, ServerConfig, WeightSyncConfig
from rollout_sglang.launch import build_router_command, build_server_command
from typed_config import ConfigError, build


def test_sglang_command_from_yaml_fields():
    cfg = build(ServerConfig, {
        "kind": "sglang", "python": "/opt/sglang/bin/python", "model_path": "/models/Qwen3-30B-A3B",
        "host": "0.0.0.0", "tp": 4, "ep": 4, "mem_fraction_static": 0.7, "dtype": "bf16",
        "enable_return_routed_experts": True, "quantization": "fp8", "deterministic_inference": True,
        "nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:5000", "extra_args": ["--context-length", "16384"],
    })
    cmd = build_server_command(cfg, port=30001)
    assert cmd[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for part in ["--model-path /models/Qwen3-30B-A3B", "--host 0.0.0.0", "--port 30001", "--tp-size 4", "--ep-size 4",
                 "--mem-fraction-static 0.7", "--skip-server-warmup", "--dtype bfloat16",
                 "--enable-return-routed-experts", "--quantization fp8", "--enable-deterministic-inference",
                 "--nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000"]:
        assert part in joined, part
    assert cmd[-2:] == ["--context-length", "16384"]


def test_cpu_and_custom_commands():
    cpu = build_server_command(build(ServerConfig, {"model_path": "/m", "dtype": "bf16"}), port=1234)
    assert cpu == [sys.executable, "-m", "rollout_sglang.cpu_server", "--model-path", "/m", "--host", "127.0.0.1",
                   "--port", "1234", "--dtype", "bf16"]
    custom = build(ServerConfig, {"kind": "command", "command": ["srun", "serve", "--port={port}", "{model_path}"],
                                  "model_path": "/w"})
    assert build_server_command(custom, port=9) == ["srun", "serve", "--port=9", "/w"]


def test_router_command_uses_the_real_cli():
    cmd = build_router_command(build(RouterConfig, {"policy": "cache_aware"}), port=30000, prometheus_port=29001,
                               worker_urls=["http://a:1", "http://b:2"])
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"]
    joined = " ".join(cmd)
    assert "--policy cache_aware" in joined and "--port 30000" in joined and "--prometheus-port 29001" in joined
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--worker-urls") + 3] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize("data, path", [
    ({"servers": []}, "servers"),
    ({"servers": [{"kind": "cpu"}]}, "servers[0].model_path"),
    ({"servers": [{"kind": "command"}]}, "servers[0].command"),
    ({"servers": [{"model_path": "/m", "dtype": "float16"}]}, "servers[0].dtype"),
    ({"servers": [{"model_path": "/m", "prot": 3}]}, "servers[0].prot"),
    ({"servers": [{"model_path": "/m"}], "router": {"policy": "fastest"}}, "router.policy"),
    ({"servers": [{"model_path": "/m", "nnodes": 2, "node_rank": 2}]}, "servers[0].node_rank"),
    ({"servers": [{"model_path": "/m", "nnodes": 2, "dist_init_addr": "h:1"}], "placement": {"launcher": "ray"}},
     "servers[0].nnodes"),
    ({"servers": [{"model_path": "/m"}], "placement": {"placement_strategy": "RANDOM"}}, "placement.placement_strategy"),
    ({"servers": [{"model_path": "/m", "num_gpus": -1}]}, "servers[0].num_gpus"),
])
def test_fleet_config_errors_name_the_field(data, path):
    with pytest.raises(ConfigError) as info:
        build(FleetConfig, data)
    assert info.value.path == path


def test_weight_sync_config_defaults():
    cfg = build(WeightSyncConfig, {"transport": "distributed", "backend": "nccl"})
    assert not cfg.flattened_bucket and cfg.pause_mode == "retract" and cfg.bucket_bytes > 0
    with pytest.raises(ConfigError, match="backend"):
        build(WeightSyncConfig, {"backend": "mpi"})


def test_ray_bundle_gpus_default_to_the_engine_size():
    assert build(ServerConfig, {"kind": "sglang", "model_path": "/m", "tp": 4}).gpus() == 4
    assert build(ServerConfig, {"kind": "sglang", "model_path": "/m", "tp": 4, "num_gpus": 8}).gpus() == 8
    assert build(ServerConfig, {"kind": "cpu", "model_path": "/m"}).gpus() == 0
    assert build(FleetConfig, {"servers": [{"model_path": "/m"}]}).placement.launcher == "local"
