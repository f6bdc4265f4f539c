"""End to end on CPU: dynamic sampling, overlong handling and the train/inference gate in real runs.

Three short quickstart runs (synthetic reverse task, a CPU rollout server behind the real sglang-router,
the Megatron-Core trainer), started together as ``megatron-vespo train`` subprocesses:

- **sync**: staleness 2 with dynamic sampling (4 samples per prompt from a random policy: about half of
  the groups score the same on every response), truncated responses masked (max 6 tokens), the gate
  on every lag-0 step. Every rollout batch still has its 2 mini-batches of 4 groups at lags 0 and 1, the
  fleet's versions advance as without filtering, and the metrics add up;
- **async**: the same in the fully asynchronous mode with the soft overlong penalty: lags within the
  bound, flat groups filtered, penalties as the lengths say;
- **gate**: a bf16 server against the fp32 trainer with a 1e-5 threshold stops at the first step with
  one line naming the causes, before any weights are pushed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]
COMMON = ["run.stop_at_reward=null", "run.plot=false", "eval.every_steps=0", "rollout.n_samples=4",
          "train.mini_batch_prompts=4", "train.staleness=2", "rollout.max_response_len=6"]
RUNS = {
    "sync": ("quickstart.yaml", ["run.rollout_steps=3", "rollout.dynamic_sampling.enabled=true",
                                 "rollout.dynamic_sampling.max_extra_rounds=3", "rollout.overlong.mask_truncated=true",
                                 "run.train_inference_gate.enabled=true", "run.train_inference_gate.every_step=true"]),
    "async": ("quickstart_async.yaml", ["run.rollout_steps=2", "asynchronous.buffer_groups=8",
                                        "rollout.dynamic_sampling.enabled=true", "rollout.overlong.buffer_len=2",
                                        "rollout.overlong.penalty_factor=0.5", "run.train_inference_gate.enabled=true"]),
    "gate": ("quickstart.yaml", ["run.rollout_steps=2", "rollout.cpu_server_dtype=bfloat16",
                                 "run.train_inference_gate.enabled=true",
                                 "run.train_inference_gate.max_logp_gap_mean=1e-5"]),
}
# Alone on a quiet machine each run takes 40-60 s (fleet start-up dominates); three at once beside two
# CPU-bound processes ~3 min: 600 s keeps 3x headroom.
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dapo")
    trees = {}
    try:
        for name, (config, extra) in RUNS.items():
            cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs" / config),
                   f"run.output_dir={out / name}", *COMMON, *extra]
            trees[name] = ProcessTree(cmd, out / f"{name}.log", cwd=REPO)
        codes = {name: tree.wait(TIMEOUT_S) for name, tree in trees.items()}
    finally:  # every process of every run, whatever happened
        for tree in trees.values():
            tree.kill()
    return {name: (codes[name], (out / f"{name}.log").read_text(errors="replace"), out / name) for name in RUNS}


def test_sync_dynamic_sampling_keeps_n_full_mini_batches_and_the_lag_accounting(runs):
    code, log, out = runs["sync"]
    assert code == 0, log[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["lag"] for r in records] == [0, 1] * 3
    assert [r["train_step"] for r in records] == list(range(1, 7))
    need = 8  # mini_batch_prompts x staleness groups per rollout batch
    for r in records:
        assert r["rollout_weight_version"] == str(r["step"] * 2)  # pushed after every rollout batch, as before
        assert r["rollout/stale_version_responses"] == 0  # every extra round ran on the batch's weights
        generated = r["dynsamp/generated_groups"]
        assert generated == r["rollout/num_prompts"] >= need
        assert r["dynsamp/generation_cost"] == pytest.approx(generated / need)
        assert r["dynsamp/filtered_fraction"] == pytest.approx(r["dynsamp/flat_groups"] / generated)
        # Trained: the groups with variance (as many as needed) plus any fill; the rest was generated extra.
        assert generated - r["dynsamp/flat_groups"] - r["dynsamp/surplus_groups"] + r["dynsamp/filled_groups"] == need
        varied = generated - r["dynsamp/flat_groups"]
        assert r["dynsamp/filled_groups"] == max(0, need - varied)  # fill only for what variance could not supply
        assert r["dynsamp/extra_rounds"] <= 3 and (r["dynsamp/filled_groups"] == 0 or r["dynsamp/extra_rounds"] == 3)
        assert r["dynsamp/extra_rounds"] == 0 or generated > need
        if not r["dynsamp/filled_groups"]:  # every trained group has variance, so some reward > 0 (scores >= 0)
            assert r["dynsamp/trained_reward_mean"] > 0.0
        assert 0 < r["train/samples"] <= 4 * 4  # one mini-batch: 4 groups x 4 samples (empty responses left out)
        assert r["overlong/masked_responses"] == r["rollout/finish_length"]  # every truncated response
        assert r["train/skipped_nonfinite_step"] == 0
        if r["lag"] == 0 and "mismatch/logp_gap_mean" in r:
            assert r["gate/checked"] == 1 and r["mismatch/logp_gap_max"] < 1e-4
        assert r["lag"] == 0 or "gate/checked" not in r
    assert sum(r["dynsamp/flat_groups"] for r in records) > 0, "a random policy gives some flat groups"
    assert any(r["dynsamp/extra_rounds"] > 0 for r in records)
    print("\nsync, per rollout batch: generated groups "
          f"{[r['dynsamp/generated_groups'] for r in records if r['lag'] == 0]}, filtered fraction "
          f"{[round(r['dynsamp/filtered_fraction'], 3) for r in records if r['lag'] == 0]}, extra rounds "
          f"{[r['dynsamp/extra_rounds'] for r in records if r['lag'] == 0]}, lag-0 gap "
          f"{[r.get('mismatch/logp_gap_mean') for r in records if r['lag'] == 0]}")


def test_async_dynamic_sampling_and_overlong_penalty(runs):
    code, log, out = runs["async"]
    assert code == 0, log[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 4 and [r["train_step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["async/lag_max"] <= 2  # asynchronous.max_staleness of the async quickstart
        assert r["rollout/num_prompts"] == 4  # every mini-batch full
        assert "dynsamp/filtered_fraction" in r and 0.0 <= r["dynsamp/filtered_fraction"] <= 1.0
        assert r["dynsamp/filled_groups"] <= r["dynsamp/flat_groups"] + 4
        # Max 6, buffer 2: lengths 5 and 6 are penalised (-0.25, -0.5); the mean is over the trained groups.
        assert -0.5 <= r["overlong/penalty_mean"] <= 0.0
        assert r["overlong/penalized_responses"] >= r["rollout/finish_length"]  # every truncated one is at 6
        assert r["train/skipped_nonfinite_step"] == 0
    assert records[0]["gate/checked"] == 1  # the first mini-batch: everything generated at version 0
    assert records[-1]["dynsamp/filtered_groups_total"] >= sum(r["dynsamp/flat_groups"] for r in records) - 1e-9
    print(f"\nasync: filtered fraction per mini-batch {[round(r['dynsamp/filtered_fraction'], 3) for r in records]}, "
          f"penalty mean {[round(r['overlong/penalty_mean'], 3) for r in records]}")


def test_gate_stops_a_mismatched_run_before_any_push(runs):
    code, log, out = runs["gate"]
    assert code == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log[-3000:]
    line = errors[0]
    assert "train/inference gate" in line and "first mini-batch at lag 0" in line and "> max_logp_gap_mean=1e-05" in line
    for cause in ("weights", "dtype", "config"):
        assert cause in line
    assert not list((out / "weights").glob("v[1-9]*")), "the failing step's weights must not reach the fleet"
    print(f"\n{line[:220]}")
