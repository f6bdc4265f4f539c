"""Wall time of the fully asynchronous mode versus the synchronous loop (N=1) for the same samples, on CPU.

Both runs train the same tiny Qwen3-MoE (the quickstart model) through the real stack (Megatron-Core
trainer, one CPU rollout server behind sglang-router, disk weight sync after every optimizer step)
on the same number of mini-batches. The responses are long enough (no stop token) that generating a
mini-batch takes about as long as training on it: the synchronous loop alternates the two, the
asynchronous mode overlaps them (the server generates the next groups while the trainer trains).

Printed: the sync run's mean generate and train time per step (the balance), both runs' wall times
(whole process, and the steady-state loop after ``--warmup`` steps, which leaves out start-up), the
async run's lag, drops and idle times, and the ratio sync / async (> 1: async is faster).

    python benchmarks/bench_async_vs_sync.py [--steps 32] [--max-staleness 2] [--over-staleness throttle]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vespo.logging_utils import read_metrics  # noqa: E402


def run(mode_args: list[str], common: list[str], out: Path) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"),
           f"run.output_dir={out}", *common, *mode_args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, read_metrics(out / "metrics.jsonl")


def steady_seconds(records: list[dict], warmup: int) -> float:
    """Wall time from the end of step ``warmup`` to the end of the last step."""
    return records[-1]["time/elapsed_s"] - records[warmup - 1]["time/elapsed_s"]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="mini-batches (optimizer steps) per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state time")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per mini-batch")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--response-len", type=int, default=56, help="tokens per response (no stop token)")
    parser.add_argument("--micro-batch-tokens", type=int, default=512,
                        help="packed micro-batch size (attention over a packed micro-batch is quadratic on CPU)")
    parser.add_argument("--max-staleness", type=int, default=2)
    parser.add_argument("--over-staleness", choices=["drop", "throttle"], default="throttle")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        raise SystemExit("--warmup must be in [1, --steps)")

    common = [f"run.rollout_steps={args.steps}", "train.staleness=1", f"train.mini_batch_prompts={args.prompts}",
              f"rollout.n_samples={args.samples}", f"rollout.max_response_len={args.response_len}",
              "rollout.stop_token_ids=[]", f"rollout.max_concurrency={args.prompts}",
              f"train.micro_batch_tokens={args.micro_batch_tokens}", "run.stop_at_reward=null", "run.plot=false"]
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        sync_wall, sync = run(["train.mode=sync"], common, Path(tmp) / "sync")
        async_wall, asyn = run(["train.mode=async", "asynchronous.push_every_steps=1",
                                f"asynchronous.max_staleness={args.max_staleness}",
                                f"asynchronous.over_staleness={args.over_staleness}",
                                "asynchronous.partial_rollouts=true"], common, Path(tmp) / "async")
    assert len(sync) == len(asyn) == args.steps
    samples = sum(r["train/samples"] for r in sync)
    assert samples == sum(r["train/samples"] for r in asyn) == args.steps * args.prompts * args.samples
    sync_steady, async_steady = steady_seconds(sync, args.warmup), steady_seconds(asyn, args.warmup)
    lags = [lag for r in asyn for lag in r["async/sample_lags"]]

    print(f"same work: {args.steps} optimizer steps x {args.prompts} prompts x {args.samples} responses "
          f"x {args.response_len} tokens = {samples:.0f} samples; one CPU rollout server, push every step")
    print(f"sync  (N=1): generate {mean([r['time/generate_s'] for r in sync]):.2f} s + train "
          f"{mean([r['time/train_s'] for r in sync]):.2f} s + push {mean([r['time/weight_sync_s'] for r in sync]):.2f} s "
          "per step (one after the other)")
    print(f"async      : max_staleness {args.max_staleness} ({args.over_staleness}), lag mean {mean(lags):.2f} "
          f"max {max(lags)}, dropped groups {asyn[-1]['async/dropped_stale_groups_total']:.0f}, resumed partial "
          f"responses {asyn[-1]['async/partial_resumed_responses_total']:.0f}, train "
          f"{mean([r['time/train_s'] for r in asyn]):.2f} s + push {mean([r['time/weight_sync_s'] for r in asyn]):.2f} s "
          f"per step, trainer idle "
          f"{sum(r['time/trainer_idle_s'] for r in asyn):.1f} s, fleet idle {sum(r['time/fleet_idle_s'] for r in asyn):.1f} s")
    print()
    print(f"{'':28}{'sync N=1':>10}{'async':>10}{'sync/async':>12}")
    print(f"{'steady loop after warm-up':28}{sync_steady:>9.1f}s{async_steady:>9.1f}s{sync_steady / async_steady:>12.2f}")
    print(f"{'whole process':28}{sync_wall:>9.1f}s{async_wall:>9.1f}s{sync_wall / async_wall:>12.2f}")


if __name__ == "__main__":
    main()
