"""One rollout batch: prompts -> fleet (through the router) -> scored, GRPO-weighted training samples.

μ (the behaviour policy) is the per-token log-probs the rollout engine returned with each response;
they become each training sample's ``rollout_logp``. Nothing is recomputed here.

Routed experts (``rollout.return_routed_experts``, MoE only). sglang-router re-serialises /generate
bodies and drops ``return_routed_experts``, so with it on the requests bypass the router: the healthy
workers are read from the router's ``GET /workers`` and every worker pulls prompts from one shared
queue (client-side least-loaded: a faster server simply takes more prompts). A server returns the
experts of every position it fed forward, ``prompt + response - 1`` rows of ``[layers, topk]``
(SGLang's layout: the last sampled token is never fed). The rows that produced the response tokens'
log-probs are positions ``P - 1 .. P + R - 2``, i.e. exactly ``R`` rows aligned with
``response_ids`` like ``rollout_logp``; those become the sample's ``rollout_routed_experts``
(``[R, layers, topk]``, the smallest integer dtype that holds the expert ids). The trainer compares
them with its own router (:mod:`megatron_vespo.train.routing`).
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config.schema import AdvantageConfig, RewardConfig, RolloutConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.rewards.registry import ScoreRequest, Verifier, score_all
from rollout_sglang.client import SGLangClient
from rollout_sglang.errors import RolloutError
from rollout_sglang.net import http_json
from rollout_sglang.types import Sample as RolloutSample


@dataclass
class RolloutGroup:
    """The n responses of one prompt."""

    row: PromptRow
    responses: list[RolloutSample]


@dataclass
class RolloutBatch:
    groups: list[list[dict[str, Any]]]  # training samples per prompt, in prompt order
    metrics: dict[str, float]
    weight_versions: list[str]  # distinct versions that produced the batch


def sampling_params(cfg: RolloutConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": cfg.max_response_len, "temperature": cfg.temperature,
                              "top_p": cfg.top_p, "top_k": cfg.top_k}
    if cfg.stop_token_ids:
        params["stop_token_ids"] = list(cfg.stop_token_ids)
    return params


async def _generate(url: str, rows: Sequence[PromptRow], cfg: RolloutConfig, rid_prefix: str) -> list[RolloutGroup]:
    async with SGLangClient(url, request_timeout_s=cfg.request_timeout_s) as client:
        outputs = await client.generate_batch([r.prompt_ids for r in rows], sampling_params(cfg), n=cfg.n_samples,
                                              return_logprob=True, max_concurrency=cfg.max_concurrency,
                                              rid_prefix=rid_prefix)
    return [RolloutGroup(row, responses) for row, responses in zip(rows, outputs)]


def healthy_worker_urls(url: str) -> list[str]:
    """The healthy workers behind the sglang-router at ``url``; ``[url]`` when ``url`` is a server
    itself (no ``/workers`` endpoint)."""
    try:
        status, data = http_json("GET", url.rstrip("/") + "/workers", timeout_s=10)
    except OSError as exc:
        raise RolloutError(f"{url}/workers: {type(exc).__name__}: {exc}") from None
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        return [url]  # not a router: a server URL
    urls = [str(w["url"]) for w in data["workers"] if isinstance(w, dict) and w.get("url")
            and w.get("is_healthy", True)]
    if not urls:
        raise RolloutError(f"the router at {url} lists no healthy worker")
    return urls


async def routed_experts_shape(client: SGLangClient) -> Optional[tuple[int, int]]:
    """(layers, topk) when the server says (the CPU server's /get_model_info does; SGLang may not)."""
    try:
        shape = (await client.model_info()).get("routed_experts_shape")
    except RolloutError:
        return None
    return (int(shape[0]), int(shape[1])) if isinstance(shape, list) and len(shape) == 2 else None


async def _generate_direct(servers: Sequence[str], rows: Sequence[PromptRow], cfg: RolloutConfig,
                           rid_prefix: str) -> list[RolloutGroup]:
    """Like :func:`_generate` with routed experts, sent to the servers directly (least-loaded pull).

    Request ids (hence sampling seeds) depend only on the prompt index, never on which server ran it."""
    clients = [SGLangClient(u, request_timeout_s=cfg.request_timeout_s) for u in servers]
    try:
        shapes = await asyncio.gather(*(routed_experts_shape(c) for c in clients))
        for c, shape in zip(clients, shapes):
            c.routed_experts_shape = shape
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(rows)):
            queue.put_nowait(i)
        outputs: list[Optional[list[RolloutSample]]] = [None] * len(rows)
        per_server = max(1, cfg.max_concurrency // len(clients))

        async def worker(client: SGLangClient) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                outputs[i] = await client.generate(rows[i].prompt_ids, sampling_params(cfg), n=cfg.n_samples,
                                                   return_logprob=True, return_routed_experts=True,
                                                   rid=f"{rid_prefix}-{i}")

        tasks = [asyncio.ensure_future(worker(c)) for c in clients for _ in range(per_server)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return [RolloutGroup(row, responses) for row, responses in zip(rows, outputs)]


def generate_groups(url: str, rows: Sequence[PromptRow], cfg: RolloutConfig, rid_prefix: str) -> list[RolloutGroup]:
    """n responses (with μ log-probs and finish reasons) for every prompt row, through ``url`` (the
    router, or a server). With ``cfg.return_routed_experts`` the router's healthy workers are called
    directly and every response also carries its routed experts."""
    if cfg.return_routed_experts:
        return asyncio.run(_generate_direct(healthy_worker_urls(url), rows, cfg, rid_prefix))
    return asyncio.run(_generate(url, rows, cfg, rid_prefix))


def response_routed_experts(response: RolloutSample, prompt_len: int) -> np.ndarray:
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
    top = int(aligned.max()) if aligned.size else 0
    return aligned.astype(np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32)


def response_text(tokenizer: Any, response: RolloutSample) -> Optional[str]:
    """Decoded response (the matched stop token trimmed, as SGLang does), or None without a tokenizer."""
    if tokenizer is None:
        return None
    ids = response.output_ids[:-1] if response.finish_reason.type == "stop" and response.output_ids else response.output_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def score_groups(groups: Sequence[RolloutGroup], verifier: Verifier, reward_cfg: RewardConfig,
                 tokenizer: Any = None) -> tuple[list[float], dict[str, float]]:
    requests = [ScoreRequest(response_ids=list(r.output_ids), response_text=response_text(tokenizer, r),
                             ground_truth=g.row.ground_truth, prompt_ids=list(g.row.prompt_ids))
                for g in groups for r in g.responses]
    scores, stats = score_all(verifier, requests, reward_cfg.timeout_s)
    return scores, {"reward/verifier_errors": float(stats.errors), "reward/verifier_timeouts": float(stats.timeouts)}


def build_rollout_batch(groups: Sequence[RolloutGroup], rewards: Sequence[float],
                        advantage_cfg: AdvantageConfig) -> RolloutBatch:
    """Training samples (GRPO advantage per response over its prompt's group) and rollout metrics.

    Aborted responses (a server died mid-request and the retry was not used) carry partial
    log-probs; they are still valid samples of μ and are trained on like the others.
    """
    group_size = len(groups[0].responses)
    if any(len(g.responses) != group_size for g in groups):
        raise ValueError("every prompt must have the same number of responses")
    reward_t = torch.tensor(rewards, dtype=torch.float32)
    advantages, adv_stats = grpo_advantages(reward_t, group_size, advantage_cfg)
    sample_groups: list[list[dict[str, Any]]] = []
    lengths, finishes, versions = [], Counter(), Counter()
    k = 0
    for g in groups:
        sample_groups.append([])
        for r in g.responses:
            if r.output_logprobs is None or len(r.output_logprobs) != len(r.output_ids):
                raise ValueError(f"response {r.rid} has {len(r.output_ids)} tokens but "
                                 f"{0 if r.output_logprobs is None else len(r.output_logprobs)} log-probs")
            sample = {"prompt_ids": list(g.row.prompt_ids), "response_ids": list(r.output_ids),
                      "rollout_logp": list(r.output_logprobs), "advantage": float(advantages[k])}
            if r.routed_experts is not None:
                sample["rollout_routed_experts"] = response_routed_experts(r, len(g.row.prompt_ids))
            sample_groups[-1].append(sample)
            lengths.append(len(r.output_ids))
            finishes[r.finish_reason.type] += 1
            versions[r.weight_version] += 1
            k += 1
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
    }
    for kind in ("stop", "length", "abort"):
        metrics[f"rollout/finish_{kind}"] = float(finishes.get(kind, 0))
    return RolloutBatch(groups=sample_groups, metrics=metrics, weight_versions=sorted(versions))


def split_mini_batches(groups: Sequence[list[dict[str, Any]]], num: int) -> list[list[dict[str, Any]]]:
    """``num`` consecutive mini-batches of whole prompt groups, in order, no shuffling (mini-batch j
    is trained at policy lag j). Empty responses have no token to train on and are left out (they
    still counted in their group's advantage)."""
    if len(groups) % num:
        raise ValueError(f"{len(groups)} prompts do not split into {num} equal mini-batches")
    per = len(groups) // num
    return [[s for g in groups[j * per:(j + 1) * per] for s in g if s["response_ids"]] for j in range(num)]
