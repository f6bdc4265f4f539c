"""A/B study: what the replay-free path buys. VESPO, PPO-clip (GRPO) and GSPO with and without R3.

Setting (CPU, the mismatch setting of ``bench_mismatch_w_tail.py``): the quickstart MoE on the
6-digit reverse task, the rollout server in bf16 and the trainer in fp32, routed experts returned,
one prompt per mini-batch and ``--staleness`` mini-batches per rollout batch (mini-batch j trains at
lag j: real off-policy pressure), lr 3e-3. Arms, each for every seed in ``--seeds`` (same seeds,
hence the same prompts and sampling seeds, across arms):

- ``vespo``, ``vespo+r3``: VESPO without / with routing replay R3 (``train.routing_replay: r3``);
- ``ppo_clip``, ``ppo_clip+r3``: PPO-clip with dual clip (the GRPO objective) without / with R3;
- ``gspo``: GSPO without replay.

Per arm (over its seeds; the grid and the summaries are ``megatron_vespo.experiments``', as in
``megatron-vespo sweep``): final reward (the last rollout batch's mean, averaged over seeds), best
reward, optimizer steps until a batch first reaches ``--threshold`` (runs that never do are counted
apart), collapsed runs (a non-finite or skipped step, or a final reward below half of the run's
best), the W tail (largest exp(sequence log-ratio) π_θ/μ over every step), the routing flip rate
and the lag-0 log-prob gap (mean over steps), and wall time per run; a run that fails is reported
with the end of its log and counted apart. Writes ``table.md``, ``results.json`` and ``reward.png``
(mean reward per arm against the optimizer step) under ``--out``.

    python benchmarks/bench_replay_ab.py [--seeds 1 2 3] [--staleness 16] [--rollout-steps 6] [--jobs 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_mismatch_w_tail import ONE_THREAD, QUICKSTART, mismatch_overrides  # noqa: E402

from megatron_vespo.experiments.grid import GridRun, run_grid  # noqa: E402
from megatron_vespo.experiments.summary import (  # noqa: E402
    aggregate_runs, markdown_table, mean_reward_curve, summarize_outcomes, write_report,
)
from megatron_vespo.plotting import plot_reward_curves  # noqa: E402

ARMS: dict[str, list[str]] = {
    "vespo": [],
    "vespo+r3": ["train.routing_replay=r3"],
    "ppo_clip": ["loss.name=ppo_clip"],
    "ppo_clip+r3": ["loss.name=ppo_clip", "train.routing_replay=r3"],
    "gspo": ["loss.name=gspo"],  # its aggregation defaults to seq-mean-token-mean
}


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
    # Same seeds, hence the same prompts and sampling seeds, across arms.
    runs = [(arm, GridRun(f"{arm}-s{seed}", (*mismatch_overrides(args.staleness, args.rollout_steps),
                                              f"train.seed={seed}", *ARMS[arm])))
            for seed in args.seeds for arm in args.arms]
    outcomes = run_grid(QUICKSTART, [run for _, run in runs], out, jobs=args.jobs, timeout_s=args.timeout_s,
                        env=ONE_THREAD, tag="ab")
    results = [{"arm": arm, **r} for (arm, _), r in zip(runs, summarize_outcomes(outcomes, args.threshold))]
    per_arm = {arm: [r["summary"] for r in results if r["arm"] == arm] for arm in args.arms}
    rows = [((arm,), aggregate_runs(summaries)) for arm, summaries in per_arm.items()]
    setting = (f"seeds {args.seeds}, staleness {args.staleness}, {args.rollout_steps} rollout batches "
               f"({args.staleness * args.rollout_steps} optimizer steps per run), bf16 server vs fp32 trainer, "
               f"6-digit reverse, lr 3e-3, {args.jobs} runs at a time")
    text = f"{setting}\n\n{markdown_table(rows, ('arm',), args.threshold, extra=('flip_rate', 'lag0_logp_gap'))}\n"
    write_report(out, text, {"setting": setting, "arms": {arm: row for (arm,), row in rows}, "runs": results})
    plot_reward_curves({arm: mean_reward_curve(s) for arm, s in per_arm.items()}, out / "reward.png",
                       linestyles={arm: "--" for arm in per_arm if "+r3" in arm})
    print(text)
    print(f"[ab] {out / 'table.md'}, {out / 'reward.png'}")


if __name__ == "__main__":
    main()
