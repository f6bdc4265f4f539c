"""DAPO's dynamic sampling (arXiv 2503.14476, section 3.2) for the synchronous loop.

A prompt group whose rewards all agree has GRPO advantage 0 for every response: it costs a forward and
backward and dilutes the token-mean normaliser without adding any gradient. As a policy improves, more
groups are all-correct (or, on hard data, all-wrong), and the effective batch shrinks. Dynamic sampling
drops those groups and generates more prompts until the rollout batch holds the groups it needs.

Rounds: the first round generates the rollout batch as usual (``need`` prompts). While fewer than
``need`` groups have reward variance and fewer than ``max_extra_rounds`` extra rounds ran, another round
draws ``ceil(missing / kept_fraction)`` new prompts (the fraction kept so far predicts how many are needed;
``need`` when nothing was kept yet; never more than ``need``). All rounds of a rollout step run on the
same weights (nothing is trained in between), so every sample still trains at lag j in mini-batch j.

The trained groups are the first ``need`` groups with variance, in generation order; groups with variance
beyond ``need`` are dropped (``surplus``). If the budget is spent first, ``on_exhausted: fill`` completes
the batch with the first flat groups (zero advantage, exactly what the run would have trained without
dynamic sampling) and ``error`` stops the run. The asynchronous loop filters in its buffer instead
(:mod:`megatron_vespo.driver.rollout_buffer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from megatron_vespo.config.schema import DynamicSamplingConfig
from megatron_vespo.driver.rollout import RolloutGroup
from megatron_vespo.driver.run_health import DynamicSamplingExhaustedError

# (prompts to generate, round index) -> (groups, their per-response rewards in order, reward stats)
DrawFn = Callable[[int, int], tuple[list[RolloutGroup], list[float], dict[str, Any]]]
# (groups, their rewards) -> per group: True when its rewards have zero variance (no learning signal)
FlatFn = Callable[[list[RolloutGroup], list[float]], list[bool]]


@dataclass
class CollectedGroups:
    """Every group generated for one rollout batch, and which of them are trained."""

    groups: list[RolloutGroup]
    rewards: list[float]  # per response, in group order
    reward_stats: list[dict[str, Any]]  # one per round
    flat: list[bool]  # per group
    chosen: list[int]  # indices into groups, in generation order, len == need
    metrics: dict[str, float] = field(default_factory=dict)


def next_round_size(need: int, kept: int, generated: int) -> int:
    """Prompts to draw in the next round: the missing groups divided by the fraction kept so far, at most
    ``need`` (a whole rollout batch) and at least 1; ``need`` when nothing has been kept yet."""
    missing = need - kept
    if kept == 0 or generated == 0:
        return need
    return max(1, min(need, math.ceil(missing * generated / kept)))


def collect_groups(need: int, draw: DrawFn, is_flat: FlatFn, cfg: DynamicSamplingConfig) -> CollectedGroups:
    """Generate rounds until ``need`` groups with reward variance are found or the budget is spent (see the
    module docstring); raises :class:`DynamicSamplingExhaustedError` with ``on_exhausted: error``."""
    groups: list[RolloutGroup] = []
    rewards: list[float] = []
    stats: list[dict[str, Any]] = []
    flat: list[bool] = []
    size, extra_rounds = need, 0
    while True:
        new_groups, new_rewards, new_stats = draw(size, extra_rounds)
        groups += new_groups
        rewards += new_rewards
        stats.append(new_stats)
        flat += is_flat(new_groups, new_rewards)
        kept = flat.count(False)
        if kept >= need or extra_rounds >= cfg.max_extra_rounds:
            break
        size = next_round_size(need, kept, len(flat))
        extra_rounds += 1
    with_variance = [i for i, f in enumerate(flat) if not f]
    chosen = with_variance[:need]
    filled = 0
    if len(chosen) < need:
        if cfg.on_exhausted == "error":
            raise DynamicSamplingExhaustedError(
                f"dynamic sampling (rollout.dynamic_sampling): {len(chosen)} of the {need} prompt groups a rollout "
                f"batch needs had reward variance after {extra_rounds} extra generation round(s) ({flat.count(True)} "
                f"of {len(flat)} generated groups scored the same on every response): the prompts are too easy or "
                "too hard for the policy; raise max_extra_rounds or set on_exhausted: fill")
        filled = need - len(chosen)
        chosen = sorted(chosen + [i for i, f in enumerate(flat) if f][:filled])
    generated = len(flat)
    metrics = {
        "dynsamp/generated_groups": float(generated),
        "dynsamp/flat_groups": float(flat.count(True)),
        "dynsamp/filtered_fraction": flat.count(True) / generated,
        "dynsamp/filled_groups": float(filled),
        "dynsamp/surplus_groups": float(len(with_variance) - (need - filled)),
        "dynsamp/extra_rounds": float(extra_rounds),
        "dynsamp/extra_groups": float(generated - need),
        "dynsamp/generation_cost": generated / need,  # groups generated per group trained
    }
    return CollectedGroups(groups, rewards, stats, flat, chosen, metrics)


def merge_reward_stats(per_round: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The reward stats of several scoring rounds as one: counts summed, the first error kept."""
    out: dict[str, Any] = {}
    for stats in per_round:
        for key, value in stats.items():
            if key == "reward/first_error":
                out.setdefault(key, value)
            else:
                out[key] = out.get(key, 0.0) + float(value)
    return out
