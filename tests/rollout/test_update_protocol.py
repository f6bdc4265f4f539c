"""The weight-update protocol on the wire, against a CPU rollout server speaking SGLang 0.5.23's dialect
(every control request it receives is logged, in order): SGLang's call order for each transport, a
refused flush retried and then failing the update with a restart at the last good version, the
supervisor leaving paused servers alone, and servers of an unsupported SGLang version refused."""
from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync, iter_buckets
from typed_config import build

from .helpers import hf_state, perturbed


@pytest.fixture(scope="module")
def fleet(tiny_moe_dir, tmp_path_factory):
    server = {"kind": "cpu", "model_path": str(tiny_moe_dir), "startup_timeout_s": 120, "extra_args": ["--log-requests"],
              "deterministic_inference": True}
    cfg = build(FleetConfig, {"servers": [server], "health_interval_s": 0.2, "health_timeout_s": 1.0,
                              "health_failures_to_restart": 2, "flush_retry_s": 1.0,
                              "log_dir": str(tmp_path_factory.mktemp("protocol_logs"))})
    with Fleet(cfg) as f:
        yield f


def requests_since(fleet, mark: int) -> list[str]:
    """Control requests the server logged after ``mark`` (a count from an earlier call), in order."""
    lines = re.findall(r"request (?:GET|POST) (\S+)", Path(fleet.servers[0].log_path).read_text())
    return [p for p in lines[mark:] if p not in ("/model_info", "/server_info", "/get_load")]


def mark(fleet) -> int:
    return len(re.findall(r"request (?:GET|POST) \S+", Path(fleet.servers[0].log_path).read_text()))


def state(tiny_moe_dir, seed: int) -> list:
    return list(perturbed(hf_state(tiny_moe_dir), seed=seed).items())


def test_the_fleet_tells_clients_to_send_one_request_per_sample(fleet):
    """The server samples every copy of a request with its one seed (deterministic inference)."""
    assert fleet.one_request_per_sample


def test_disk_update_order(fleet, tiny_moe_dir, tmp_path):
    sync = DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path)}))
    start = mark(fleet)
    sync.push([state(tiny_moe_dir, 1)], version="1")
    assert requests_since(fleet, start) == ["/pause_generation", "/update_weights_from_disk", "/flush_cache",
                                            "/continue_generation"]
    assert fleet.weight_versions() == ["1"]


def test_distributed_update_order(fleet, tiny_moe_dir):
    cfg = build(WeightSyncConfig, {"transport": "distributed", "bucket_bytes": 64 << 10})
    sync = DistributedWeightSync(fleet, cfg)
    try:
        start = mark(fleet)
        sync.push(iter_buckets(state(tiny_moe_dir, 2), cfg.bucket_bytes), version="2")
        calls = requests_since(fleet, start)
    finally:
        sync.close()
    updates = calls.count("/update_weights_from_distributed")
    assert updates > 1  # several buckets
    # The group is formed by the sender once the owner opened the update (SGLang takes it at any time).
    assert calls == (["/pause_generation", "/begin_weight_update", "/init_weights_update_group"]
                     + ["/update_weights_from_distributed"] * updates
                     + ["/end_weight_update", "/flush_cache", "/continue_generation"])
    assert fleet.weight_versions() == ["2"]


def test_a_flush_refused_for_good_fails_the_update_and_restarts_at_the_last_good_version(fleet, tiny_moe_dir, tmp_path):
    """pause_mode in_place keeps a running request with its old-weight KV: the flush after the update is
    refused until it finishes. Retried for flush_retry_s, then the update fails naming the server, and the
    server is restarted at the last good version (the disk version "3")."""
    good = DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path / "good")}))
    good.push([state(tiny_moe_dir, 3)], version="3")
    def held_request():
        try:
            http_json("POST", fleet.servers[0].url + "/generate", {
                "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 500}}, timeout_s=60)
        except OSError:
            pass  # the restart below ends it

    t = threading.Thread(target=held_request)
    t.start()
    time.sleep(0.3)
    restarts = fleet.servers[0].restarts
    cfg = build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path / "bad"), "pause_mode": "in_place"})
    start = mark(fleet)
    try:
        with pytest.raises(RolloutError, match=r"server 0 \(http://127.0.0.1:\d+\) did not flush its cache"):
            DiskWeightSync(fleet, cfg).push([state(tiny_moe_dir, 4)], version="4")
    finally:
        t.join(60)
    calls = requests_since(fleet, start)
    assert calls[:2] == ["/pause_generation", "/update_weights_from_disk"]
    assert calls.count("/flush_cache") > 1  # retried
    assert fleet.servers[0].restarts == restarts + 1 and fleet.servers[0].state == "healthy"
    assert fleet.weight_versions() == ["3"]


def test_the_supervisor_leaves_a_paused_server_alone(fleet):
    """SGLang's /health generates a token, which waits while generation is paused: a paused server fails
    every health check, and must not be restarted for it."""
    server = fleet.servers[0]
    restarts = server.restarts
    fleet.pause_generation("retract", servers=[server])
    try:
        with pytest.raises(OSError):
            http_json("GET", server.url + "/health", timeout_s=0.5)
        time.sleep(2.0)  # ten health intervals, two failures would count as dead
        assert server.restarts == restarts and server.state == "healthy"
    finally:
        fleet.continue_generation(servers=[server])
    assert http_json("GET", server.url + "/health", timeout_s=5)[0] == 200


def test_a_server_of_an_unsupported_sglang_version_is_refused(tmp_path):
    script = Path(__file__).with_name("old_sglang_server.py")
    server = {"kind": "command", "command": [sys.executable, str(script), "{port}", "0.4.10"], "startup_timeout_s": 60}
    fleet = Fleet(build(FleetConfig, {"servers": [server], "log_dir": str(tmp_path)}))
    with pytest.raises(RolloutError, match=r"runs SGLang '0.4.10'; this project speaks the API of SGLang >=0.5.23,<0.6"):
        fleet.start()
    assert not fleet.servers[0].alive()
