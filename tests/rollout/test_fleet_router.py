"""Three CPU rollout servers behind the real sglang-router: parity, weight sync, supervision.

One fleet per module (servers start once); tests run in file order and build on each other's
weight versions, as a training run would.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
import torch

from rollout_sglang.client import RetryPolicy, SGLangClient
from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.errors import ServerUnavailableError, WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.types import Sample
from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync, iter_buckets
from typed_config import build

from .helpers import assert_logprob_parity, hf_state, load_hf, load_state_into, perturbed, teacher_forced_logprobs

NUM_PROMPTS, N_SAMPLES = 64, 8


@pytest.fixture(scope="module")
def fleet(tiny_moe_dir, tmp_path_factory):
    server = {"kind": "cpu", "model_path": str(tiny_moe_dir), "startup_timeout_s": 120}
    cfg = build(FleetConfig, {
        "servers": [server, server, server],
        "router": {"health_check_interval_s": 1},
        "health_interval_s": 0.3, "health_failures_to_restart": 2,
        "log_dir": str(tmp_path_factory.mktemp("fleet_logs")),
    })
    with Fleet(cfg) as f:
        yield f


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    """HF model holding whatever weights the fleet should currently have."""
    return load_hf(tiny_moe_dir)


@pytest.fixture(scope="module")
def current_state(tiny_moe_dir):
    return {"state": hf_state(tiny_moe_dir)}


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(2, 10))] for _ in range(count)]


def run(coro):
    return asyncio.run(coro)


async def rollout(url: str, batch, params, n=N_SAMPLES, **client_kw):
    async with SGLangClient(url, **client_kw) as client:
        return await client.generate_batch(batch, params, n=n)


def assert_parity(model, groups, temperature: float, version: str | None = None) -> None:
    assert_logprob_parity(model, [s for g in groups for s in g], temperature, version)


def test_router_rollout_64x8_logprob_parity(fleet, reference):
    batch = prompts(NUM_PROMPTS, seed=1)
    params = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.95, "top_k": 50}
    groups = run(rollout(fleet.router_url, batch, params))
    assert len(groups) == NUM_PROMPTS and all(len(g) == N_SAMPLES for g in groups)
    for prompt, group in zip(batch, groups):
        assert all(s.prompt_ids == prompt and s.finish_reason.type == "length" and len(s.output_ids) == 6 for s in group)
    assert len({s.server for g in groups for s in g}) == 1  # all through the router URL
    assert_parity(reference, groups, temperature=0.8, version="default")
    # Samples of one prompt differ (distinct per-sample seeds), and every server took a share of the work.
    assert all(len({tuple(s.output_ids) for s in g}) > 1 for g in groups)
    loads = [http_json("GET", s.url + "/get_server_info")[1] for s in fleet.servers]
    assert all(info["engine"] == "CPU rollout server (not SGLang)" for info in loads)


def test_disk_weight_sync_changes_logprobs(fleet, reference, current_state, tmp_path):
    new_state = perturbed(current_state["state"], seed=11)
    sync = DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path)}))
    sync.push(iter_buckets(new_state.items(), sync.cfg.bucket_bytes), version="1")
    old = load_hf(fleet.servers[0].cfg.model_path)
    load_state_into(reference, new_state)
    current_state["state"] = new_state
    groups = run(rollout(fleet.router_url, prompts(12, seed=2), {"max_new_tokens": 5}, n=2))
    assert_parity(reference, groups, temperature=1.0, version="1")
    # ...and they no longer match the launch weights.
    s = groups[0][0]
    stale = teacher_forced_logprobs(old, s.prompt_ids, s.output_ids)
    assert max(abs(a - b) for a, b in zip(stale, s.output_logprobs)) > 1e-2
    assert all(http_json("GET", sv.url + "/model_info")[1]["weight_version"] == "1" for sv in fleet.servers)


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened_bucket", "per_tensor"])
def test_distributed_gloo_weight_sync(fleet, reference, current_state, flattened):
    version = "2f" if flattened else "2t"
    new_state = perturbed(current_state["state"], seed=21 if flattened else 22)
    cfg = build(WeightSyncConfig, {"transport": "distributed", "backend": "gloo", "flattened_bucket": flattened,
                                   "bucket_bytes": 64 << 10})  # several buckets for this model
    sync = DistributedWeightSync(fleet, cfg)
    try:
        sent = sync.push(iter_buckets(new_state.items(), cfg.bucket_bytes), version=version)
    finally:
        sync.close()
    assert sent == sum(t.numel() * t.element_size() for t in new_state.values())
    load_state_into(reference, new_state)
    current_state["state"] = new_state
    groups = run(rollout(fleet.router_url, prompts(12, seed=3), {"max_new_tokens": 5, "temperature": 1.2}, n=2))
    assert_parity(reference, groups, temperature=1.2, version=version)


def test_kill_one_server_mid_rollout(fleet, reference, current_state, tmp_path):
    # Recoverable weights for the restart: a disk version.
    DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path)})).push(
        [list(current_state["state"].items())], version="3")
    victim = fleet.servers[1]
    batch = prompts(NUM_PROMPTS, seed=4)

    async def scenario():
        task = asyncio.create_task(rollout(fleet.router_url, batch, {"max_new_tokens": 24}, retry=RetryPolicy(
            max_attempts=10, initial_backoff_s=0.2, max_backoff_s=2.0)))
        deadline = time.monotonic() + 30
        busy = False
        while not busy and time.monotonic() < deadline:  # kill it while it holds requests
            _, load = await asyncio.to_thread(http_json, "GET", victim.url + "/get_load")
            busy = bool(load) and load[0]["num_reqs"] > 0
            await asyncio.sleep(0.01)
        os.kill(victim.proc.pid, signal.SIGKILL)
        return busy, await task

    killed_busy, groups = run(scenario())
    assert killed_busy, "the server never had requests in flight"
    samples = [s for g in groups for s in g]
    assert len(samples) == NUM_PROMPTS * N_SAMPLES
    assert len({s.rid for s in samples}) == NUM_PROMPTS * N_SAMPLES  # each sample its own request, none twice
    assert all([s.rid.rsplit("_", 1)[1] for s in g] == [str(k) for k in range(N_SAMPLES)] for g in groups)
    assert not any(s.aborted for s in samples)
    assert_parity(reference, groups, temperature=1.0, version="3")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (victim.restarts >= 1 and victim.state == "healthy"):
        time.sleep(0.2)
    assert victim.restarts >= 1 and victim.state == "healthy", victim.events
    assert http_json("GET", victim.url + "/model_info")[1]["weight_version"] == "3"
    direct = run(rollout(victim.url, prompts(4, seed=5), {"max_new_tokens": 4}, n=2))
    assert_parity(reference, direct, temperature=1.0, version="3")
    assert any(w["url"].rstrip("/") == victim.url for w in fleet.router.workers())


def test_routed_experts_requests_fail_over_when_a_server_dies(fleet, reference, caplog):
    """With routed experts the requests bypass the router (it drops the field) and go to the workers
    directly. A server killed while it holds some of them: those go to another worker (same request
    ids, so the same sampling seeds); every response is complete, carries its routed experts and has
    the current weights' log-probs; the killed server is restarted and rejoins."""
    from megatron_vespo.config.schema import RolloutConfig
    from megatron_vespo.data.dataset import PromptRow
    from megatron_vespo.driver.rollout import generate_groups

    victim = fleet.servers[2]
    restarts = victim.restarts
    rows = [PromptRow(i, p, None) for i, p in enumerate(prompts(32, seed=6))]
    cfg = RolloutConfig(n_samples=4, max_response_len=24, max_concurrency=12, request_timeout_s=60,
                        return_routed_experts=True)
    killed_busy = threading.Event()

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, load = http_json("GET", victim.url + "/get_load")
            if load and load[0]["num_reqs"] > 0:
                os.kill(victim.proc.pid, signal.SIGKILL)
                killed_busy.set()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with caplog.at_level("WARNING", logger="rollout_sglang.worker_pool"):
        groups = generate_groups(fleet.router_url, rows, cfg, rid_prefix="failover")
    killer.join()
    assert killed_busy.is_set(), "the server never had requests in flight"
    moved = [r for r in caplog.records if "sending it to another worker" in r.getMessage()]
    assert moved and all(victim.url in r.getMessage() for r in moved)
    assert [g.row.index for g in groups] == list(range(32))
    engine_samples = []
    for g in groups:
        assert len(g.responses) == 4
        engine_samples.append([Sample(rid=s.rid, prompt_ids=g.row.prompt_ids, output_ids=s.output_ids,
                                      output_logprobs=s.output_logprobs, finish_reason=s.finish_reason,
                                      weight_version=s.weight_version, prompt_tokens=len(g.row.prompt_ids),
                                      completion_tokens=len(s.output_ids)) for s in g.responses])
        for s in g.responses:
            assert s.routed_experts.shape == (len(g.row.prompt_ids) + len(s.output_ids) - 1, 4, 2)
    assert_parity(reference, engine_samples, temperature=1.0, version="3")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (victim.restarts > restarts and victim.state == "healthy"):
        time.sleep(0.2)
    assert victim.restarts > restarts and victim.state == "healthy", victim.events


def test_failed_distributed_update_restarts_half_updated_servers(fleet, reference, current_state):
    """An update that breaks midway (unknown tensor name after real ones) must not leave mixed weights."""
    bad = list(perturbed(current_state["state"], seed=31).items()) + [("model.bogus.weight", torch.zeros(4))]
    restarts = [s.restarts for s in fleet.servers]
    sync = DistributedWeightSync(fleet, build(WeightSyncConfig, {"transport": "distributed"}))
    try:
        with pytest.raises(WeightSyncError, match="bogus"):
            sync.push([bad], version="bad")
    finally:
        sync.close()
    assert [s.restarts for s in fleet.servers] == [r + 1 for r in restarts]
    assert all(s.state == "healthy" for s in fleet.servers)
    assert {http_json("GET", s.url + "/model_info")[1]["weight_version"] for s in fleet.servers} == {"3"}
    groups = run(rollout(fleet.router_url, prompts(6, seed=8), {"max_new_tokens": 4}, n=2))
    assert_parity(reference, groups, temperature=1.0, version="3")


def test_a_restarted_server_waits_for_the_next_distributed_push(fleet, reference, current_state):
    """No copy of the pushed weights is kept anywhere: a server restarted after a broadcast push waits
    outside the router (its launch weights are stale) until the next push includes it."""
    new_state = perturbed(current_state["state"], seed=41)
    sync = DistributedWeightSync(fleet, build(WeightSyncConfig, {"transport": "distributed"}))
    try:
        sync.push([list(new_state.items())], version="4")
        load_state_into(reference, new_state)
        current_state["state"] = new_state
        victim = fleet.servers[2]
        restarts = victim.restarts
        os.kill(victim.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (victim.restarts > restarts and victim.state == "awaiting_weights"):
            time.sleep(0.2)
        assert victim.state == "awaiting_weights" and victim.restarts == restarts + 1, victim.events
        assert fleet.awaiting_weights() == [victim]
        assert all(w["url"].rstrip("/") != victim.url for w in fleet.router.workers())
        assert sorted(fleet.weight_versions()) == ["4", "4"]  # the others; the waiting one is not asked
        # The next push re-forms the group over the new membership and brings the waiting server along.
        newer = perturbed(new_state, seed=42)
        sync.push([list(newer.items())], version="5")
        load_state_into(reference, newer)
        current_state["state"] = newer
        assert victim.state == "healthy" and not fleet.awaiting_weights()
        assert {http_json("GET", s.url + "/model_info")[1]["weight_version"] for s in fleet.servers} == {"5"}
        assert any(w["url"].rstrip("/") == victim.url for w in fleet.router.workers())
        direct = run(rollout(victim.url, prompts(4, seed=7), {"max_new_tokens": 4}, n=2))
        assert_parity(reference, direct, temperature=1.0, version="5")
    finally:
        sync.close()


def test_all_servers_killed_clear_error_within_timeout(fleet):
    fleet.stop_supervision()
    for server in fleet.servers:
        os.kill(server.proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="/generate: unavailable"):
        run(rollout(fleet.router_url, prompts(2, seed=6), {"max_new_tokens": 4}, n=2, total_timeout_s=3.0,
                    request_timeout_s=2.0))
    assert time.monotonic() - start < 6.0
