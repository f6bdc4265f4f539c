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
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vespo.logging_utils import read_metrics  # noqa: E402

PLAIN_IS = ["loss.vespo.k_pos=1", "loss.vespo.k_neg=1", "loss.vespo.lambda_pos=1e-4", "loss.vespo.lambda_neg=1e-4"]


def mismatch_overrides(out_dir: Path, staleness: int, rollout_steps: int) -> list[str]:
    """bf16 server, fp32 trainer, no replay, routed experts on; one prompt per mini-batch."""
    return [f"run.output_dir={out_dir}", f"run.rollout_steps={rollout_steps}", "run.stop_at_reward=null",
            "run.plot=false", f"train.staleness={staleness}", "train.mini_batch_prompts=1", "optimizer.lr=3e-3",
            "data.synthetic.num_digits=6", "rollout.max_response_len=6", "rollout.cpu_server_dtype=bfloat16",
            "rollout.return_routed_experts=true", "rollout.cpu_server_deterministic=true",
            "eval.every_steps=0"]


def start_run(overrides: Sequence[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"), *overrides]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_pair(out: Path, staleness: int, rollout_steps: int, timeout_s: float = 300) -> tuple[list[dict], list[dict]]:
    """Both runs concurrently (each one process); their metrics records (VESPO, plain IS)."""
    procs = {name: start_run(mismatch_overrides(out / name, staleness, rollout_steps) + extra, out / f"{name}.log")
             for name, extra in (("vespo", []), ("plain_is", PLAIN_IS))}
    try:
        for name, proc in procs.items():
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{name} run exceeded {timeout_s}s; see {out / f'{name}.log'}") from None
            if code != 0:
                raise RuntimeError(f"{name} run failed ({code}):\n{(out / f'{name}.log').read_text()[-3000:]}")
    finally:  # never leave a run behind (each run's fleet dies with it: parent-death signal)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return read_metrics(out / "vespo" / "metrics.jsonl"), read_metrics(out / "plain_is" / "metrics.jsonl")


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
