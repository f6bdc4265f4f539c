#!/usr/bin/env bash
# CPU quickstart: set up (or reuse) .venv, then train a tiny random Qwen3-MoE to reverse 3 digits with
# VESPO -- Megatron-Core trainer, a CPU rollout server behind sglang-router, weight sync every batch.
# Idempotent: rerunning reuses the environment and starts a fresh run in outputs/quickstart.
# Extra arguments are config overrides, e.g.: bash scripts/quickstart.sh data.synthetic.task=sort
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
python -m megatron_vespo.cli train configs/quickstart.yaml "$@"
echo "[quickstart] finished in $(( $(date +%s) - start ))s (curves: outputs/quickstart/metrics.png)"
