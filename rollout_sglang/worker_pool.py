"""Generation requests that must bypass sglang-router, sent to its healthy workers directly.

Why: the router re-serialises /generate bodies and drops ``return_routed_experts``, so responses
that must carry routed experts come from the servers themselves. :func:`generation_target` picks
the router's client or this pool; both are a :class:`~rollout_sglang.contracts.GenerationTarget`.

- Membership is the router's: ``GET /workers`` (healthy ones) when the pool opens, again at most
  every ``refresh_s`` before a request, and right after a failure. The fleet supervisor takes a
  dead server out of the router and puts it back only after it has the current weights, so a
  restarted server is not sent work while it still holds its initial weights.
- Each request goes to the worker with the fewest requests in flight (then the fewest sent).
- Failover: when a worker stops answering (the client's own retries are spent:
  :class:`ServerUnavailableError`), the same request (same request id, hence the same sampling seed)
  goes to another worker: at most ``max_failovers`` times, or, with ``unavailable_s``, for as long as
  the failures have lasted less than that (the only worker restarting, the router restarting: the
  membership read before fails and the last one is kept).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional, Sequence

from rollout_sglang.client import RetryPolicy, SGLangClient
from rollout_sglang.contracts import GenerationTarget
from rollout_sglang.errors import RolloutError, ServerUnavailableError
from rollout_sglang.net import http_json
from rollout_sglang.types import Sample

log = logging.getLogger(__name__)

# A dead worker should be left quickly (the others can take its requests): ~1.5 s of retries.
DIRECT_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=1.0)


def healthy_worker_urls(url: str) -> list[str]:
    """The healthy workers behind the sglang-router at ``url`` (none while every one is restarting);
    ``[url]`` when ``url`` is a server itself (no ``/workers`` endpoint). RolloutError when unreachable."""
    try:
        status, data = http_json("GET", url.rstrip("/") + "/workers", timeout_s=10)
    except OSError as exc:
        raise RolloutError(f"{url}/workers: {type(exc).__name__}: {exc}") from None
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        return [url]  # not a router: a server URL
    return [str(w["url"]) for w in data["workers"] if isinstance(w, dict) and w.get("url")
            and w.get("is_healthy", True)]


async def routed_experts_shape(client: SGLangClient) -> Optional[tuple[int, int]]:
    """(layers, topk) when the server says (the CPU server's /get_model_info does; SGLang may not)."""
    try:
        shape = (await client.model_info()).get("routed_experts_shape")
    except RolloutError:
        return None
    return (int(shape[0]), int(shape[1])) if isinstance(shape, list) and len(shape) == 2 else None


class WorkerPool:
    """Use as ``async with WorkerPool(router_url) as pool: await pool.generate(...)`` (one event loop)."""

    def __init__(self, router_url: str, *, request_timeout_s: float, retry: RetryPolicy = DIRECT_RETRY,
                 refresh_s: float = 1.0, max_failovers: int = 3, unavailable_s: Optional[float] = None,
                 routed_experts_shape: Optional[tuple[int, int]] = None, one_request_per_sample: bool = False):
        self.router_url = router_url
        self.unavailable_s = unavailable_s
        self.one_request_per_sample = one_request_per_sample
        # The trainer's (MoE layers, top-k): how a worker's routed experts are read when it does not say
        # (SGLang's /get_model_info does not), and checked against what it says when it does.
        self.routed_experts_shape = routed_experts_shape
        self.request_timeout_s = request_timeout_s
        self.retry = retry
        self.refresh_s = refresh_s
        self.max_failovers = max_failovers
        self.clients: dict[str, SGLangClient] = {}  # url -> client, the current members
        self._retired: list[SGLangClient] = []  # left the pool; closed at the end (requests may still use them)
        self._load: dict[str, tuple[int, int]] = {}  # url -> (requests in flight, requests sent)
        self._refreshed_at = float("-inf")
        self._refresh_lock = asyncio.Lock()  # concurrent requests must not build two clients for one URL
        self.failovers = 0

    async def __aenter__(self) -> "WorkerPool":
        await self.refresh()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.gather(*(c.close() for c in [*self.clients.values(), *self._retired]))
        self.clients, self._retired = {}, []

    async def refresh(self, force: bool = True) -> None:
        """Membership from the router's healthy workers (unless ``force`` is off and it was read less than
        ``refresh_s`` ago); new members are asked for their expert shape. While the router is unreachable
        (restarting) the last membership is kept; while it lists no healthy worker the pool is empty."""
        async with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed_at <= self.refresh_s:
                return
            try:
                urls = [u.rstrip("/") for u in await asyncio.to_thread(healthy_worker_urls, self.router_url)]
            except RolloutError as exc:
                if not self.clients:
                    raise
                log.warning("worker membership not refreshed: %s", exc)
                self._refreshed_at = time.monotonic()
                return
            self._refreshed_at = time.monotonic()
            for url in [u for u in self.clients if u not in urls]:
                self._retired.append(self.clients.pop(url))
            new = [SGLangClient(u, request_timeout_s=self.request_timeout_s, retry=self.retry,
                                one_request_per_sample=self.one_request_per_sample)
                   for u in urls if u not in self.clients]
            for client, shape in zip(new, await asyncio.gather(*(routed_experts_shape(c) for c in new))):
                if shape is not None and self.routed_experts_shape is not None and shape != self.routed_experts_shape:
                    await asyncio.gather(*(c.close() for c in new))
                    raise RolloutError(f"{client.base_url} routes {shape[0]} MoE layers x top-{shape[1]}; the trainer's "
                                       f"model has {self.routed_experts_shape[0]} x top-{self.routed_experts_shape[1]}")
                client.routed_experts_shape = shape or self.routed_experts_shape
                self.clients[client.base_url] = client

    def _pick(self, avoid: set[str]) -> SGLangClient:
        candidates = [u for u in self.clients if u not in avoid] or list(self.clients)
        if not candidates:
            raise RolloutError(f"no worker to send to (router {self.router_url})")
        url = min(candidates, key=lambda u: self._load.get(u, (0, 0)))
        return self.clients[url]

    def _keep_trying(self, failovers: int, first_failure: float) -> bool:
        if self.unavailable_s is not None:
            return time.monotonic() - first_failure < self.unavailable_s
        return failovers < self.max_failovers

    async def generate(self, input_ids: Sequence[int], sampling_params: dict, *, n: int = 1,
                       return_logprob: bool = True, return_routed_experts: bool = False,
                       rid: Optional[str] = None) -> list[Sample]:
        """:meth:`SGLangClient.generate` on the least busy worker, failing over to another one."""
        avoid: set[str] = set()
        failovers, first_failure = 0, None
        while True:
            if time.monotonic() - self._refreshed_at > self.refresh_s or not self.clients:
                await self.refresh(force=False)
            if not self.clients:  # every worker is out of the router (restarting): wait for one
                first_failure = first_failure or time.monotonic()
                if not self._keep_trying(failovers, first_failure):
                    raise RolloutError(f"no healthy worker behind the router at {self.router_url}")
                await asyncio.sleep(min(self.refresh_s, 0.5))
                continue
            client = self._pick(avoid)
            url = client.base_url
            busy, sent = self._load.get(url, (0, 0))
            self._load[url] = (busy + 1, sent + 1)
            try:
                return await client.generate(input_ids, sampling_params, n=n, return_logprob=return_logprob,
                                             return_routed_experts=return_routed_experts, rid=rid)
            except ServerUnavailableError as exc:
                first_failure = first_failure or time.monotonic()
                if not self._keep_trying(failovers, first_failure):
                    raise
                failovers += 1
                avoid.add(url)
                if avoid >= set(self.clients):  # every worker failed once: wait a little, then try them again
                    avoid.clear()
                    await asyncio.sleep(min(2.0, 0.1 * failovers))
                self.failovers += 1
                log.warning("request %s: %s; sending it to another worker", rid, exc)
                await self.refresh()
            finally:
                busy, sent = self._load[url]
                self._load[url] = (busy - 1, sent)


def generation_target(url: str, *, return_routed_experts: bool, request_timeout_s: float,
                      routed_experts_shape: Optional[tuple[int, int]] = None,
                      one_request_per_sample: bool = False, unavailable_s: Optional[float] = None) -> GenerationTarget:
    """Where generation requests go: the router (or a server) at ``url``; with ``return_routed_experts``
    its healthy workers directly, reading unreported expert rows as ``routed_experts_shape``.
    ``one_request_per_sample``: see :class:`~rollout_sglang.client.SGLangClient`. ``unavailable_s``: how
    long requests keep being retried while no server answers (a restart) before they fail."""
    if return_routed_experts:
        return WorkerPool(url, request_timeout_s=request_timeout_s, routed_experts_shape=routed_experts_shape,
                          one_request_per_sample=one_request_per_sample, unavailable_s=unavailable_s)
    retry = RetryPolicy(max_attempts=None, max_backoff_s=2.0, unavailable_s=unavailable_s) \
        if unavailable_s is not None else RetryPolicy()
    return SGLangClient(url, request_timeout_s=request_timeout_s, retry=retry,
                        one_request_per_sample=one_request_per_sample)
