#!/usr/bin/env bash
# Ray cluster for the rollout fleet (rollout.fleet.placement.launcher: ray).
#   bash examples/ray_cluster.sh head              # on trainer node 0 (where rank 0, the driver, runs)
#   bash examples/ray_cluster.sh worker HEAD_ADDR  # on every rollout node
#   bash examples/ray_cluster.sh wait GPUS         # until the cluster shows GPUS GPUs (e.g. 48)
#   bash examples/ray_cluster.sh stop              # on every node, after training
# The head joins with --num-gpus=0: its GPUs belong to the trainer, so Ray must never place an engine
# there. Rollout nodes join with their GPUs; the driver's ray.init(address="auto") finds the head.
# Env: RAY_PORT (6379), GPUS_PER_NODE (visible GPUs), PYTHON.
set -euo pipefail
PYTHON=${PYTHON:-python}
RAY_PORT=${RAY_PORT:-6379}
gpus_per_node() { "$PYTHON" -c "import torch; print(torch.cuda.device_count())"; }
case "${1:-}" in
  head)
    ray start --head --port="$RAY_PORT" --num-gpus=0 "${@:2}" ;;
  worker)
    [[ -n "${2:-}" ]] || { echo "usage: $0 worker HEAD_ADDR" >&2; exit 2; }
    ray start --address="$2:$RAY_PORT" --num-gpus="${GPUS_PER_NODE:-$(gpus_per_node)}" "${@:3}" ;;
  wait)
    want=${2:?usage: $0 wait GPUS}
    for _ in $(seq 1 120); do
      have=$("$PYTHON" -c "import ray; ray.init(address='auto', logging_level='ERROR'); print(int(ray.cluster_resources().get('GPU', 0)))" 2>/dev/null || echo 0)
      [[ "$have" -ge "$want" ]] && { echo "ray: $have GPUs"; exit 0; }
      sleep 5
    done
    echo "ray: only $have of $want GPUs after 10 minutes" >&2; exit 1 ;;
  stop)
    ray stop ;;
  *)
    echo "usage: $0 head|worker HEAD_ADDR|wait GPUS|stop" >&2; exit 2 ;;
esac
