"""End to end on CPU: the fully asynchronous mode through the real stack.

Megatron-Core trainer (gloo; two ranks with EP=2 under torchrun, or one process), a CPU rollout server
behind the real sglang-router over HTTP, continuous generation into the version-tagged buffer, disk
weight sync every K steps with partial rollouts. Checked from ``metrics.jsonl``: every trained
sample's lag is within the bound, partial rollouts were resumed, versions advanced, nothing is NaN.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vespo.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/quickstart_async.yaml")


def versions_along(logprobs: list[float], tracks: list[tuple[int, list[float]]], tol: float = 1e-4) -> list[int] | None:
    """Each token's version when the log-probs can be matched walking forward only through ``tracks``
    ((version, expected log-probs), in version order); None when they cannot."""
    i, versions = 0, []
    for t, lp in enumerate(logprobs):
        while abs(lp - tracks[i][1][t]) > tol:
            i += 1
            if i == len(tracks):
                return None
        versions.append(tracks[i][0])
    return versions


def check_common(records: list[dict], bound: int, push_every: int) -> None:
    assert [r["train_step"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        lags = r["async/sample_lags"]
        assert lags and len(lags) == r["rollout/num_responses"]
        assert max(lags) <= bound and min(lags) >= 0, r
        assert r["async/lag_max"] == max(lags) and r["lag"] == max(lags)
        assert sum(r[f"async/lag_count_{k}"] for k in set(lags)) == len(lags)
        # Lag = steps done before this one - the oldest version behind the sample's tokens.
        assert max(lags) == r["train_step"] - 1 - r["async/oldest_version"]
        for key in ("vespo/W_mean", "train/grad_norm", "rollout/reward_mean", "time/trainer_idle_s",
                    "time/fleet_idle_s"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["train/skipped_nonfinite_step"] == 0
        # The version the fleet had when the mini-batch was taken, and after the step's push.
        assert int(r["rollout_weight_version"]) == (r["train_step"] - 1) // push_every * push_every
        expected_after = r["train_step"] // push_every * push_every
        if r is records[-1]:  # the run ends with a push: the fleet holds the final weights
            expected_after = r["train_step"]
        assert r["weight_version_after"] == str(expected_after)


def test_torchrun_expert_parallel_partial_rollouts_within_the_bound(tmp_path):
    """Two trainer ranks (EP=2), drop mode, routed experts on (the routing flip rate in async mode). Generation never waits (a buffer far larger than the run
    needs), so every push (every 2 steps) finds requests in flight, aborts them and resumes them from
    their prefixes under the new weights; resumed groups are the oldest, so they are trained first.

    Generation must stay the bottleneck: if it outruns the trainer, a backlog of older groups builds
    up ahead of the resumed ones and those are dropped past the bound instead of trained (seen in CI
    with the batching server). The deterministic CPU server (one sequence per forward) generates ~6x
    slower than these steps train, so the buffer stays empty (measured: trainer idle 1.1-1.9 s per
    step, train 0.2-0.6 s). Drops past the bound are covered by the single-process test."""
    from tests.multiproc.torchrun import run_torchrun

    bound, push_every, steps = 5, 2, 8
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", CONFIG, "parallel.expert=2", f"run.output_dir={tmp_path}",
                              f"run.rollout_steps={steps // 2}", "run.stop_at_reward=null", "run.plot=false",
                              f"asynchronous.push_every_steps={push_every}", f"asynchronous.max_staleness={bound}",
                              "asynchronous.over_staleness=drop", "asynchronous.buffer_groups=100000", "train.mini_batch_prompts=4", "rollout.n_samples=8",
                              "rollout.max_response_len=56", "rollout.stop_token_ids=[]",
                              "train.micro_batch_tokens=512",  # fast steps: generation is the bottleneck
                              "rollout.max_concurrency=8", "rollout.cpu_server_deterministic=true",
                              "rollout.return_routed_experts=true"],
                       nproc=2, timeout=450)  # ~110 s on a quiet 2-core machine
    assert out.count("megatron-vespo run summary") == 1  # rank 0 only
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == steps
    check_common(records, bound, push_every)
    last = records[-1]
    assert last["async/partial_resumed_responses_total"] > 0, "no push found a request in flight"
    assert sum(r["async/partial_resumed_responses"] for r in records) > 0, \
        ("no resumed response was trained; buffer sizes per step (a backlog means generation outran the trainer): "
         f"{[r['async/buffer_groups'] for r in records]}")
    for r in records:
        # Resumed responses are complete: every response used its whole budget (no stop token).
        assert r["rollout/finish_length"] == r["rollout/num_responses"] and r["rollout/finish_abort"] == 0
        assert r["rollout/response_len_mean"] == 56
    assert records[-1]["weight_version_after"] == str(steps)
    check_drop_accounting(records)
    for r in records:  # routed experts came back with every response, resumed ones included
        assert r["mismatch/routing_compared_pairs"] > 0 and math.isfinite(r["mismatch/routing_flip_rate"])
    assert f"fleet at weight version {steps}" in out


def train(tmp_path: Path, rollout_steps: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", CONFIG, f"run.output_dir={tmp_path}",
           f"run.rollout_steps={rollout_steps}", "run.stop_at_reward=null", "run.plot=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_drop_accounting(records: list[dict]) -> None:
    total = 0.0
    for r in records:
        total += r["async/dropped_stale_groups"]
        assert r["async/dropped_stale_groups_total"] == total


def test_single_process_run_learns_drops_stale_groups_and_resumes(tmp_path):
    """The async quickstart as shipped (drop mode, bound 2, push every step): every trained lag stays
    within the bound, groups past it are dropped and counted, and the synthetic task's reward rises
    within a small step budget. Then the run continues from its last checkpoint (buffer, in-flight
    prompts and drop count included) for a few more steps."""
    steps, more, bound = 60, 4, 2
    args = ["optimizer.lr=1e-3", "checkpoint.save_every_steps=30"]
    train(tmp_path, steps // 2, *args)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == steps
    check_common(records, bound, push_every=1)
    check_drop_accounting(records)
    rewards = [r["rollout/reward_mean"] for r in records]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.05, (first, last)

    stdout = train(tmp_path, (steps + more) // 2, *args)
    assert f"rollout step {steps}, {steps} optimizer steps, weight version {steps}" in stdout
    assert "[async] resumed" in stdout
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert resumed[:steps] == records  # the earlier lines are kept
    assert len(resumed) == steps + more
    check_common(resumed, bound, push_every=1)
    check_drop_accounting(resumed)


@pytest.mark.parametrize("partial_rollouts", [True, False])
def test_generator_keeps_every_token_logprob_of_the_weights_that_made_it(tmp_path, partial_rollouts):
    """The background generator against a real CPU server and router, with disk weight pushes while
    requests are in flight. With partial rollouts each push aborts them and they continue from their
    prefix under the new weights: every token's log-prob is then the teacher-forced one of a version
    between the response's oldest and newest, in order (the pieces were concatenated correctly).
    Without, requests are held in place across the update and continue on their old KV cache (as in
    SGLang), so only the first token can be checked exactly.

    With partial rollouts the generator also asks for routed experts (requests then go to the server
    directly): each token's row must be the routing of the version that produced its log-prob, so a
    resumed response keeps the prefix rows of the weights that sampled the prefix."""
    from megatron_vespo.config.schema import RolloutConfig
    from megatron_vespo.data.dataset import PromptDataset, PromptRow, PromptSampler
    from megatron_vespo.driver.generator import BackgroundGenerator
    from megatron_vespo.driver.rollout_buffer import RolloutBuffer
    from rollout_sglang.config import FleetConfig, ServerConfig, WeightSyncConfig
    from rollout_sglang.fleet import Fleet
    from rollout_sglang.weight_sync import DiskWeightSync
    from tests.rollout.helpers import flipped_logprobs, hf_state, load_hf, load_state_into, perturbed, save_tiny_moe, \
        teacher_forced_logprobs, teacher_forced_routing

    model_dir = save_tiny_moe(tmp_path / "model")
    base = hf_state(model_dir)
    states = {0: base, **{v: perturbed(base, seed=v) for v in (1, 2, 3)}}
    rng = torch.Generator().manual_seed(0)
    rows = [PromptRow(i, torch.randint(0, 128, (4,), generator=rng).tolist(), None) for i in range(64)]
    cfg = RolloutConfig(n_samples=2, max_response_len=32, max_concurrency=4, request_timeout_s=60,
                        return_routed_experts=partial_rollouts)
    buffer = RolloutBuffer(1, max_staleness=100, over_staleness="drop", capacity=1000)
    fleet = Fleet(FleetConfig(servers=[ServerConfig(kind="cpu", model_path=str(model_dir),
                                                    extra_args=["--weight-version", "0"])],
                              log_dir=str(tmp_path / "logs"))).start()
    try:
        sync = DiskWeightSync(fleet, WeightSyncConfig(transport="disk", disk_dir=str(tmp_path / "w")),
                              config_dir=str(model_dir))
        gen = BackgroundGenerator(fleet.router_url, PromptSampler(PromptDataset(rows, "test"), seed=0), cfg, buffer,
                                  lambda group: ([0.0] * len(group.responses), {}), partial_rollouts=partial_rollouts,
                                  abort_all=fleet.abort_all,
                                  version=0, rid_prefix="t").start()
        for version in (1, 2, 3):
            deadline = time.monotonic() + 30
            while gen.counters()["async/requests_in_flight"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # let the requests in flight produce a few tokens
            gen.hold_for_push(timeout_s=30)
            sync.push([list(states[version].items())], str(version))
            gen.release_after_push(version)
        while len(buffer.finished_groups()) < 12 and gen.error is None:
            time.sleep(0.05)
        counters = gen.counters()
        gen.stop()
        assert gen.error is None, gen.error
    finally:
        fleet.stop()

    groups = buffer.finished_groups()
    models = {}
    for v, state in states.items():
        models[v] = load_hf(model_dir)
        load_state_into(models[v], state)
    mixed = routed_checked = flips = 0
    for g in groups:
        prompt_ids = g.payload.group.row.prompt_ids
        for sample, oldest in zip(g.payload.group.responses, g.response_oldest_versions):
            newest = int(sample.weight_version)
            assert oldest <= newest and sample.finish_reason.type == "length"
            assert len(sample.output_ids) == len(sample.output_logprobs) == cfg.max_response_len
            expected = {v: teacher_forced_logprobs(models[v], prompt_ids, sample.output_ids)
                        for v in range(oldest, newest + 1)}
            mixed += newest > oldest
            if not partial_rollouts:  # a request still queued at the pause is prefilled with the new weights
                assert any(abs(sample.output_logprobs[0] - expected[v][0]) < 1e-4 for v in expected)
                continue
            token_versions = versions_along(sample.output_logprobs, [(v, expected[v]) for v in expected])
            if token_versions is None:  # maybe an MoE router near-tie that the server's batch resolved the other way
                tracks = []
                for v in expected:
                    tracks.append((v, expected[v]))
                    tracks += [(v, f) for _, _, f in flipped_logprobs(models[v], prompt_ids, sample.output_ids)]
                token_versions = versions_along(sample.output_logprobs, tracks)
                flips += token_versions is not None
            assert token_versions is not None, f"{sample.rid}: log-probs match no sequence of versions in " \
                                               f"[{oldest}, {newest}] (moving forward only)"
            assert token_versions[-1] == newest, f"{sample.rid}: tagged up to version {newest}, tokens only up to " \
                                                 f"{token_versions[-1]}"
            p = len(prompt_ids)
            assert sample.routed_experts.shape == (p - 1 + cfg.max_response_len, 4, 2)
            routing = {v: teacher_forced_routing(models[v], prompt_ids, sample.output_ids)
                       for v in set(token_versions)}
            rows = np.sort(sample.routed_experts[p - 1:], -1)
            want = np.stack([routing[v][p - 1 + t] for t, v in enumerate(token_versions)])
            assert (rows == want).mean() > 0.98, (sample.rid, token_versions)
            routed_checked += newest > oldest
    assert mixed > 0, "no response spans a weight push"
    assert flips <= 1, f"{flips} responses needed a routing flip to match"
    assert routed_checked > 0 or not partial_rollouts
    if partial_rollouts:
        assert counters["async/partial_resumed_responses_total"] > 0
        assert sum(g.payload.resumed_responses for g in groups) > 0
    else:
        assert counters["async/partial_resumed_responses_total"] == 0
