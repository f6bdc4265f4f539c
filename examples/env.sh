# Environment for trainer ranks and rollout engines; sourced by the launch scripts (values already set win).
# Each line says why the variable matters.

# CPU threads per process: torchrun starts one process per GPU, each would otherwise use every core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Megatron's TP/SP communication-computation overlap needs kernels to reach the GPU in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Packed micro-batches change shape every step: expandable segments keep the allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Async collectives free their buffers without record_stream (less memory held by NCCL work).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# NCCL prints warnings (set INFO to debug a hang: it shows the rings/trees and the interfaces used).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Multi-node: the interfaces NCCL/gloo use for bootstrap and sockets (e.g. ib0, eth0); the default
# guess can pick a docker or loopback interface that other nodes cannot reach.
#   export NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0
# InfiniBand/RoCE: which HCAs (and GID index on RoCE) NCCL may use.
#   export NCCL_IB_HCA=mlx5 NCCL_IB_GID_INDEX=3
# Big clusters: a rank that waits longer than this in a collective aborts the job instead of hanging.
#   export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# wandb: online when WANDB_API_KEY is set, offline (under run.output_dir/wandb) otherwise.
#   export WANDB_API_KEY=...
# The Ray cluster the fleet's ray launcher joins (placement.ray_address 'auto' finds the local node).
#   export RAY_ADDRESS=auto
