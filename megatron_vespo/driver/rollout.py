"""One rollout batch: prompts -> fleet (through the router) -> scored, GRPO-weighted training samples.

Each prompt's group is made by the run's rollout function (``rollout.function``,
:mod:`megatron_vespo.rollout_function`; single-turn generation by default), whose loss mask (0 at tokens
an environment inserted) becomes the training samples' ``response_mask``.

μ (the behaviour policy) is the per-token log-probs the rollout engine returned with each response;
they become each :class:`~megatron_vespo.train.sample.TrainSample`'s ``rollout_logp``. Nothing is
recomputed here.

Routed experts (``rollout.return_routed_experts``, MoE only). sglang-router re-serialises /generate
bodies and drops ``return_routed_experts``, so with it on the requests bypass the router and go to
its healthy workers directly, least busy first, with failover (:mod:`rollout_sglang.worker_pool`). A server returns the
experts of every position it fed forward, ``prompt + response - 1`` rows of ``[layers, topk]``
(SGLang's layout: the last sampled token is never fed). The rows that produced the response tokens'
log-probs are positions ``P - 1 .. P + R - 2``, i.e. exactly ``R`` rows aligned with
``response_ids`` like ``rollout_logp``; those become the sample's ``rollout_routed_experts``
(``[R, layers, topk]``, the smallest integer dtype that holds the expert ids). The trainer compares
them with its own router (:mod:`megatron_vespo.train.routing`). With ``train.routing_replay: r3`` the
prompt's ``P - 1`` rows are kept too (``rollout_prompt_routed_experts``), when the engine reported
them, and the trainer replays both (:mod:`megatron_vespo.train.routing_replay`).
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config.schema import AdvantageConfig, OverlongConfig, RewardConfig, RolloutConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.rewards.overlong import shaped_rewards
from megatron_vespo.rewards.registry import ScoreRequest, Verifier, score_all
from megatron_vespo.train.sample import TrainSample
from megatron_vespo.rollout_function import RolloutResult, RolloutRunner, RolloutSampling, load_rollout_function
from rollout_sglang.client import gather_or_cancel
from rollout_sglang.contracts import GenerationTarget
from rollout_sglang.types import Sample as RolloutSample
from rollout_sglang.worker_pool import generation_target


@dataclass
class RolloutGroup:
    """The n responses of one prompt (from its rollout function, :mod:`megatron_vespo.rollout_function`)."""

    row: PromptRow
    responses: list[RolloutResult]
    generations: int = 0  # sequences the fleet generated for it (more than n for multi-turn rollouts)


@dataclass
class RolloutBatch:
    groups: list[list[TrainSample]]  # training samples per prompt, in prompt order
    metrics: dict[str, float]
    weight_versions: list[str]  # distinct versions that produced the batch
    # Per prompt group: its rewards (as the advantage sees them) have zero variance, so every advantage is 0.
    flat: list[bool] = field(default_factory=list)


def sampling_params(cfg: RolloutConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": cfg.max_response_len, "temperature": cfg.temperature,
                              "top_p": cfg.top_p, "top_k": cfg.top_k}
    if cfg.stop_token_ids:
        params["stop_token_ids"] = list(cfg.stop_token_ids)
    return params


def rollout_sampling(cfg: RolloutConfig) -> RolloutSampling:
    """The sampling settings a rollout function receives."""
    return RolloutSampling(n=cfg.n_samples, params=sampling_params(cfg), max_response_len=cfg.max_response_len)


def open_target(url: str, cfg: RolloutConfig, routed_experts_shape: Optional[tuple[int, int]] = None,
                one_request_per_sample: bool = False) -> GenerationTarget:
    """Where generation requests go: the router at ``url``, or with ``cfg.return_routed_experts`` its healthy
    workers directly (reading unreported expert rows as ``routed_experts_shape``); each sample its own
    request when the fleet says so (``RolloutFleet.one_request_per_sample``)."""
    return generation_target(url, return_routed_experts=cfg.return_routed_experts,
                             request_timeout_s=cfg.request_timeout_s, routed_experts_shape=routed_experts_shape,
                             one_request_per_sample=one_request_per_sample, unavailable_s=cfg.server_unavailable_s)


async def run_groups(target: Any, rows: Sequence[PromptRow], runner: RolloutRunner, sampling: RolloutSampling,
                     rid_prefix: str, max_concurrency: int, tokenizer: Any = None,
                     return_routed_experts: bool = False) -> list[RolloutGroup]:
    """Every row's group through ``runner`` (its rollout function) calling ``target.generate``, at most
    ``max_concurrency`` prompts at a time; result[i] belongs to rows[i]. A group's request ids start with
    ``<rid_prefix>-<i>``: they (hence the sampling seeds) depend only on the prompt's index."""
    gate = asyncio.Semaphore(max_concurrency)

    async def send(input_ids: list[int], params: dict[str, Any], n: int, rid: str) -> list[RolloutSample]:
        return await target.generate(input_ids, params, n=n, return_logprob=True,
                                     return_routed_experts=return_routed_experts, rid=rid)

    async def one(i: int, row: PromptRow) -> RolloutGroup:
        async with gate:
            results, generations = await runner.run(send, row, sampling, f"{rid_prefix}-{i}", tokenizer)
        return RolloutGroup(row, results, generations)

    return await gather_or_cancel([one(i, row) for i, row in enumerate(rows)])


async def _generate(url: str, rows: Sequence[PromptRow], cfg: RolloutConfig, rid_prefix: str,
                    routed_experts_shape: Optional[tuple[int, int]], one_request_per_sample: bool,
                    tokenizer: Any) -> list[RolloutGroup]:
    runner = load_rollout_function(cfg.function)
    async with open_target(url, cfg, routed_experts_shape, one_request_per_sample) as target:
        return await run_groups(target, rows, runner, rollout_sampling(cfg), rid_prefix, cfg.max_concurrency,
                                tokenizer, return_routed_experts=cfg.return_routed_experts)


def generate_groups(url: str, rows: Sequence[PromptRow], cfg: RolloutConfig, rid_prefix: str,
                    routed_experts_shape: Optional[tuple[int, int]] = None,
                    one_request_per_sample: bool = False, tokenizer: Any = None) -> list[RolloutGroup]:
    """n responses (with μ log-probs and finish reasons) for every prompt row, made by ``cfg.function``
    (the rollout function; single-turn by default) through ``url`` (the router, or a server). With
    ``cfg.return_routed_experts`` the router's healthy workers are called directly and every response
    also carries its routed experts (read as ``routed_experts_shape``, the model's (MoE layers, top-k),
    where a server does not report its own)."""
    return asyncio.run(_generate(url, rows, cfg, rid_prefix, routed_experts_shape, one_request_per_sample,
                                 tokenizer))


def response_routed_experts(response: RolloutResult, prompt_len: int) -> np.ndarray:
    """The ``[R, layers, topk]`` experts of the positions that produced the response tokens (see the
    module docstring), as the smallest integer dtype that holds them."""
    routed = response.routed_experts
    rows = len(response.output_ids)
    if routed is None:
        raise ValueError(f"response {response.rid} has no routed experts (rollout.return_routed_experts is on)")
    if routed.shape[0] < prompt_len - 1 + rows:
        raise ValueError(f"response {response.rid}: {routed.shape[0]} routed positions, expected "
                         f"{prompt_len - 1 + rows} (prompt {prompt_len} + response {rows} - 1)")
    aligned = routed[prompt_len - 1:prompt_len - 1 + rows]
    return _smallest_int(aligned)


def _smallest_int(rows: np.ndarray) -> np.ndarray:
    top = int(rows.max()) if rows.size else 0
    return rows.astype(np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32)


def prompt_routed_experts(response: RolloutResult, prompt_len: int) -> Optional[np.ndarray]:
    """The ``[P - 1, layers, topk]`` experts of the prompt positions (all but the last, whose row
    belongs to the first response token), or None where the engine did not report them."""
    routed = response.routed_experts
    if routed is None or prompt_len < 2 or routed.shape[0] < prompt_len - 1:
        return None
    return _smallest_int(routed[:prompt_len - 1])


def response_text(tokenizer: Any, response: RolloutResult) -> Optional[str]:
    """The text the rollout function gave, else the decoded response (the matched stop token trimmed, as
    SGLang does), or None without a tokenizer."""
    if response.text is not None:
        return response.text
    if tokenizer is None:
        return None
    ids = response.output_ids[:-1] if response.finish_reason.type == "stop" and response.output_ids else response.output_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def score_groups(groups: Sequence[RolloutGroup], verifier: Verifier, reward_cfg: RewardConfig,
                 tokenizer: Any = None) -> tuple[list[float], dict[str, Any]]:
    requests = [ScoreRequest(response_ids=list(r.output_ids), response_text=response_text(tokenizer, r),
                             ground_truth=g.row.ground_truth, prompt_ids=list(g.row.prompt_ids))
                for g in groups for r in g.responses]
    scores, stats = score_all(verifier, requests, reward_cfg.timeout_s)
    metrics: dict[str, Any] = {"reward/verifier_errors": float(stats.errors),
                               "reward/verifier_timeouts": float(stats.timeouts)}
    if stats.first_error:  # kept with the metrics (JSONL), shown when a run stops for it (run_health.py)
        metrics["reward/first_error"] = stats.first_error
    metrics.update(verifier_metrics(verifier))
    return scores, metrics


def verifier_metrics(verifier: Verifier) -> dict[str, float]:
    """A verifier's own counters, for those that keep some (the remote verifier: requests, retries, failures)."""
    metrics = getattr(verifier, "metrics", None)
    return metrics() if callable(metrics) else {}


def build_rollout_batch(groups: Sequence[RolloutGroup], rewards: Sequence[float],
                        advantage_cfg: AdvantageConfig, overlong: Optional[OverlongConfig] = None,
                        max_response_len: int = 0, keep_prompt_routed: bool = False) -> RolloutBatch:
    """Training samples (GRPO advantage per response over its prompt's group) and rollout metrics.
    ``keep_prompt_routed`` (routing replay r3): samples also carry the prompt positions' routed experts.

    An aborted response (finish reason ``abort``: the server stopped it before it ended, and it was not
    continued) is cut short: its reward scores an unfinished answer. It is never trained on, and its
    group's advantages are computed over the group's complete responses only
    (``rollout/aborted_excluded`` counts them).

    ``rewards`` are the verifier's scores (``rollout/reward_mean`` reports them). With ``overlong``
    (:mod:`megatron_vespo.rewards.overlong`, needs ``max_response_len``) the soft length penalty is added
    before the advantage, and truncated responses (finish reason ``length``) get loss mask 0.

    A response's own loss mask (its rollout function's: 0 at tokens the environment inserted) becomes the
    sample's ``response_mask``: those tokens stay in the forward pass but are neither trained nor part of
    the sequence weight.
    """
    group_size = len(groups[0].responses)
    if any(len(g.responses) != group_size for g in groups):
        raise ValueError("every prompt must have the same number of responses")
    reward_t = torch.tensor(rewards, dtype=torch.float32)
    penalties = [0.0] * len(rewards)
    shaped_t = reward_t
    if overlong is not None and overlong.buffer_len:
        shaped, penalties = shaped_rewards(list(rewards), [len(r.output_ids) for g in groups for r in g.responses],
                                           max_response_len, overlong)
        shaped_t = torch.tensor(shaped, dtype=torch.float32)
    mask_truncated = overlong is not None and overlong.mask_truncated
    complete = torch.tensor([r.finish_reason.type != "abort" for g in groups for r in g.responses], dtype=torch.bool)
    group_ids = torch.arange(len(groups)).repeat_interleave(group_size)
    advantages = torch.zeros_like(reward_t)
    kept_advantages, adv_stats = grpo_advantages(shaped_t[complete], group_ids[complete], advantage_cfg)
    advantages[complete] = kept_advantages
    sample_groups: list[list[TrainSample]] = []
    lengths, finishes, versions = [], Counter(), Counter()
    k = 0
    masked_responses = 0
    env_tokens = 0
    for g in groups:
        sample_groups.append([])
        for r in g.responses:
            if r.output_logprobs is None or len(r.output_logprobs) != len(r.output_ids):
                raise ValueError(f"response {r.rid} has {len(r.output_ids)} tokens but "
                                 f"{0 if r.output_logprobs is None else len(r.output_logprobs)} log-probs")
            lengths.append(len(r.output_ids))
            env_tokens += len(r.loss_mask) - sum(r.loss_mask)
            finishes[r.finish_reason.type] += 1
            versions[r.weight_version] += 1
            k += 1
            if not complete[k - 1]:
                continue
            routed = response_routed_experts(r, len(g.row.prompt_ids)) if r.routed_experts is not None else None
            # A truncated response is an unfinished answer: its reward still shapes the group's advantages,
            # but training on its tokens would teach whatever it was cut off in the middle of.
            masked = mask_truncated and r.finish_reason.type == "length"
            masked_responses += int(masked)
            sample_groups[-1].append(TrainSample(
                prompt_ids=list(g.row.prompt_ids), response_ids=list(r.output_ids),
                rollout_logp=list(r.output_logprobs), advantage=float(advantages[k - 1]),
                response_mask=_response_mask(r.loss_mask, masked),
                rollout_routed_experts=routed, reward=float(rewards[k - 1]), weight_version=r.weight_version,
                shaped_reward=float(shaped_t[k - 1]),
                rollout_prompt_routed_experts=prompt_routed_experts(r, len(g.row.prompt_ids))
                if keep_prompt_routed and routed is not None else None))
    n = float(len(rewards))
    metrics = {
        "rollout/reward_mean": float(reward_t.mean()),
        "rollout/reward_std": float(reward_t.std()) if len(rewards) > 1 else 0.0,
        "rollout/response_len_mean": sum(lengths) / n,
        "rollout/response_len_max": float(max(lengths)),
        "rollout/empty_responses": float(sum(1 for x in lengths if x == 0)),
        "rollout/zero_std_groups": adv_stats["adv/zero_std_groups"],
        "rollout/zero_std_fraction": adv_stats["adv/zero_std_fraction"],
        "rollout/num_prompts": float(len(groups)),
        "rollout/num_responses": n,
        "adv/abs_mean": adv_stats.get("adv/abs_mean", 0.0),
        "rollout/aborted_excluded": float(int((~complete).sum())),
        # Multi-turn rollouts (rollout.function): sequences generated per response, and the share of
        # response tokens the environment inserted (loss mask 0).
        "rollout/generations_per_response": sum(g.generations for g in groups) / n,
        "rollout/env_token_fraction": env_tokens / max(1, sum(lengths)),
    }
    if overlong is not None and overlong.buffer_len:
        metrics["overlong/penalized_responses"] = float(sum(1 for p in penalties if p < 0))
        metrics["overlong/penalty_mean"] = sum(penalties) / n
        metrics["overlong/shaped_reward_mean"] = float(shaped_t.mean())
    if mask_truncated:
        metrics["overlong/masked_responses"] = float(masked_responses)
    for kind in ("stop", "length", "abort"):
        metrics[f"rollout/finish_{kind}"] = float(finishes.get(kind, 0))
    # GRPO gives a group all-zero advantages exactly when its complete responses' rewards are equal
    # (advantages.py); a group without complete responses has nothing to train either.
    flat = [all(s.advantage == 0.0 for s in g) for g in sample_groups]
    return RolloutBatch(groups=sample_groups, metrics=metrics, weight_versions=sorted(versions), flat=flat)


def _response_mask(loss_mask: Sequence[int], masked: bool) -> Optional[list[float]]:
    """A TrainSample's response mask: the rollout's loss mask, all 0 for a masked (truncated) response,
    None when every token trains."""
    if masked:
        return [0.0] * len(loss_mask)
    return None if all(loss_mask) else [float(m) for m in loss_mask]


def split_mini_batches(groups: Sequence[list[TrainSample]], num: int) -> list[list[TrainSample]]:
    """``num`` consecutive mini-batches of whole prompt groups, in order, no shuffling (mini-batch j
    is trained at policy lag j). Empty responses have no token to train on and are left out (they
    still counted in their group's advantage)."""
    if len(groups) % num:
        raise ValueError(f"{len(groups)} prompts do not split into {num} equal mini-batches")
    per = len(groups) // num
    return [trainable(groups[j * per:(j + 1) * per]) for j in range(num)]


def trainable(groups: Sequence[list[TrainSample]]) -> list[TrainSample]:
    """The samples of ``groups`` that have a token to train on (empty responses still counted in their
    group's advantage)."""
    return [s for g in groups for s in g if s.response_ids]
