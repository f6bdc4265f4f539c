"""The trainable policy in a parallel layout: model chunks wrapped for training + the optimizer.

:func:`build_model_and_optimizer` is what a trainer calls after ``init_distributed``:

1. one ``GPTModel`` per (virtual) pipeline chunk on this rank (:func:`build_model_chunks`);
2. optional initial weights from a full (unsharded) state dict, so that every layout starts from
   the same numbers (:mod:`megatron_vespo.models.full_state`);
3. ``Float16Module`` for bf16/fp16, then Megatron's ``DistributedDataParallel`` (contiguous grad
   buffers, grads reduced in fp32, optional distributed-optimizer sharding);
4. ``get_megatron_optimizer`` (Adam; torch AdamW when neither TE nor Apex is installed) with
   global-norm gradient clipping;
5. the schedule hooks on the shared ``TransformerConfig`` (``finalize_model_grads``: DP, sequence-
   parallel and embedding grad reductions; loss-scale and no-sync hooks).

After that, ``get_forward_backward_func()`` with any ``forward_step_func`` trains the chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from megatron_vespo.config.schema import OptimizerConfig, RunConfig
from megatron_vespo.models.full_state import load_full_state_dict
from megatron_vespo.models.layout import virtual_pipeline_size
from megatron_vespo.models.provider import build_gpt_model, te_available
from typed_config import ConfigError


@dataclass
class Trainable:
    """Model chunks (DDP-wrapped, one per virtual stage) and their optimizer."""

    model: list[torch.nn.Module]
    optimizer: Any
    config: Any  # the shared megatron TransformerConfig (schedule hooks are set on it)

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()


def build_model_chunks(cfg: RunConfig) -> list[torch.nn.Module]:
    """The unwrapped ``GPTModel`` chunks this rank holds (one, or VPP with interleaving)."""
    from megatron.core import parallel_state

    vpp = virtual_pipeline_size(cfg.parallel)
    if vpp is None:
        return [build_gpt_model(cfg)]
    chunks = []
    for vp_stage in range(vpp):
        parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
        chunks.append(build_gpt_model(cfg, vp_stage=vp_stage))
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def _megatron_optimizer_config(cfg: RunConfig) -> Any:
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    opt = cfg.optimizer
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=cfg.precision.params_dtype == "bf16",
        fp16=cfg.precision.params_dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision.params_dtype],
        use_distributed_optimizer=opt.distributed,
        **_offload_kwargs(opt),
    )


def _offload_kwargs(opt: OptimizerConfig) -> dict[str, Any]:
    """Megatron's optimizer CPU offload (``HybridDeviceOptimizer``) for ``optimizer.cpu_offload``.

    It moves the state of parameters that live on a GPU to host memory; on a machine without a GPU
    every parameter is already in host memory and Megatron would offload nothing, so it is refused
    there rather than silently ignored."""
    if not opt.cpu_offload:
        return {}
    if not torch.cuda.is_available():
        raise ConfigError("optimizer.cpu_offload", "offloads GPU optimizer state to host memory, and this machine "
                          "has no GPU (the state already lives in host memory here); set it to false")
    if not te_available():  # Megatron's precision-aware optimizer config reads TE's version
        raise ConfigError("optimizer.cpu_offload", "needs Transformer Engine (Megatron offloads through its "
                          "precision-aware optimizer path), which is not installed here")
    return dict(
        optimizer_cpu_offload=True,
        optimizer_offload_fraction=opt.resolved_offload_fraction,
        # The hybrid optimizer reuses the precision-aware path (Megatron-LM requires the pair).
        use_precision_aware_optimizer=True,
        # Overlap the host step with the copies: the reason to offload at all on a busy node.
        overlap_cpu_optimizer_d2h_h2d=True,
    )


def build_model_and_optimizer(
    cfg: RunConfig, initial_state: Optional[Mapping[str, torch.Tensor]] = None,
    init_checkpoint: Optional[Path] = None,
) -> Trainable:
    """Model chunks wrapped for training and their optimizer, in the layout of ``cfg.parallel``.

    ``initial_state`` (a full state dict in the canonical naming of
    :mod:`~megatron_vespo.models.full_state`: dist-checkpoint keys, global shapes) replaces the random
    initialisation on every rank; so does ``init_checkpoint`` (a Megatron dist checkpoint, each rank
    loading its own shards). Needs ``init_distributed`` first.
    """
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    chunks = build_model_chunks(cfg)
    if initial_state is not None:
        load_full_state_dict(chunks, initial_state)
    if init_checkpoint is not None:
        from megatron_vespo.checkpoint.init_weights import load_model_weights

        load_model_weights(chunks, init_checkpoint, cfg.model)
    config = chunks[0].config
    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.distributed,
        check_for_nan_in_grad=False,
    )
    chunks = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffers are bucketed (Megatron-LM's rule for VPP).
            disable_bucketing=(index > 0),
        )
        for index, chunk in enumerate(chunks)
    ]
    for chunk in chunks:
        chunk.broadcast_params()  # identical replicas across DP even without initial_state
    optimizer = get_megatron_optimizer(_megatron_optimizer_config(cfg), chunks)

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if len(chunks) == 1:
        config.no_sync_func = chunks[0].no_sync
    else:
        config.no_sync_func = [chunk.no_sync for chunk in chunks]
    return Trainable(model=chunks, optimizer=optimizer, config=config)
