"""Wall time of the fully asynchronous mode versus the synchronous loop (N=1) for the same samples, on CPU.

Both runs train the same tiny Qwen3-MoE (the quickstart model) through the real stack (Megatron-Core
trainer, one CPU rollout server behind sglang-router, disk weight sync after every optimizer step)
on the same number of mini-batches. The responses are long enough (no stop token) that generating a
mini-batch takes about as long as training on it: the synchronous loop alternates the two, the
asynchronous mode overlaps them (the server generates the next groups while the trainer trains).

Printed: the sync run's mean generate and train time per step (the balance), both runs' wall times
(whole process, and the steady-state loop after ``--warmup`` steps, which leaves out start-up), the
async run's lag, drops and idle times, and the ratio sync / async (> 1: async is faster), for
``--repeats`` pairs run alternately (this machine is shared: one pair can be off by 20%), and the
median ratio. The quickstart's evaluation is switched off (it would add the same seconds to both).

    python benchmarks/bench_async_vs_sync.py [--steps 32] [--repeats 3] [--concurrency 4] [--max-staleness 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
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
    parser.add_argument("--concurrency", type=int, default=4,
                        help="prompts in flight on the server: 4 makes generating a mini-batch take about as long as "
                             "training on it here (2 cores)")
    parser.add_argument("--repeats", type=int, default=3, help="sync/async pairs, alternating which runs first")
    parser.add_argument("--micro-batch-tokens", type=int, default=512,
                        help="packed micro-batch size (attention over a packed micro-batch is quadratic on CPU)")
    parser.add_argument("--max-staleness", type=int, default=2)
    parser.add_argument("--over-staleness", choices=["drop", "throttle"], default="throttle")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        raise SystemExit("--warmup must be in [1, --steps)")

    common = [f"run.rollout_steps={args.steps}", "train.staleness=1", f"train.mini_batch_prompts={args.prompts}",
              f"rollout.n_samples={args.samples}", f"rollout.max_response_len={args.response_len}",
              "rollout.stop_token_ids=[]", f"rollout.max_concurrency={args.concurrency}",
              f"train.micro_batch_tokens={args.micro_batch_tokens}", "run.stop_at_reward=null", "run.plot=false",
              "eval.every_steps=0"]  # the quickstart's evaluation would add the same seconds to both runs
    async_args = ["train.mode=async", "asynchronous.push_every_steps=1", f"asynchronous.max_staleness={args.max_staleness}",
                  f"asynchronous.over_staleness={args.over_staleness}", "asynchronous.partial_rollouts=true"]
    pairs = []  # (sync wall, sync records, async wall, async records) per repeat
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        for k in range(args.repeats):
            # Alternating which mode goes first: a slow spell on a shared machine does not favour one mode.
            order = ["sync", "async"] if k % 2 == 0 else ["async", "sync"]
            got = {}
            for mode in order:
                got[mode] = run(["train.mode=sync"] if mode == "sync" else async_args, common, Path(tmp) / f"{mode}{k}")
                print(f"[bench] repeat {k + 1}/{args.repeats}: {mode} done in {got[mode][0]:.1f}s", flush=True)
            pairs.append((*got["sync"], *got["async"]))

    sync, asyn = pairs[0][1], pairs[0][3]
    for _, s_rec, _, a_rec in pairs:
        assert len(s_rec) == len(a_rec) == args.steps
        assert sum(r["train/samples"] for r in s_rec) == sum(r["train/samples"] for r in a_rec) \
            == args.steps * args.prompts * args.samples
    samples = args.steps * args.prompts * args.samples
    lags = [lag for r in asyn for lag in r["async/sample_lags"]]

    print(f"same work: {args.steps} optimizer steps x {args.prompts} prompts x {args.samples} responses "
          f"x {args.response_len} tokens = {samples} samples; one CPU rollout server ({args.concurrency} prompts in "
          "flight), push every step")
    print(f"sync  (N=1): generate {mean([r['time/generate_s'] for r in sync]):.2f} s + train "
          f"{mean([r['time/train_s'] for r in sync]):.2f} s + push {mean([r['time/weight_sync_s'] for r in sync]):.2f} s "
          "per step (one after the other; repeat 1)")
    print(f"async      : max_staleness {args.max_staleness} ({args.over_staleness}), lag mean {mean(lags):.2f} "
          f"max {max(lags)}, dropped groups {asyn[-1]['async/dropped_stale_groups_total']:.0f}, resumed partial "
          f"responses {asyn[-1]['async/partial_resumed_responses_total']:.0f}, train "
          f"{mean([r['time/train_s'] for r in asyn]):.2f} s + push {mean([r['time/weight_sync_s'] for r in asyn]):.2f} s "
          f"per step, trainer idle "
          f"{sum(r['time/trainer_idle_s'] for r in asyn):.1f} s, fleet idle {sum(r['time/fleet_idle_s'] for r in asyn):.1f} s"
          " (repeat 1)")
    print()
    print(f"{'':34}{'sync N=1':>10}{'async':>10}{'sync/async':>12}")
    steady, whole = [], []
    for k, (s_wall, s_rec, a_wall, a_rec) in enumerate(pairs):
        s_steady, a_steady = steady_seconds(s_rec, args.warmup), steady_seconds(a_rec, args.warmup)
        steady.append(s_steady / a_steady)
        whole.append(s_wall / a_wall)
        print(f"{f'repeat {k + 1}: steady loop after warm-up':34}{s_steady:>9.1f}s{a_steady:>9.1f}s{steady[-1]:>12.2f}")
        print(f"{f'repeat {k + 1}: whole process':34}{s_wall:>9.1f}s{a_wall:>9.1f}s{whole[-1]:>12.2f}")
    print(f"median sync/async: steady loop {statistics.median(steady):.2f}, whole process {statistics.median(whole):.2f} "
          f"(start-up, the same in both modes, is in the whole-process figure)")

if __name__ == "__main__":
    main()
