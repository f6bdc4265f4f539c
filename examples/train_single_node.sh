#!/usr/bin/env bash
# One node: NPROC_PER_NODE trainer ranks under torchrun; rank 0 also drives the rollout fleet.
#   CONFIG=configs/paper/vespo_qwen3_0_6b_sync_n8.yaml NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 \
#     bash examples/train_single_node.sh [key.path=value overrides...]
# Env: CONFIG (run YAML), NPROC_PER_NODE (default: visible GPUs, else 2), MASTER_PORT (29500),
#      PYTHON (interpreter with megatron-vespo), SKIP_PLAN=1 (skip the pre-launch `plan` check).
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/env.sh
CONFIG=${CONFIG:-configs/quickstart.yaml}
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [[ "${SKIP_PLAN:-0}" != 1 ]]; then  # fail before launch on an impossible layout or a memory overflow
  "$PYTHON" -m megatron_vespo.cli plan "$CONFIG" --trainer-gpus "$NPROC_PER_NODE" "$@" > /dev/null
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr=127.0.0.1 --master_port="${MASTER_PORT:-29500}" \
  -m megatron_vespo.cli train "$CONFIG" "$@"
