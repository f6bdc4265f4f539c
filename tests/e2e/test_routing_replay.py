"""Routing replay end to end under torchrun with EP=2: the ``megatron-vespo train`` CLI, a bf16 CPU
rollout server (so the engine's routing is not the trainer's), the synchronous loop at staleness 2.

- r3: the engine's experts (response and prompt rows) are replayed; the step's flip rate (the
  trainer's top-k sets against the engine's) is exactly 0 at every lag, over every response token.
- r2: π_old is recomputed per mini-batch, recording the routing that the mini-batch's update replays.

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
