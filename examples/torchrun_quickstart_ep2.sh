#!/usr/bin/env bash
# The quickstart under torchrun: two trainer processes with expert parallelism 2 (gloo on CPU,
# NCCL on GPU). Rank 0 drives the rollout fleet; every rank trains. Extra arguments are overrides:
#   bash examples/torchrun_quickstart_ep2.sh run.rollout_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nproc_per_node=2 --master_port="${MASTER_PORT:-29517}" -m megatron_vespo.cli train \
  configs/quickstart.yaml parallel.expert=2 run.output_dir=outputs/quickstart_ep2 "$@"
