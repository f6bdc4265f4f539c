"""Megatron model weights in any parallel layout: canonical shards, and full (unsharded) weights loaded in.

Every Megatron module describes its parameters for distributed checkpointing: a
``sharded_state_dict()`` maps each local tensor to a *global* tensor (key, global shape, offset of
this shard, how many prepended axes such as the expert index are stacked). Those descriptions are
layout-independent — the same keys and global shapes in TP, PP, EP or DP layouts, and between
the local and Transformer Engine layer specs — so they define a canonical full state dict:

- :func:`local_shards` lists this rank's shards of the global tensors (the HF export reads them);
- :func:`load_full_state_dict` writes the matching slice of each global tensor into every rank's
  parameters (replicas included, e.g. tied embeddings on two pipeline stages).

Vocabulary padding: Megatron's embedding and output layer hold ``padded_vocab_size(TP)`` rows (a
multiple of ``make_vocab_size_divisible_by * TP``; the global shape therefore depends on TP). The
canonical state is the *real* vocabulary: :func:`local_shards` cuts the padded rows off (a TP rank
holding only padding has no vocabulary shard at all), so full state dicts, the HF export and weight
publication see ``[vocab_size, hidden]`` in every layout. The padded rows are kept at zero
(:func:`mark_vocab_padding` at construction, :func:`load_full_state_dict` on load; Megatron's own
checkpoint loader zero-fills what a checkpoint lacks, its vocabulary tensors allow a shape mismatch);
they receive no gradient because the log-prob kernel leaves their logits out.

Loading a full state dict is for initial weights and small models: every rank holds all of it.
Checkpoints of real models use Megatron's distributed checkpointing, which reads these same keys.
(The tests assemble the full weights back from the shards with ``tests/model_state.py``.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional, Sequence

import torch

# Dist-checkpoint keys of the vocabulary-parallel tensors (rows = padded vocabulary).
VOCAB_KEYS = frozenset({"embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"})
# Attribute of a GPTModel built by the provider: its real (unpadded) vocabulary size.
UNPADDED_VOCAB_ATTR = "unpadded_vocab_size"


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


def _chunks(model_chunks: Sequence[torch.nn.Module] | torch.nn.Module) -> list[torch.nn.Module]:
    return [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)


def unpadded_vocab_size(model: torch.nn.Module) -> Optional[int]:
    """The real vocabulary size of a (possibly wrapped) model chunk, None when it was not recorded
    (a model not built by the provider: its vocabulary is taken as unpadded)."""
    return getattr(_unwrap(model), UNPADDED_VOCAB_ATTR, None)


def _vocab_weights(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """This rank's shards of the embedding and output layer weights (those the chunk owns)."""
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    output = getattr(model, "output_layer", None)
    for module in (embedding, output):
        weight = getattr(module, "weight", None) if module is not None else None
        if weight is not None:
            yield weight


@torch.no_grad()
def mark_vocab_padding(model: torch.nn.Module, vocab_size: int) -> None:
    """Record the real vocabulary size on ``model`` (a GPTModel whose vocabulary Megatron padded) and
    zero the padded rows of its embedding and output layer shards.

    Zero rows keep the padding inert and deterministic: the embedding's are never looked up, the
    output layer's logits are masked by the log-prob kernel, so neither gets a gradient and weight
    decay keeps them at zero."""
    from megatron.core import parallel_state

    setattr(model, UNPADDED_VOCAB_ATTR, int(vocab_size))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for weight in _vocab_weights(model):
        rows = weight.shape[0]
        valid = max(0, min(rows, vocab_size - tp_rank * rows))  # Megatron's contiguous vocab shards
        weight.data[valid:].zero_()


def _strip_vocab_padding(shard: Shard, vocab_size: Optional[int]) -> Optional[Shard]:
    """``shard`` without the padded vocabulary rows (None when it holds nothing else)."""
    axis = shard.prepend_axis_num  # the vocabulary axis (0: these tensors are not stacked)
    if vocab_size is None or shard.key not in VOCAB_KEYS or shard.global_shape[axis] <= vocab_size:
        return shard
    valid = max(0, min(shard.tensor.shape[0], vocab_size - shard.global_offset[axis]))
    if valid == 0:
        return None
    shape = shard.global_shape
    return replace(shard, global_shape=(*shape[:axis], vocab_size, *shape[axis + 1:]), tensor=shard.tensor[:valid])


def local_shards(model_chunks: Sequence[torch.nn.Module] | torch.nn.Module) -> list[Shard]:
    """Shards of this rank's weights, in the canonical (dist-checkpoint) naming, with the vocabulary
    unpadded (see the module doc)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    shards = []
    for chunk in _chunks(model_chunks):
        vocab_size = unpadded_vocab_size(chunk)
        sharded = _unwrap(chunk).sharded_state_dict()
        apply_factories(sharded)  # e.g. SwiGLU fc1 -> separate gate and up shards (views)
        for value in nested_values(sharded):
            if not isinstance(value, ShardedTensor) or value.data is None:
                continue  # _extra_state objects and non-tensor metadata
            if value.flattened_range is not None:
                raise ValueError(f"{value.key}: flattened shards are not model weights")
            shard = _strip_vocab_padding(Shard(
                key=value.key,
                global_shape=tuple(value.global_shape),
                global_offset=tuple(value.global_offset),
                prepend_axis_num=value.prepend_axis_num,
                tensor=value.data,
                main_replica=bool(is_main_replica(value.replica_id)),
            ), vocab_size)
            if shard is not None:
                shards.append(shard)
    return shards


@torch.no_grad()
def load_full_state_dict(
    model_chunks: Sequence[torch.nn.Module] | torch.nn.Module, full: Mapping[str, torch.Tensor]
) -> None:
    """Copy this rank's slice of each full tensor into its parameters (all replicas).

    ``full`` holds the real vocabulary (``[vocab_size, hidden]``); the padded rows are set to zero.
    Call before wrapping in DDP / building the optimizer, or call the optimizer's
    ``reload_model_params()`` afterwards so its fp32 main copies follow.
    """
    for chunk in _chunks(model_chunks):
        vocab_size = unpadded_vocab_size(chunk)
        if vocab_size is not None:
            mark_vocab_padding(_unwrap(chunk), vocab_size)
    for shard in local_shards(model_chunks):
        if shard.key not in full:
            raise KeyError(f"full state dict has no {shard.key!r}")
        source = full[shard.key]
        if tuple(source.shape) != shard.global_shape:
            raise ValueError(f"{shard.key}: full tensor has shape {tuple(source.shape)}, "
                             f"the model expects {shard.global_shape}")
        shard.tensor.copy_(source[shard.index()])
