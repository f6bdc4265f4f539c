"""Megatron-Core's routing replay, made usable for RL training: partial rows and activation recompute.

Megatron-Core (0.16.1 through 0.19.x) gives every ``TopKRouter`` a ``RouterReplay`` object when
``moe_enable_routing_replay`` is set (``transformer/moe/router_replay.py``). Its action decides how
the router's top-k is taken: ``RECORD`` computes it and keeps the indices, ``REPLAY_FORWARD`` uses
the indices given with ``set_target_indices`` and gathers the current router's scores at them (so
the gate weights are the current router's probabilities of the replayed experts),
``REPLAY_BACKWARD`` pops the next indices of the list ``set_target_indices`` also appends to (for
the forward that activation recompute repeats during the backward pass). Two things are missing for
the trainer (``megatron_vespo.train.routing_replay`` drives the objects):

- *Positions without a replay row.* The rollout engine reports the experts of every position it fed
  forward, not of the last token of a sequence nor of packing padding, and an engine may report no
  prompt rows. Upstream gathers at whatever indices it is given, so every position needs a row.
  Here a row of ``-1`` means "route this position yourself": it takes the router's own top-k.
- *Who switches to ``REPLAY_BACKWARD``.* Nothing in Megatron-Core does; its users must flip the
  action between the forward and the backward pass, which Megatron's pipeline schedules interleave
  per micro-batch. Here a ``REPLAY_FORWARD`` call made while autograd runs a backward pass (the only
  time a router runs then is a recompute) is served as ``REPLAY_BACKWARD``: each router's recomputes
  come in the order of its forwards in every schedule (1F1B and interleaved run a chunk's
  backwards in forward order), which is the order of the list.

Replay rows must have one row per token the router sees and ``topk`` columns; anything else is a
``ValueError`` (upstream would fail inside ``gather`` or, worse, broadcast). ``RECORD`` and no action
run Megatron's own code.

:func:`apply_router_replay_patch` is idempotent and applied on every platform by
:func:`megatron_vespo.platform.apply`; it changes nothing for a model built without
``moe_enable_routing_replay`` (its routers have no ``RouterReplay``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

_MARK = "_megatron_vespo_partial_replay"


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (-1: no graph task)."""
    return torch._C._current_graph_task_id() != -1


def _replay_topk(original: Callable) -> Callable:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    def get_replay_topk(self: Any, scores: torch.Tensor, topk: int, num_groups: Optional[int] = None,
                        group_topk: Optional[int] = None, default_compute_topk: Optional[Callable] = None):
        action = self.router_replay_action
        if action not in (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD):
            return original(self, scores, topk, num_groups, group_topk, default_compute_topk)
        if action == RouterReplayAction.REPLAY_BACKWARD or _in_backward():
            if not self.replay_backward_list:
                raise RuntimeError("routing replay: a router is recomputed in the backward pass but has no "
                                   "replay rows left for it")
            target = self.replay_backward_list.pop(0)
        else:
            target = self.target_topk_idx
            if target is None:
                raise RuntimeError("routing replay: a router replays but was given no replay rows")
        target = target.to(device=scores.device, dtype=torch.long)
        if target.shape != (scores.shape[0], topk):
            raise ValueError(f"routing replay: rows of shape {tuple(target.shape)} for a router that sees "
                             f"{scores.shape[0]} tokens with top-{topk}")
        missing = (target < 0).any(-1, keepdim=True)
        if bool(missing.any()):
            # Positions without a replayed row keep the router's own choice (whole rows: never a mix).
            _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            target = torch.where(missing, own, target)
        return scores.gather(1, target), target

    setattr(get_replay_topk, _MARK, True)
    return get_replay_topk


def apply_router_replay_patch() -> bool:
    """Install the partial-row, recompute-aware replay into Megatron-Core's ``RouterReplay`` (idempotent).

    Returns True when it was installed by this call, False when it already was."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    if getattr(RouterReplay.get_replay_topk, _MARK, False):
        return False
    RouterReplay.get_replay_topk = _replay_topk(RouterReplay.get_replay_topk)
    return True


def router_replay_patch_applied() -> bool:
    """Whether :func:`apply_router_replay_patch` is in effect in this process."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    return bool(getattr(RouterReplay.get_replay_topk, _MARK, False))
