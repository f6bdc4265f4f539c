"""The one record that crosses from the driver to the trainer: a response to train on.

The driver builds a :class:`TrainSample` per response (``driver/rollout.py``: tokens, the rollout
engine's per-token log-probs μ, the GRPO advantage, and the engine's routed experts when asked for),
broadcasts the mini-batch to every rank, and the trainer packs, routes and scores it
(``train/packing.py``, ``train/routing.py``, ``train/step.py``).

Per-token fields are aligned with ``response_ids``: entry ``j`` belongs to response token ``j``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class TrainSample:
    """One prompt + response with what the policy loss needs."""

    prompt_ids: list[int]  # at least one token: the first response token is predicted from the last one
    response_ids: list[int]
    rollout_logp: list[float]  # log μ of each response token, as the rollout engine returned it
    advantage: float
    old_logp: Optional[list[float]] = None  # log π_old, when train.recompute_old_logprobs recomputed it
    ref_logp: Optional[list[float]] = None  # log π_ref of the frozen reference model, when loss.kl is on
    response_mask: Optional[list[float]] = None  # 1 = train on this token; None: every token
    # [R, layers, topk] experts the engine routed each response token's position to (MoE, when asked for)
    rollout_routed_experts: Optional[np.ndarray] = None
    # Where the sample came from (not used by the loss): its verifier reward and the weight version that
    # generated it. Saved with the sample by rollout.dump_dir.
    reward: Optional[float] = None
    weight_version: Optional[str] = None
    # The reward the advantage is computed from (the verifier's plus rollout.overlong's penalty): the KL
    # reward penalty (loss.kl mode reward) is subtracted from it and the advantages recomputed.
    shaped_reward: Optional[float] = None
    # [P - 1, layers, topk] experts of the prompt positions that were fed forward (kept for
    # train.routing_replay r3 where the engine reports them; None: the trainer routes the prompt itself)
    rollout_prompt_routed_experts: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        """Tokens the sample occupies when packed: prompt plus response."""
        return len(self.prompt_ids) + len(self.response_ids)
