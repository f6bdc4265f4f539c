"""Routing replay (``train.routing_replay``): the trainer's MoE routers take given experts instead of their own.

The replay-free path (``none``) stays the default; replay exists to compare against it.

- ``r3``: the experts the rollout engine routed each token to (``TrainSample.rollout_routed_experts``
  for the response positions, ``rollout_prompt_routed_experts`` for the prompt's where the engine
  reported them) are replayed in the update forward and in the log-prob pass.
- ``r2``: the π_old pass (``PolicyTrainer.compute_logprobs(..., record_routing=True)``) records every
  router's top-k on this rank, and the update of the same mini-batch replays it. Both passes pack
  the mini-batch the same way (the plan depends only on the samples' lengths and the layout), so the
  rows a router recorded for micro-batch ``m`` are exactly the rows it sees again there: nothing is
  communicated.

Mechanism: Megatron-Core's own ``RouterReplay`` object on every ``TopKRouter``
(``moe_enable_routing_replay``, set by the provider when replay is on), driven per router and per
micro-batch here, never through its process-global instance list (other models built in the same
process register there too, and the list's order is construction order, not layer order). The gate
weights under replay are the *current* router's probabilities of the replayed experts (Megatron
gathers the router's scores at the replayed indices; with ``norm_topk_prob`` the softmax runs over
those k), so gradients still reach the router. ``megatron_vespo.platform.router_replay`` lets a row
of ``-1`` mean "route yourself" (the last token of each sequence and packing padding have no engine
row) and serves activation recompute.

Alignment (r3): a packed micro-batch's ``[T, MoE layers, topk]`` rows (:func:`replay_rows`) follow
the packing convention of :mod:`megatron_vespo.train.routing`: in a sequence at ``offset`` with
``P`` prompt tokens, position ``offset + p`` for ``p < P - 1`` is prompt row ``p`` and position
``offset + P - 1 + j`` is response row ``j``. Each router takes the rows of the tokens it sees: under
sequence parallelism TP rank ``t`` sees ``[t * T/TP, (t + 1) * T/TP)``; with pipeline stages each
router picks its own layer's column by its global layer number; expert parallelism routes before
the dispatch, so a router always sees its rank's whole (SP-sliced) micro-batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_vespo.config.schema import ModelConfig
from megatron_vespo.train.routing import moe_layer_rows
from megatron_vespo.train.sample import TrainSample

REPLAY_MODES = ("none", "r2", "r3")


def _rows_of(arr: Any, field: str, index: int, expected_rows: int, model: ModelConfig) -> np.ndarray:
    """``arr`` as ``[rows, layers, topk]`` int64, refused (naming ``field``) unless it fits ``model``."""
    moe_layers = len(moe_layer_rows(model.num_hidden_layers, model.mlp_only_layers))
    topk, experts = model.num_experts_per_tok, model.num_experts
    a = np.asarray(arr)
    where = f"TrainSample.{field} of sample {index}"
    if a.ndim < 2 or a.shape[0] != expected_rows:
        raise ValueError(f"{where}: shape {a.shape}, expected {expected_rows} rows (one per position) of "
                         f"[layers, top-k]")
    per_token = int(np.prod(a.shape[1:]))
    layers = next((n for n in (moe_layers, model.num_hidden_layers) if n * topk == per_token), None)
    if layers is None:
        raise ValueError(f"{where}: {per_token} expert ids per position; the model routes top-{topk} in "
                         f"{moe_layers} MoE layers ({moe_layers * topk} ids)")
    a = a.reshape(expected_rows, layers, topk).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= experts):
        raise ValueError(f"{where}: expert ids in [{a.min()}, {a.max()}], the model has {experts} experts")
    if topk > 1 and a.size and (np.diff(np.sort(a, axis=-1), axis=-1) == 0).any():
        raise ValueError(f"{where}: a position repeats an expert within its top-{topk} set")
    return a


def checked_replay_rows(samples: Sequence[TrainSample], model: ModelConfig) -> list[tuple[Optional[np.ndarray],
                                                                                        np.ndarray]]:
    """(prompt rows or None, response rows) per sample, each ``[rows, layers, topk]``; a sample without
    the engine's experts, or with rows that do not fit the model, is refused naming the field."""
    out = []
    layers = None
    for i, s in enumerate(samples):
        if s.rollout_routed_experts is None:
            raise ValueError(f"TrainSample.rollout_routed_experts of sample {i}: missing; train.routing_replay 'r3' "
                             "replays the engine's experts (rollout.return_routed_experts: true)")
        response = _rows_of(s.rollout_routed_experts, "rollout_routed_experts", i, len(s.response_ids), model)
        prompt = None
        if s.rollout_prompt_routed_experts is not None:
            prompt = _rows_of(s.rollout_prompt_routed_experts, "rollout_prompt_routed_experts", i,
                              len(s.prompt_ids) - 1, model)
            if prompt.shape[1] != response.shape[1]:
                raise ValueError(f"TrainSample.rollout_prompt_routed_experts of sample {i}: {prompt.shape[1]} "
                                 f"layers, its response rows have {response.shape[1]}")
        if layers is not None and response.shape[1] != layers:
            raise ValueError(f"TrainSample.rollout_routed_experts of sample {i}: {response.shape[1]} layers, "
                             f"sample 0 has {layers}")
        layers = response.shape[1]
        out.append((prompt, response))
    return out


def replay_rows(rows: Sequence[tuple[Optional[np.ndarray], np.ndarray]], samples: Sequence[TrainSample],
                sample_index: Sequence[int], num_tokens: int) -> torch.Tensor:
    """``[num_tokens, layers, topk]`` int16 replay rows of one packed micro-batch holding
    ``samples[i] for i in sample_index`` in order; ``-1`` where the router routes itself (positions
    without an engine row: each sequence's last token, padding, unreported prompt rows). int16 (the
    router widens them): a long response times 48 layers x top-8 would be hundreds of MB in int64."""
    layers, topk = rows[0][1].shape[1:]
    out = torch.full((num_tokens, layers, topk), -1, dtype=torch.int16)
    offset = 0
    for i in sample_index:
        prompt, response = rows[i]
        p, r = len(samples[i].prompt_ids), len(samples[i].response_ids)
        if prompt is not None and p > 1:
            out[offset:offset + p - 1] = torch.from_numpy(prompt)
        if r:
            out[offset + p - 1:offset + p - 1 + r] = torch.from_numpy(response)
        offset += p + r
    return out


class RoutingReplay:
    """Drives the ``RouterReplay`` object of every ``TopKRouter`` in ``model_chunks`` (this rank's stage).

    ``sequence_parallel``/``tp_size``/``tp_rank`` say which token rows a router sees; ``num_hidden_layers``
    and ``mlp_only_layers`` map a router's global layer to its column of the replay rows."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], model: ModelConfig, *, sequence_parallel: bool,
                 tp_size: int, tp_rank: int):
        from megatron.core.transformer.moe.router import TopKRouter

        self.columns = moe_layer_rows(model.num_hidden_layers, model.mlp_only_layers)
        self.num_hidden_layers = model.num_hidden_layers
        self.sequence_parallel, self.tp_size, self.tp_rank = sequence_parallel, tp_size, tp_rank
        # r2 keeps every router's choice for up to a whole rollout batch (N mini-batches): on the host,
        # in the smallest integer type that holds an expert id.
        self.record_dtype = torch.uint8 if model.num_experts <= 256 else torch.int16
        if model.num_experts > torch.iinfo(torch.int16).max:
            raise ValueError(f"routing replay keeps expert ids as int16; the model has {model.num_experts} experts")
        # id(chunk) -> [(global 0-based layer, RouterReplay)]
        self.routers: dict[int, list[tuple[int, Any]]] = {}
        for chunk in model_chunks:
            found = []
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    if getattr(module, "router_replay", None) is None:
                        raise RuntimeError("routing replay: the model was built without moe_enable_routing_replay")
                    found.append((int(module.layer_number) - 1, module.router_replay))
            self.routers[id(chunk)] = found
        self._all = [r for found in self.routers.values() for _, r in found]

    def _chunk(self, chunk: torch.nn.Module) -> list[tuple[int, Any]]:
        if id(chunk) in self.routers:
            return self.routers[id(chunk)]
        if len(self.routers) == 1:  # a wrapper around the one chunk
            return next(iter(self.routers.values()))
        raise RuntimeError("routing replay: the schedule ran a model chunk this replay does not know")

    def token_slice(self, num_tokens: int) -> slice:
        """The rows of a packed micro-batch this rank's routers see."""
        if self.sequence_parallel and self.tp_size > 1:
            n = num_tokens // self.tp_size
            return slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        return slice(0, num_tokens)

    def column(self, layer: int, rollout_layers: int) -> Optional[int]:
        if rollout_layers == self.num_hidden_layers:
            return layer
        return self.columns.get(layer)

    @contextmanager
    def active(self, action: str) -> Iterator[None]:
        """Every router replays (``"replay"``) or records (``"record"``) inside the block; afterwards all
        rows are dropped and the routers route themselves again."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        act = {"replay": RouterReplayAction.REPLAY_FORWARD, "record": RouterReplayAction.RECORD}[action]
        for r in self._all:
            r.clear_indices()
            r.set_router_replay_action(act)
        try:
            yield
        finally:
            for r in self._all:
                r.clear_indices()
                r.clear_router_replay_action()

    def load_rows(self, chunk: torch.nn.Module, rows: torch.Tensor) -> None:
        """Give ``chunk``'s routers their rows of one micro-batch's ``[T, layers, topk]`` replay rows."""
        tokens = rows[self.token_slice(rows.shape[0])]
        for layer, r in self._chunk(chunk):
            col = self.column(layer, rows.shape[1])
            if col is None:
                raise ValueError(f"routing replay: no replay column for MoE layer {layer}")
            r.set_target_indices(tokens[:, col].contiguous())

    def load_recorded(self, chunk: torch.nn.Module, recorded: dict[int, torch.Tensor]) -> None:
        """Give ``chunk``'s routers the indices they recorded for this micro-batch (r2)."""
        for layer, r in self._chunk(chunk):
            if layer not in recorded:
                raise RuntimeError(f"routing replay r2: nothing recorded for layer {layer} of this micro-batch")
            r.set_target_indices(recorded[layer])

    def take_recorded(self, chunk: torch.nn.Module) -> dict[int, torch.Tensor]:
        """The top-k indices ``chunk``'s routers recorded in the forward just run (global layer -> ``[n, topk]``)."""
        out = {}
        for layer, r in self._chunk(chunk):
            idx = r.get_recorded_indices()
            if idx is None:
                raise RuntimeError(f"routing replay r2: the router of layer {layer} recorded nothing")
            out[layer] = idx.detach().to(device="cpu", dtype=self.record_dtype)
        return out
