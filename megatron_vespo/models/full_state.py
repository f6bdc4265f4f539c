"""Megatron model weights in any parallel layout: canonical shards, and full (unsharded) weights loaded in.

Every Megatron module describes its parameters for distributed checkpointing: a
``sharded_state_dict()`` maps each local tensor to a *global* tensor (key, global shape, offset of
this shard, how many prepended axes such as the expert index are stacked). Those descriptions are
layout-independent — the same keys and global shapes in TP, PP, EP or DP layouts, and between
the local and Transformer Engine layer specs — so they define a canonical full state dict:

- :func:`local_shards` lists this rank's shards of the global tensors (the HF export reads them);
- :func:`load_full_state_dict` writes the matching slice of each global tensor into every rank's
  parameters (replicas included, e.g. tied embeddings on two pipeline stages).

Loading a full state dict is for initial weights and small models: every rank holds all of it.
Checkpoints of real models use Megatron's distributed checkpointing, which reads these same keys.
(The tests assemble the full weights back from the shards with ``tests/model_state.py``.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class Shard:
    """One local tensor and where it sits in its global tensor."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    prepend_axis_num: int
    tensor: torch.Tensor
    main_replica: bool

    def index(self) -> tuple:
        """Index of this shard in the global tensor (prepended axes are single positions)."""
        idx: list = list(self.global_offset[: self.prepend_axis_num])
        for axis, size in enumerate(self.tensor.shape):
            start = self.global_offset[self.prepend_axis_num + axis]
            idx.append(slice(start, start + size))
        return tuple(idx)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers down to the model that owns ``sharded_state_dict``."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def local_shards(model_chunks: Sequence[torch.nn.Module] | torch.nn.Module) -> list[Shard]:
    """Shards of this rank's weights, in the canonical (dist-checkpoint) naming."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    shards = []
    for chunk in chunks:
        sharded = _unwrap(chunk).sharded_state_dict()
        apply_factories(sharded)  # e.g. SwiGLU fc1 -> separate gate and up shards (views)
        for value in nested_values(sharded):
            if not isinstance(value, ShardedTensor) or value.data is None:
                continue  # _extra_state objects and non-tensor metadata
            if value.flattened_range is not None:
                raise ValueError(f"{value.key}: flattened shards are not model weights")
            shards.append(Shard(
                key=value.key,
                global_shape=tuple(value.global_shape),
                global_offset=tuple(value.global_offset),
                prepend_axis_num=value.prepend_axis_num,
                tensor=value.data,
                main_replica=bool(is_main_replica(value.replica_id)),
            ))
    return shards


@torch.no_grad()
def load_full_state_dict(
    model_chunks: Sequence[torch.nn.Module] | torch.nn.Module, full: Mapping[str, torch.Tensor]
) -> None:
    """Copy this rank's slice of each full tensor into its parameters (all replicas).

    Call before wrapping in DDP / building the optimizer, or call the optimizer's
    ``reload_model_params()`` afterwards so its fp32 main copies follow.
    """
    for shard in local_shards(model_chunks):
        if shard.key not in full:
            raise KeyError(f"full state dict has no {shard.key!r}")
        source = full[shard.key]
        if tuple(source.shape) != shard.global_shape:
            raise ValueError(f"{shard.key}: full tensor has shape {tuple(source.shape)}, "
                             f"the model expects {shard.global_shape}")
        shard.tensor.copy_(source[shard.index()])
