"""End to end on CPU: the quickstart run, shortened, through the real stack.

Megatron-Core trainer (gloo), a CPU rollout server behind the real sglang-router over HTTP, the
synthetic verifier, GRPO, VESPO updates and disk weight sync after every rollout batch. The run is a
subprocess (``megatron-vespo train``), as a user would start it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[2]
ROLLOUT_STEPS, STALENESS = 6, 2


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"),
           f"run.rollout_steps={ROLLOUT_STEPS}", f"run.output_dir={out}", "run.stop_at_reward=null",
           f"train.staleness={STALENESS}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_loop_runs_and_versions_advance(short_run):
    out, stdout = short_run
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == ROLLOUT_STEPS * STALENESS
    assert [r["train_step"] for r in records] == list(range(1, ROLLOUT_STEPS * STALENESS + 1))
    assert [r["lag"] for r in records] == [0, 1] * ROLLOUT_STEPS
    for r in records:
        # Rollout step k ran on the weights pushed after k * N optimizer steps, and every response says so.
        assert r["rollout_weight_version"] == str(r["step"] * STALENESS)
        assert r["rollout/stale_version_responses"] == 0
        assert r["rollout/num_responses"] == 16 * 16
        assert r["rollout/finish_stop"] + r["rollout/finish_length"] == 256 and r["rollout/finish_abort"] == 0
        assert r["reward/verifier_errors"] == 0 and r["train/skipped_nonfinite_step"] == 0
    assert f"fleet at weight version {ROLLOUT_STEPS * STALENESS}" in stdout
    assert (out / "weights" / f"v{ROLLOUT_STEPS * STALENESS}" / "model.safetensors.index.json").is_file()


def test_mu_from_the_fleet_matches_the_trainer_at_lag_zero(short_run):
    """At lag 0 the trainer's log-probs equal the server's μ: the initial HF dir and every weight
    push carried exactly the trainer's weights (any mapping or sync error shows up here)."""
    out, _ = short_run
    for r in read_metrics(out / "metrics.jsonl"):
        if r["lag"] == 0:
            assert r["mismatch/logp_gap_max"] < 1e-4, r
            assert abs(r["vespo/W_mean"] - 1) < 1e-3
        else:  # one update later the policy has moved
            assert r["mismatch/logp_gap_mean"] > 1e-4


def test_reward_does_not_collapse_and_outputs_exist(short_run):
    out, stdout = short_run
    rewards = [r["rollout/reward_mean"] for r in read_metrics(out / "metrics.jsonl") if r["lag"] == 0]
    assert rewards[0] > 0.02  # partial credit from a random policy (chance is 1/16 per position)
    assert sum(rewards[-2:]) / 2 >= 0.75 * rewards[0], rewards
    png = out / "metrics.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "megatron-vespo run summary" in stdout and "step 6/6" in stdout


def test_evaluation_runs_at_the_end(short_run):
    out, stdout = short_run
    records = read_metrics(out / "metrics.jsonl")
    evaluated = [r for r in records if "eval/reverse/accuracy" in r]
    assert [r["train_step"] for r in evaluated] == [ROLLOUT_STEPS * STALENESS]  # every 20 steps + the end
    r = evaluated[0]
    assert 0.0 <= r["eval/reverse/accuracy"] <= 1.0 and 0.0 <= r["eval/reverse/pass@k"] <= 1.0
    assert r["eval/reverse/num_prompts"] == 64 and r["eval/reverse/n_samples"] == 4
    assert r["eval/step"] == ROLLOUT_STEPS * STALENESS
    assert "[eval] step" in stdout


def test_torchrun_two_ranks_expert_parallel_with_recomputed_pi_old(tmp_path):
    """Two trainer ranks (EP=2): rank 0 drives the fleet and broadcasts the samples, both train, the
    experts of both ranks reach the server (lag-0 μ still equals the trainer's log-probs), and π_old
    recomputed by the trainer agrees with μ (TIS weights of 1)."""
    from tests.multiproc.torchrun import run_torchrun

    steps = 2
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"),
                              "parallel.expert=2", f"run.rollout_steps={steps}", f"run.output_dir={tmp_path}",
                              "run.stop_at_reward=null", "run.plot=false", "train.recompute_old_logprobs=true",
                              "correction.mode=token_tis"], nproc=2, timeout=150)
    assert out.count("megatron-vespo run summary") == 1  # rank 0 only
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train_step"] for r in records] == [1, 2, 3, 4]
    assert [r["rollout_weight_version"] for r in records] == ["0", "0", "2", "2"]
    for r in records:
        assert abs(r["correction/tis_weight_mean"] - 1) < 1e-4
        if r["lag"] == 0:
            assert r["mismatch/logp_gap_max"] < 1e-4
    assert not (tmp_path / "metrics.png").exists()
