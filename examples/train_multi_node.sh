#!/usr/bin/env bash
# Many nodes: run this once on every trainer node (same CONFIG and overrides everywhere).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=configs/paper/vespo_sync_n8.yaml bash examples/train_multi_node.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 CONFIG=configs/paper/vespo_sync_n8.yaml bash examples/train_multi_node.sh
# Env: NNODES (1), NODE_RANK (0), MASTER_ADDR (node of rank 0; required when NNODES > 1), MASTER_PORT
#      (29500), NPROC_PER_NODE (default: visible GPUs, else 2), CONFIG, PYTHON, SKIP_PLAN=1,
#      WEIGHT_SYNC_ADDR (address the rollout engines reach rank 0 at; default MASTER_ADDR).
# Rank 0 (NODE_RANK 0, local rank 0) reads data, starts the fleet (Ray launcher: a Ray cluster must be
# up first, see examples/ray_cluster.sh) and pushes weights; every rank trains.
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/env.sh
CONFIG=${CONFIG:-configs/quickstart.yaml}
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ "$NNODES" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "MASTER_ADDR must name the node of rank 0 when NNODES=$NNODES" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# Engines on other nodes join rank 0's weight-sync group at this address (the config's default is local).
overrides=("rollout.weight_sync.master_address=${WEIGHT_SYNC_ADDR:-$MASTER_ADDR}" "$@")
if [[ "${SKIP_PLAN:-0}" != 1 ]]; then
  "$PYTHON" -m megatron_vespo.cli plan "$CONFIG" --trainer-gpus "$((NNODES * NPROC_PER_NODE))" "${overrides[@]}" > /dev/null
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  -m megatron_vespo.cli train "$CONFIG" "${overrides[@]}"
