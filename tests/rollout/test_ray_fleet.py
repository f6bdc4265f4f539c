"""Two CPU rollout servers launched by Ray actors (one placement-group bundle each) behind the real
sglang-router: generation, disk weight sync, and supervision when a server process or its actor dies.

Ray runs here on CPU (``num_cpus=2``); the bundles hold CPUs only. The same launcher puts SGLang
engines on GPUs (bundles with ``GPU: tp``); that path is exercised by tests/gpu.
"""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from rollout_sglang.client import SGLangClient
from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import DiskWeightSync
from typed_config import build

from .helpers import assert_logprob_parity, hf_state, load_hf, load_state_into, perturbed

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_cluster, tiny_moe_dir, tmp_path_factory):
    server = {"kind": "cpu", "model_path": str(tiny_moe_dir), "startup_timeout_s": 120, "num_cpus": 1}
    cfg = build(FleetConfig, {
        "servers": [server, server],
        "placement": {"launcher": "ray", "placement_strategy": "PACK"},
        "router": {"health_check_interval_s": 1},
        "health_interval_s": 0.3, "health_failures_to_restart": 2,
        "log_dir": str(tmp_path_factory.mktemp("ray_fleet_logs")),
    })
    with Fleet(cfg) as f:
        yield f


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(2, 8))] for _ in range(count)]


def rollout(url: str, batch, n: int = 2):
    async def go():
        async with SGLangClient(url) as client:
            return await client.generate_batch(batch, {"max_new_tokens": 4}, n=n)
    return asyncio.run(go())


def assert_parity(model, groups, version: str) -> None:
    assert_logprob_parity(model, [s for g in groups for s in g], version=version)


def wait_restarted(server, restarts_before: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (server.restarts > restarts_before and server.state == "healthy"):
        time.sleep(0.2)
    assert server.state == "healthy" and server.restarts == restarts_before + 1, server.events


def test_ray_fleet_generate_sync_and_supervise(fleet, tiny_moe_dir, tmp_path):
    from rollout_sglang.ray_launcher import RayServerProcess

    # Each server runs under its own actor, in its own bundle, as a process that is not ours.
    actors = fleet.launcher.actors
    assert sorted(actors) == [0, 1] and fleet.launcher.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    for s in fleet.servers:
        assert isinstance(s.proc, RayServerProcess) and s.proc.poll() is None and s.proc.pid != os.getpid()
        assert s.proc.gpu_ids == [] and s.host == "127.0.0.1" and s.port > 0
    assert ray.util.placement_group_table(fleet.launcher.group)["state"] == "CREATED"

    reference = load_hf(tiny_moe_dir)
    assert_parity(reference, rollout(fleet.router_url, prompts(8, seed=1)), version="default")

    # Disk weight sync reaches both Ray-launched servers.
    new_state = perturbed(hf_state(tiny_moe_dir), seed=5)
    DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path)})).push(
        [list(new_state.items())], version="1")
    load_state_into(reference, new_state)
    assert_parity(reference, rollout(fleet.router_url, prompts(8, seed=2)), version="1")

    # The server process dies under a live actor: same actor, same address, current weights.
    victim = fleet.servers[0]
    actor, url, restarts = actors[0], victim.url, victim.restarts
    victim.proc.kill()
    wait_restarted(victim, restarts)
    assert fleet.launcher.actors[0] is actor and victim.url == url
    assert http_json("GET", victim.url + "/model_info")[1]["weight_version"] == "1"
    assert_parity(reference, rollout(victim.url, prompts(3, seed=3)), version="1")

    # The actor itself dies (as when its node goes away): a new actor in the same bundle.
    victim = fleet.servers[1]
    actor, restarts, old_pid = actors[1], victim.restarts, victim.proc.pid
    ray.kill(actor)
    wait_restarted(victim, restarts)
    assert fleet.launcher.actors[1] is not actor and victim.proc.pid != old_pid
    with pytest.raises(ProcessLookupError):  # the orphaned server died with its actor
        os.kill(old_pid, 0)
    assert http_json("GET", victim.url + "/model_info")[1]["weight_version"] == "1"
    assert {w["url"].rstrip("/") for w in fleet.router.workers()} == {s.url for s in fleet.servers}
    assert_parity(reference, rollout(fleet.router_url, prompts(8, seed=4)), version="1")
