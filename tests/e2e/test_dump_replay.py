"""Rollout dump and replay end to end, scored by the remote verifier.

1. A short run of the quickstart task (synchronous, and fully asynchronous) through the CLI (CPU server
   behind the real router, routed experts returned) with ``rollout.dump_dir`` and ``reward.verifier: http`` against the
   reference verifier server (``python -m megatron_vespo.rewards.server``, started here, dying with
   this process): every response is scored over HTTP, without a single verifier error.
   The synchronous run saves one file per rollout batch (its N mini-batches), the asynchronous one a
   file per mini-batch.
2. The same config with ``rollout.replay_dir`` pointing at the dump, in another output directory: no
   fleet, router or verifier starts, and every optimizer step sees exactly the original step's samples,
   so every loss, W/φ, gradient-norm and mismatch metric (routing flips included) is identical; and
   (synchronous dump) the same under torchrun with two data-parallel ranks, up to the reduction order.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from rollout_sglang.net import http_json
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]
ROLLOUT_STEPS, STALENESS, PROMPTS, SAMPLES = 2, 2, 2, 4
# Measured at load average 7-12 on 2 cores: original run 83 s (sync) / 120 s (async), replay 58-68 s.
RUN_TIMEOUT_S = 420


def _overrides(out: Path, mode: str, rollout_steps: int = ROLLOUT_STEPS) -> list[str]:
    return [f"run.output_dir={out}", f"train.mode={mode}", f"run.rollout_steps={rollout_steps}",
            "run.stop_at_reward=null", "run.plot=false", f"train.staleness={STALENESS}",
            f"train.mini_batch_prompts={PROMPTS}", f"rollout.n_samples={SAMPLES}", "rollout.return_routed_experts=true",
            "eval.every_steps=0"]


def _train(args: list[str], log: Path) -> str:
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"), *args]
    with ProcessTree(cmd, log, cwd=REPO, env={"PYTHONPATH": str(REPO)}) as run:
        code = run.wait(timeout_s=RUN_TIMEOUT_S)
    text = log.read_text()
    assert code == 0, text[-4000:]
    return text


def _compared(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k.split("/")[0] in ("loss", "vespo", "mismatch", "adv", "rollout") or k in ("train/grad_norm", "lag",
                                                                                           "train_step", "train/samples")}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_replay_trains_on_the_dumped_batches_with_identical_losses(tmp_path, mode):
    server = subprocess.Popen([sys.executable, "-m", "megatron_vespo.rewards.server", "--verifier", "synthetic",
                               "--port", "0", "--parent-pid", str(os.getpid())],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base = server.stdout.readline().split()[2]
        dump = tmp_path / "dump"
        t0 = time.monotonic()
        original_log = _train(_overrides(tmp_path / "original", mode) + [
            f"rollout.dump_dir={dump}", "reward.verifier=http", f"reward.http.url={base}/score"],
            tmp_path / "original.log")
        original_s = time.monotonic() - t0
        status, counts = http_json("GET", f"{base}/stats")
    finally:
        server.kill()
        server.wait()
    responses = ROLLOUT_STEPS * STALENESS * PROMPTS * SAMPLES
    assert status == 200 and set(counts) == {"scored"}, counts
    # Asynchronous generation runs ahead of training: it scores more than it trains.
    assert counts["scored"] == responses if mode == "sync" else counts["scored"] >= responses, counts
    original = read_metrics(tmp_path / "original" / "metrics.jsonl")
    assert len(original) == ROLLOUT_STEPS * STALENESS
    assert all(r["reward/verifier_errors"] == 0 and r["dump/bytes"] > 0 for r in original)
    # The verifier's counters are logged (asynchronous generation goes on scoring after the last step's record).
    logged = original[-1]["reward/remote_requests_total"]
    assert logged == counts["scored"] if mode == "sync" else 0 < logged <= counts["scored"]
    assert original[-1]["reward/remote_failed_total"] == 0
    print(f"{mode}: {logged:.0f} verifier requests, {original[-1]['reward/remote_retries_total']:.0f} retried")
    assert "[fleet]" in original_log
    files = sorted(p.name for p in dump.iterdir())
    saved = ROLLOUT_STEPS * (STALENESS if mode == "async" else 1)  # async: a file per mini-batch
    assert files == [f"batch_{s:06d}.safetensors" for s in range(saved)]

    t0 = time.monotonic()
    # A replay step is one saved file: as many rollout steps as files.
    replay_log = _train(_overrides(tmp_path / "replay", mode, rollout_steps=saved) + [f"rollout.replay_dir={dump}"],
                        tmp_path / "replay.log")
    replay_s = time.monotonic() - t0
    print(f"{mode}: original run {original_s:.1f} s, replay {replay_s:.1f} s")
    assert f"[replay] {saved} saved batch(es)" in replay_log and "[fleet]" not in replay_log
    assert not (tmp_path / "replay" / "fleet_logs").exists() and not (tmp_path / "replay" / "initial_hf").exists()
    replay = read_metrics(tmp_path / "replay" / "metrics.jsonl")
    assert [r["replay/batch"] for r in replay] == [float(r["step"]) for r in original]
    if mode == "async":  # the buffer's bookkeeping was logged with the batch and comes back with it
        assert [r["async/lag_max"] for r in replay] == [r["async/lag_max"] for r in original]
    assert [_compared(r) for r in replay] == [_compared(r) for r in original]
    # The comparison covered the losses and the routing diagnostics, not just bookkeeping.
    covered = set(_compared(original[0]))
    assert {"loss/policy_loss", "vespo/W_mean", "train/grad_norm", "mismatch/routing_flip_rate"} <= covered
    assert len({r["loss/policy_loss"] for r in original}) > 1  # the steps differ from each other
    if mode == "sync":
        _replay_under_torchrun(dump, tmp_path / "replay_dp2", saved, original)


def _replay_under_torchrun(dump: Path, out: Path, saved: int, original: list[dict]) -> None:
    """Two data-parallel ranks: rank 0 reads each file and broadcasts its mini-batches; the losses equal the
    single-process run's up to the order of the gradient reduction."""
    from tests.multiproc.torchrun import run_torchrun

    log = run_torchrun("-m", ["megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"),
                              *_overrides(out, "sync", rollout_steps=saved), f"rollout.replay_dir={dump}"],
                       nproc=2, timeout=RUN_TIMEOUT_S)
    assert "[fleet]" not in log and log.count("megatron-vespo run summary") == 1
    replay = read_metrics(out / "metrics.jsonl")
    assert [r["train_step"] for r in replay] == [r["train_step"] for r in original]
    for got, want in zip(replay, original):
        for key in ("loss/policy_loss", "train/grad_norm", "vespo/W_mean", "mismatch/routing_flip_rate"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (key, got["train_step"])
