"""Routing mismatch: does the trainer's MoE router pick the same experts as the rollout engine did?

Without routing replay, the trainer routes every token itself; the rollout engine (SGLang, or the
CPU server in another precision) may have routed it differently. This module measures how often:

- :class:`RouterRecorder` puts a forward hook on every Megatron ``TopKRouter`` of the model chunks
  (this rank's pipeline stage: ``router.layer_number`` is the *global* 1-based layer number, PP
  offset included). While :meth:`RouterRecorder.capture` is open it keeps each router's
  ``routing_map`` (``[local tokens, experts]`` bool: the top-k set per token). Outside it (forward-only
  passes, activation recompute during backward) nothing is kept.
- :func:`routed_positions` lays the samples' rollout experts (``TrainSample.rollout_routed_experts``:
  ``[R, layers, topk]`` per sample, aligned with the response tokens, see ``driver/rollout.py``) onto the
  packed THD positions of a micro-batch: the position that predicts response token ``j`` of a
  sequence with ``P`` prompt tokens is ``offset + P - 1 + j`` (the packing convention), every other
  position gets ``-1`` (not compared).
- :func:`count_flips` compares, for every (position, MoE layer) pair with rollout experts, the two
  top-k *sets*; only the positions of response tokens (``loss_mask > 0``) count.

Layers: the rollout engine reports one row per MoE layer in model order (the CPU server) or one per
decoder layer (SGLang on an all-MoE model: the same thing). A global layer number is mapped to that
row through the model's MoE layer list (``mlp_only_layers`` are skipped).

Sequence parallelism: under TP with SP the router of TP rank ``t`` sees positions
``[t * T/TP, (t + 1) * T/TP)`` of the packed row only; the counts are then summed over TP, and
always over PP (different layers) and DP (different sequences): :func:`reduce_flip_counts`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_vespo.config.schema import ModelConfig
from megatron_vespo.train.sample import TrainSample


def moe_layer_rows(num_hidden_layers: int, mlp_only_layers: Sequence[int]) -> dict[int, int]:
    """Global 0-based decoder layer -> row of the rollout engine's ``layers`` dimension."""
    dense = set(mlp_only_layers)
    moe = [i for i in range(num_hidden_layers) if i not in dense]
    return {layer: row for row, layer in enumerate(moe)}


def rollout_experts_shape(model: ModelConfig) -> tuple[int, int]:
    """(MoE layers, top-k): each position's routed experts as the rollout engine reports them for ``model``."""
    return len(moe_layer_rows(model.num_hidden_layers, model.mlp_only_layers)), model.num_experts_per_tok


def unreported_experts_shape(model: ModelConfig) -> Optional[tuple[int, int]]:
    """How to read the routed experts of a server that does not report their shape (SGLang's
    /get_model_info does not): the model's (MoE layers, top-k).

    None for a dense model, and for an MoE model with dense layers: an engine may then give rows for
    the MoE layers (the CPU server) or for every layer, and the train step tells them apart from a
    complete response (:func:`routed_shape`)."""
    return rollout_experts_shape(model) if model.num_experts and not model.mlp_only_layers else None


class RouterRecorder:
    """Forward hooks on the TopKRouter modules of ``model_chunks`` (see the module docstring)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], num_hidden_layers: int,
                 mlp_only_layers: Sequence[int] = ()):
        from megatron.core.transformer.moe.router import TopKRouter

        self.rows = moe_layer_rows(num_hidden_layers, mlp_only_layers)
        self.num_hidden_layers = num_hidden_layers
        self._active = False
        self.records: list[tuple[int, torch.Tensor]] = []  # (global 0-based layer, routing_map)
        self._handles = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not self._active:
            return
        if module.layer_number is None:
            raise RuntimeError("a TopKRouter has no layer_number: cannot match it to the rollout's layers")
        routing_map = output[1]
        self.records.append((int(module.layer_number) - 1, routing_map.detach()))

    @contextmanager
    def capture(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Keep the routing maps of the forward passes run inside the block (cleared at entry)."""
        self.records = []
        self._active = True
        try:
            yield self.records
        finally:
            self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def layer_row(self, layer: int, rollout_layers: int) -> Optional[int]:
        """Row of the rollout experts for global 0-based ``layer`` (None: a dense layer)."""
        if rollout_layers == self.num_hidden_layers:
            return layer
        return self.rows.get(layer)


def routed_positions(samples: Sequence[TrainSample], sample_index: Sequence[int], num_tokens: int,
                     layers: int, topk: int) -> torch.Tensor:
    """``[num_tokens, layers, topk]`` int64 rollout experts at the packed positions of one micro-batch
    holding ``samples[i] for i in sample_index`` in order (``-1``: nothing to compare)."""
    out = torch.full((num_tokens, layers, topk), -1, dtype=torch.long)
    offset = 0
    for i in sample_index:
        s = samples[i]
        prompt, response = len(s.prompt_ids), len(s.response_ids)
        routed = s.rollout_routed_experts
        if routed is not None and response:
            routed = torch.as_tensor(np.asarray(routed), dtype=torch.long).reshape(response, layers, topk)
            out[offset + prompt - 1:offset + prompt - 1 + response] = routed
        offset += prompt + response
    return out


def routed_shape(samples: Sequence[TrainSample], num_moe_layers: int, topk: int) -> Optional[tuple[int, int]]:
    """(layers, topk) of the samples' rollout experts, or None when no sample carries them.

    An engine that did not say its shape gives ``[R, 1, layers * topk]``; it is read as
    ``num_moe_layers`` (or all decoder layers) of ``topk``."""
    for s in samples:
        routed = s.rollout_routed_experts
        if routed is None:
            continue
        arr = np.asarray(routed)
        per_token = int(np.prod(arr.shape[1:])) if arr.ndim >= 2 else 0
        if per_token % topk:
            raise ValueError(f"rollout_routed_experts: {per_token} expert ids per token is not a multiple of top-k {topk}")
        return per_token // topk, topk
    return None


def count_flips(records: Sequence[tuple[int, torch.Tensor]], rollout: torch.Tensor, loss_mask: torch.Tensor,
                recorder: RouterRecorder, tp_rank: int = 0) -> torch.Tensor:
    """``[2]`` float64 (flipped pairs, compared pairs) over this micro-batch's (response position,
    MoE layer) pairs, on the routing maps' device (no host sync per layer). ``rollout`` is
    :func:`routed_positions`' tensor for the whole packed row; a routing map shorter than the row
    is TP rank ``tp_rank``'s sequence-parallel slice."""
    device = records[0][1].device if records else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    rollout_layers, total = rollout.shape[1], rollout.shape[0]
    rollout, loss_mask = rollout.to(device), loss_mask.to(device)
    for layer, routing_map in records:
        row = recorder.layer_row(layer, rollout_layers)
        if row is None:
            continue
        n = routing_map.shape[0]
        token_offset = 0 if n == total else tp_rank * n
        ids = rollout[token_offset:token_offset + n, row]  # [n, topk]
        compare = (loss_mask[token_offset:token_offset + n] > 0) & (ids >= 0).all(-1)
        expected = torch.zeros(n, routing_map.shape[1], dtype=torch.bool, device=device)
        expected.scatter_(1, ids.clamp_min(0), True)
        differs = (expected != routing_map.bool()).any(-1)
        counts += torch.stack([(differs & compare).sum(), compare.sum()]).to(torch.float64)
    return counts


def reduce_flip_counts(counts: torch.Tensor, *, tp_group: Any = None, sequence_parallel: bool = False,
                       pp_group: Any = None, dp_group: Any = None,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Sum the (flipped, compared) counts over the ranks that saw different (position, layer) pairs."""
    if not dist.is_initialized():
        return counts.cpu()
    t = counts.to(device) if device is not None else counts.clone()
    groups = ([tp_group] if sequence_parallel else []) + [pp_group, dp_group]
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu()


def flip_metrics(counts: torch.Tensor) -> dict[str, float]:
    """``mismatch/routing_flip_rate`` (absent when nothing was compared) and the pair counts."""
    flipped, compared = float(counts[0]), float(counts[1])
    out = {"mismatch/routing_flipped_pairs": flipped, "mismatch/routing_compared_pairs": compared}
    if compared > 0:
        out["mismatch/routing_flip_rate"] = flipped / compared
    return out
