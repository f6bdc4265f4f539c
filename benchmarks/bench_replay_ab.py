"""A/B study: what the replay-free path buys. VESPO, PPO-clip (GRPO) and GSPO with and without R3.

Setting (CPU, the mismatch setting of ``bench_mismatch_w_tail.py``): the quickstart MoE on the
6-digit reverse task, the rollout server in bf16 and the trainer in fp32, routed experts returned,
one prompt per mini-batch and ``--staleness`` mini-batches per rollout batch (mini-batch j trains at
lag j: real off-policy pressure), lr 3e-3. Arms, each for every seed in ``--seeds`` (same seeds,
hence the same prompts and sampling seeds, across arms):

- ``vespo``, ``vespo+r3``: VESPO without / with routing replay R3 (``train.routing_replay: r3``);
- ``ppo_clip``, ``ppo_clip+r3``: PPO-clip with dual clip (the GRPO objective) without / with R3;
- ``gspo``: GSPO without replay.

Per arm (over its seeds): final reward (the last rollout batch's mean, averaged over seeds), best
reward, optimizer steps until a batch first reaches ``--threshold`` (runs that never do are counted
apart), collapsed runs (a non-finite or skipped step, or a final reward below half of the run's
best), the W tail (largest exp(sequence log-ratio) π_θ/μ over every step), the routing flip rate
and the lag-0 log-prob gap (mean over steps), and wall time per run. Writes ``table.md``,
``results.json`` and ``reward.png`` (mean reward per arm against the optimizer step) under ``--out``.

    python benchmarks/bench_replay_ab.py [--seeds 1 2 3] [--staleness 16] [--rollout-steps 6] [--jobs 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_mismatch_w_tail import mismatch_overrides, start_run  # noqa: E402

from megatron_vespo.logging_utils import read_metrics  # noqa: E402

ARMS: dict[str, list[str]] = {
    "vespo": [],
    "vespo+r3": ["train.routing_replay=r3"],
    "ppo_clip": ["loss.name=ppo_clip"],
    "ppo_clip+r3": ["loss.name=ppo_clip", "train.routing_replay=r3"],
    "gspo": ["loss.name=gspo"],  # its aggregation defaults to seq-mean-token-mean
}


def run_all(out: Path, arms: Sequence[str], seeds: Sequence[int], staleness: int, rollout_steps: int, jobs: int,
            timeout_s: float) -> dict[tuple[str, int], dict]:
    """Every (arm, seed) run, ``jobs`` at a time; their metrics records and wall times."""
    pending = [(arm, seed) for seed in seeds for arm in arms]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    results: dict[tuple[str, int], dict] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                arm, seed = pending.pop(0)
                name = f"{arm}-s{seed}"
                overrides = mismatch_overrides(out / name, staleness, rollout_steps) + [f"train.seed={seed}", *ARMS[arm]]
                running[(arm, seed)] = (start_run(overrides, out / f"{name}.log"), time.monotonic())
            time.sleep(1.0)
            for key, (proc, t0) in list(running.items()):
                code = proc.poll()
                name = f"{key[0]}-s{key[1]}"
                if code is None and time.monotonic() - t0 > timeout_s:
                    proc.kill()
                    code = proc.wait()
                if code is None:
                    continue
                del running[key]
                if code != 0:
                    raise RuntimeError(f"{name} failed ({code}):\n{(out / f'{name}.log').read_text()[-3000:]}")
                results[key] = {"records": read_metrics(out / name / "metrics.jsonl"), "wall_s": time.monotonic() - t0}
                print(f"[ab] {name}: done in {results[key]['wall_s']:.0f} s", flush=True)
    finally:  # never leave a run behind (each run's fleet dies with it)
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_summary(records: Sequence[dict], wall_s: float, threshold: float) -> dict:
    batches = [r for r in records if r["lag"] == 0]  # one record per rollout batch carries its reward
    rewards = [r["rollout/reward_mean"] for r in batches]
    reached = next((r["train_step"] for r in batches if r["rollout/reward_mean"] >= threshold), None)
    bad = any(r["train/skipped_nonfinite_step"] or not math.isfinite(r["train/grad_norm"]) for r in records)
    flips = [r["mismatch/routing_flip_rate"] for r in records if "mismatch/routing_flip_rate" in r]
    return {
        "final": rewards[-1], "best": max(rewards), "steps_to_threshold": reached,
        "collapsed": bad or rewards[-1] < 0.5 * max(rewards),
        "w_max": math.exp(max(r["mismatch/seq_log_ratio_max"] for r in records)),
        "flip_rate": statistics.mean(flips) if flips else float("nan"),
        "lag0_logp_gap": statistics.mean(r["mismatch/logp_gap_mean"] for r in batches),
        "wall_s": wall_s, "rewards": [(r["train_step"], r["rollout/reward_mean"]) for r in batches],
    }


def arm_row(runs: Sequence[dict]) -> dict:
    reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
    return {
        "final": statistics.mean(r["final"] for r in runs), "best": max(r["best"] for r in runs),
        "steps_to_threshold": statistics.median(reached) if reached else None, "reached": len(reached),
        "collapsed": sum(r["collapsed"] for r in runs), "runs": len(runs),
        "w_max": max(r["w_max"] for r in runs), "flip_rate": statistics.mean(r["flip_rate"] for r in runs),
        "lag0_logp_gap": statistics.mean(r["lag0_logp_gap"] for r in runs),
        "wall_s": statistics.mean(r["wall_s"] for r in runs),
    }


def table(rows: dict[str, dict], threshold: float) -> str:
    head = ("| arm | final reward | best reward | steps to reward >= {t} (runs reaching it) | collapsed runs | "
            "W tail (max π/μ) | flip rate | lag-0 log-prob gap | wall time per run |").format(t=threshold)
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, r in rows.items():
        steps = f"{r['steps_to_threshold']:.0f} ({r['reached']}/{r['runs']})" if r["reached"] else f"never (0/{r['runs']})"
        lines.append(f"| {arm} | {r['final']:.3f} | {r['best']:.3f} | {steps} | {r['collapsed']}/{r['runs']} | "
                     f"{r['w_max']:.3g} | {r['flip_rate']:.4f} | {r['lag0_logp_gap']:.2e} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def plot(per_arm: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, runs in per_arm.items():
        steps = [s for s, _ in runs[0]["rewards"]]
        mean = [statistics.mean(r["rewards"][i][1] for r in runs) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=arm, linestyle="--" if "+r3" in arm else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rollout reward (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--staleness", type=int, default=16)
    parser.add_argument("--rollout-steps", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="replay_ab_"))
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(out, args.arms, args.seeds, args.staleness, args.rollout_steps, args.jobs, args.timeout_s)
    per_arm = {arm: [run_summary(results[(arm, s)]["records"], results[(arm, s)]["wall_s"], args.threshold)
                     for s in args.seeds] for arm in args.arms}
    rows = {arm: arm_row(runs) for arm, runs in per_arm.items()}
    setting = (f"seeds {args.seeds}, staleness {args.staleness}, {args.rollout_steps} rollout batches "
               f"({args.staleness * args.rollout_steps} optimizer steps per run), bf16 server vs fp32 trainer, "
               f"6-digit reverse, lr 3e-3, {args.jobs} runs at a time")
    text = f"{setting}\n\n{table(rows, args.threshold)}\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"setting": setting, "arms": rows, "runs": per_arm}, indent=1))
    plot(per_arm, out / "reward.png")
    print(text)
    print(f"[ab] {out / 'table.md'}, {out / 'reward.png'}")


if __name__ == "__main__":
    main()
