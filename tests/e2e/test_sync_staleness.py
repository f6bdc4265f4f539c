"""End to end on CPU: the synchronous loop at staleness N = 1, 4 and 16 under torchrun with EP=2.

Two Megatron-Core trainer ranks (gloo, expert parallel), a CPU rollout server behind the real
sglang-router over HTTP, disk weight sync after every rollout batch. Per N: mini-batch j of a rollout
batch trains at lag j, the run takes N optimizer steps per rollout step, the fleet gets version
N x (rollout steps so far) after each batch, and at lag 0 the trainer's log-probs equal the server's μ.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from tests.multiproc.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]
N_SAMPLES = 4


@pytest.mark.parametrize("staleness,rollout_steps", [(1, 2), (4, 2), (16, 1)])
def test_sync_staleness_n_under_torchrun_ep2(tmp_path, staleness, rollout_steps):
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"), "parallel.expert=2",
                              f"train.staleness={staleness}", "train.mini_batch_prompts=1",
                              f"rollout.n_samples={N_SAMPLES}", f"run.rollout_steps={rollout_steps}",
                              f"run.output_dir={tmp_path}", "run.stop_at_reward=null", "run.plot=false",
                              "eval.every_steps=0"],
                       nproc=2, timeout=150)
    assert out.count("megatron-vespo run summary") == 1
    total = staleness * rollout_steps
    assert f"({total} optimizer steps, fleet at weight version {total})" in out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train_step"] for r in records] == list(range(1, total + 1))
    assert [r["lag"] for r in records] == list(range(staleness)) * rollout_steps
    assert [r["step"] for r in records] == [k for k in range(rollout_steps) for _ in range(staleness)]
    for r in records:
        assert r["rollout_weight_version"] == str(r["step"] * staleness)  # pushed after every rollout batch
        assert r["rollout/stale_version_responses"] == 0
        assert r["rollout/num_prompts"] == staleness and r["train/samples"] > 0
        assert r["train/skipped_nonfinite_step"] == 0 and math.isfinite(r["vespo/W_mean"])
        if r["lag"] == 0:
            assert r["mismatch/logp_gap_max"] < 1e-4, r
        else:  # the policy moved since the batch was generated
            assert r["mismatch/logp_gap_mean"] > 1e-6, r
    assert (tmp_path / "weights" / f"v{total}" / "model.safetensors.index.json").is_file()
