"""Routing replay end to end under torchrun with EP=2: the ``megatron-vespo train`` CLI, a bf16 CPU
rollout server (so the engine's routing is not the trainer's), the synchronous loop at staleness 2.

- r3: the engine's experts (response and prompt rows) are replayed; the step's flip rate (the
  trainer's top-k sets against the engine's) is exactly 0 at every lag, over every response token.
- r2: π_old is recomputed per mini-batch, recording the routing that the mini-batch's update replays.
- r3 in the asynchronous mode with partial rollouts: resumed responses replay each segment's rows.

The exactness of r3 and r2 in every layout is tested in tests/multiproc/test_routing_flip_layouts.py;
this test shows the modes wired through the driver, the rollout path and the CLI.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from tests.multiproc.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]
COMMON = ["parallel.expert=2", "train.staleness=2", "train.mini_batch_prompts=2", "rollout.n_samples=4",
          "run.rollout_steps=1", "run.stop_at_reward=null", "run.plot=false", "eval.every_steps=0",
          "rollout.cpu_server_dtype=bfloat16"]


@pytest.mark.parametrize("mode, extra", [
    ("r3", ["rollout.return_routed_experts=true"]),
    ("r2", ["train.recompute_old_logprobs=true"]),
], ids=["r3", "r2"])
def test_replay_mode_runs_under_torchrun_ep2(tmp_path, mode, extra):
    # 60-95 s measured beside other test runs (load ~4 on 2 cores); 300 s leaves 3x headroom.
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"), *COMMON,
                              f"train.routing_replay={mode}", f"run.output_dir={tmp_path}", *extra],
                       nproc=2, timeout=300)
    assert out.count("megatron-vespo run summary") == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lag"] for r in records] == [0, 1]
    for r in records:
        assert r["train/skipped_nonfinite_step"] == 0 and math.isfinite(r["train/grad_norm"])
        if mode == "r3":
            assert r["mismatch/routing_compared_pairs"] > 0
            assert r["mismatch/routing_flipped_pairs"] == 0 and r["mismatch/routing_flip_rate"] == 0.0
        else:
            assert r["time/recompute_s"] > 0 and "mismatch/routing_flip_rate" not in r


def test_r3_async_partial_rollouts_replay_each_segments_rows(tmp_path):
    """The asynchronous mode with partial rollouts under torchrun EP=2 (the setting of
    test_async.py's EP=2 test, whose deterministic server keeps generation the bottleneck so every push
    aborts requests in flight): resumed responses are trained, each token replaying the row of the
    segment (and weights) that sampled it, and the flip rate is exactly 0 at every step."""
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", str(REPO / "configs/quickstart_async.yaml"),
                              "parallel.expert=2", f"run.output_dir={tmp_path}", "run.rollout_steps=2",
                              "run.stop_at_reward=null", "run.plot=false", "asynchronous.push_every_steps=2",
                              "asynchronous.max_staleness=5", "asynchronous.over_staleness=drop",
                              "asynchronous.buffer_groups=100000", "train.mini_batch_prompts=4", "rollout.n_samples=8",
                              "rollout.max_response_len=24", "rollout.stop_token_ids=[]", "train.micro_batch_tokens=512",
                              "rollout.max_concurrency=8", "rollout.cpu_server_deterministic=true",
                              "rollout.cpu_server_dtype=bfloat16", "rollout.return_routed_experts=true",
                              "train.routing_replay=r3"],
                       nproc=2, timeout=360)  # 92 s measured at load 5-6 on 2 cores (the bf16 server is slow)
    assert out.count("megatron-vespo run summary") == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records and records[-1]["async/partial_resumed_responses_total"] > 0, "no push found a request in flight"
    assert sum(r["async/partial_resumed_responses"] for r in records) > 0, "no resumed response was trained"
    for r in records:
        assert r["mismatch/routing_compared_pairs"] > 0
        assert r["mismatch/routing_flipped_pairs"] == 0 and r["mismatch/routing_flip_rate"] == 0.0
        assert r["train/skipped_nonfinite_step"] == 0 and math.isfinite(r["train/grad_norm"])
