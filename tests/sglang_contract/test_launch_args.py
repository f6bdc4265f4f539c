"""The fleet's launch command for real SGLang engines, through SGLang's own argument parser.

Every option the fleet config can produce is parsed by ``ServerArgs.add_cli_args`` with argparse
abbreviations off (``--tp`` only ever parsed as an abbreviation of ``--tp-size``), and the parsed
values are the configured ones; no deprecated flag is used.
"""
from __future__ import annotations

import pytest

from rollout_sglang.config import ServerConfig
from rollout_sglang.launch import build_server_command
from typed_config import build

BASE = {"kind": "sglang", "model_path": "/models/Qwen3-30B-A3B"}


def parsed(sglang, server: dict, port: int = 30001) -> dict:
    cmd = build_server_command(build(ServerConfig, {**BASE, **server}), port=port)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    answer = sglang.ask("parse_args", argv=cmd[3:])
    assert answer["ok"], answer["error"]
    assert answer["deprecated"] == [], answer["deprecated"]
    return answer["values"]


def test_defaults(sglang):
    values = parsed(sglang, {})
    assert values["model_path"] == "/models/Qwen3-30B-A3B" and values["port"] == 30001
    assert values["host"] == "127.0.0.1" and values["tp_size"] == 1 and values["ep_size"] == 1
    assert values["mem_fraction_static"] == pytest.approx(0.8) and values["skip_server_warmup"] is True
    assert values["dtype"] == "float32"


@pytest.mark.parametrize("server, expected", [
    ({"tp": 4, "ep": 8}, {"tp_size": 4, "ep_size": 8}),
    ({"dtype": "bf16"}, {"dtype": "bfloat16"}),
    ({"dtype": "auto"}, {"dtype": "auto"}),
    ({"mem_fraction_static": 0.55}, {"mem_fraction_static": 0.55}),
    ({"enable_return_routed_experts": True}, {"enable_return_routed_experts": True}),
    ({"quantization": "fp8"}, {"quantization": "fp8"}),
    ({"deterministic_inference": True}, {"enable_deterministic_inference": True}),
    ({"nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:5000"},
     {"nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:5000"}),
    ({"host": "0.0.0.0"}, {"host": "0.0.0.0"}),
], ids=["tp_ep", "bf16", "auto_dtype", "mem_fraction", "routed_experts", "fp8", "deterministic", "multi_node", "host"])
def test_each_option_parses_to_its_value(sglang, server, expected):
    values = parsed(sglang, server)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value) if isinstance(value, float) else values[key] == value, key


def test_a_colocated_engine_launches_with_the_memory_saver(sglang):
    """Without --enable-memory-saver SGLang's /release_memory_occupation frees nothing (and answers 200)."""
    from rollout_sglang.launch import with_memory_saver

    colocated = with_memory_saver(build(ServerConfig, {**BASE, "tp": 2}))
    assert with_memory_saver(colocated) == colocated  # the flag once
    cmd = build_server_command(colocated, port=30001)
    values = sglang.ask("parse_args", argv=cmd[3:])["values"]
    assert values["enable_memory_saver"] is True and values["tp_size"] == 2
    assert parsed(sglang, {})["enable_memory_saver"] is False
    cpu = build(ServerConfig, {"kind": "cpu", "model_path": "/m"})
    assert with_memory_saver(cpu) is cpu  # the CPU server always frees what it releases


def test_the_gpu_tests_launch_arguments(sglang):
    from tests.gpu.sglang_helpers import SGLANG_TEST_ARGS

    values = parsed(sglang, {"extra_args": SGLANG_TEST_ARGS})
    assert values["skip_tokenizer_init"] is True and values["attention_backend"] == "triton"


def test_the_colocated_paper_engines_launch_with_the_memory_saver(sglang):
    """Colocated engines release and resume their memory (/release_memory_occupation), which needs SGLang's
    memory saver: the paper's colocated run turns it on by the flag SGLang parses."""
    from pathlib import Path

    from megatron_vespo.config import load_run_config, to_dict

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs/paper/vespo_sync_n8_colocated.yaml")
    assert cfg.rollout.fleet.placement.colocate
    for server in cfg.rollout.fleet.servers:
        values = parsed(sglang, to_dict(server))
        assert values["enable_memory_saver"] is True and values["tp_size"] == 8
        assert values["mem_fraction_static"] == pytest.approx(0.8)


def test_a_deprecated_flag_is_noticed(sglang):
    """The check above can fail: SGLang's parser reports --disable-cuda-graph as deprecated."""
    cmd = build_server_command(build(ServerConfig, {**BASE, "extra_args": ["--disable-cuda-graph"]}), port=1)
    assert any("--disable-cuda-graph" in m for m in sglang.ask("parse_args", argv=cmd[3:])["deprecated"])
