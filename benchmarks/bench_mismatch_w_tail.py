"""The W tail of plain sequence-level importance sampling vs VESPO, side by side, same seed and data.

Setup (CPU, the quickstart MoE on the 6-digit reverse task): the rollout server runs in bf16, the
trainer in fp32, no routing replay (μ = the server's log-probs), routed experts returned; one
rollout batch of ``staleness`` mini-batches, mini-batch j trained at policy lag j (the paper's
staleness N). Two runs with the same seed, data and sampling seeds:

- **VESPO** (the default kernel φ(W) = W^c1 exp(c2 (1 − W)));
- **plain sequence-level IS**: the same loss with c1 = 1, c2 = 1e-4 (the smallest the config
  allows), i.e. φ(W) = W · exp(1e-4 (1 − W)) ≈ W: the REINFORCE coefficient is the raw sequence
  weight W = π_θ(y|x) / μ(y|x) (within 2% for W ≤ 200).

"W tail" = the largest coefficient on ∇ log π over all sequences of all steps (``vespo/phi_max``:
W for plain IS, φ(W) for VESPO), next to the raw weights W both runs saw (``vespo/W_max``) and
the largest sequence log-ratio. Per-sequence quantiles are not reducible over ranks, so the
per-step maxima are the tail statistic (their maximum and their median over steps).

    python benchmarks/bench_mismatch_w_tail.py [--staleness 64] [--rollout-steps 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vespo.experiments.grid import GridRun, run_grid, start_train  # noqa: E402
from megatron_vespo.logging_utils import read_metrics  # noqa: E402

QUICKSTART = REPO / "configs/quickstart.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two runs at a time on 2 cores
PLAIN_IS = ["loss.vespo.k_pos=1", "loss.vespo.k_neg=1", "loss.vespo.lambda_pos=1e-4", "loss.vespo.lambda_neg=1e-4"]


def mismatch_overrides(staleness: int, rollout_steps: int) -> list[str]:
    """bf16 server, fp32 trainer, no replay, routed experts on; one prompt per mini-batch."""
    return [f"run.rollout_steps={rollout_steps}", "run.stop_at_reward=null",
            "run.plot=false", f"train.staleness={staleness}", "train.mini_batch_prompts=1", "optimizer.lr=3e-3",
            "data.synthetic.num_digits=6", "rollout.max_response_len=6", "rollout.cpu_server_dtype=bfloat16",
            "rollout.return_routed_experts=true", "rollout.cpu_server_deterministic=true",
            "eval.every_steps=0"]


def start_run(overrides: Sequence[str], log: Path) -> subprocess.Popen:
    """One quickstart run with ``overrides`` (it dies with this process)."""
    return start_train(QUICKSTART, overrides, log, ONE_THREAD)


def run_pair(out: Path, staleness: int, rollout_steps: int, timeout_s: float = 300) -> tuple[list[dict], list[dict]]:
    """Both runs concurrently (each one process); their metrics records (VESPO, plain IS)."""
    runs = [GridRun(name, (*mismatch_overrides(staleness, rollout_steps), *extra))
            for name, extra in (("vespo", ()), ("plain_is", tuple(PLAIN_IS)))]
    outcomes = run_grid(QUICKSTART, runs, out, jobs=2, timeout_s=timeout_s, env=ONE_THREAD, tag="w_tail")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("; ".join(f"{o.name} run failed ({o.error}):\n{o.log_tail}" for o in failed))
    return read_metrics(outcomes[0].metrics_path), read_metrics(outcomes[1].metrics_path)


def w_tail(records: Sequence[dict]) -> dict[str, float]:
    """Tail statistics of one run over all of its optimizer steps."""
    def col(key: str) -> list[float]:
        return [r[key] for r in records if key in r]

    return {"coefficient_max": max(col("vespo/phi_max")),
            "coefficient_median_step_max": statistics.median(col("vespo/phi_max")),
            "W_max": max(col("vespo/W_max")), "W_median_step_max": statistics.median(col("vespo/W_max")),
            "seq_log_ratio_max": max(col("mismatch/seq_log_ratio_max")),
            "neg_W_gt_100": sum(col("vespo/neg_W_gt_100"))}


def side_by_side(vespo: dict[str, float], plain: dict[str, float]) -> str:
    rows = [("largest coefficient on grad log pi (tail)", "coefficient_max"),
            ("median over steps of the step's largest", "coefficient_median_step_max"),
            ("largest raw W = pi/mu seen", "W_max"),
            ("median over steps of the step's largest W", "W_median_step_max"),
            ("largest sequence log-ratio", "seq_log_ratio_max"),
            ("negative-advantage sequences with W > 100", "neg_W_gt_100")]
    lines = [f"{'':44} {'plain seq IS':>13} {'VESPO':>10} {'ratio':>9}"]
    for label, key in rows:
        ratio = f"{plain[key] / vespo[key]:>8.1f}x" if vespo[key] else f"{'-':>9}"
        lines.append(f"{label:44} {plain[key]:>13.4g} {vespo[key]:>10.4g} {ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--staleness", type=int, default=64)
    parser.add_argument("--rollout-steps", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="w_tail_"))
    out.mkdir(parents=True, exist_ok=True)
    vespo, plain = run_pair(out, args.staleness, args.rollout_steps)
    print(f"staleness {args.staleness}, {args.rollout_steps} rollout steps, bf16 server vs fp32 trainer ({out})")
    print(side_by_side(w_tail(vespo), w_tail(plain)))


if __name__ == "__main__":
    main()
