"""Async client for SGLang's native HTTP API, the data plane: generation (works against SGLang, the
router, or the CPU server) and the read-only calls next to it. Weight updates and generation control
are the fleet's (blocking, ``fleet.py``); every route and body is defined in ``engine_api.py``.

The n samples of a prompt go as one ``n``-request, whose samples SGLang names ``rid_0 .. rid_{n-1}``
(an abort must name those; SGLang ignores one naming the unexpanded id). Against servers that sample
every copy of a request with its one ``sampling_seed`` (SGLang with ``--enable-deterministic-inference``,
which would give n identical samples and zero advantages) the client is made with
``one_request_per_sample``: each sample is then its own request, named and seeded the same way.
Each attempt gets its own rid (``rid``, ``rid.retry1``, ...) so a server that still runs an abandoned
attempt cannot be confused with the retry, and the seed stays the request's, so a retry is
reproducible; an attempt's output is used only if that attempt answered, so no sample appears twice.

Retries (exponential backoff) happen only where repeating is safe: connection errors, timeouts and
5xx on /generate and on read-only calls.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence as Seq

import aiohttp

from rollout_sglang import engine_api as api
from rollout_sglang.errors import ResponseFormatError, ServerHTTPError, ServerUnavailableError
from rollout_sglang.types import Sample, parse_generate_item


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a safe request: at most ``max_attempts`` attempts (None: no
    count), and, with ``unavailable_s``, only while the failures have lasted less than that long — long
    enough to cover a server (or router) restart, after which the request goes through."""

    max_attempts: Optional[int] = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 4.0
    multiplier: float = 2.0
    unavailable_s: Optional[float] = None

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)


def seed_from_rid(rid: str) -> int:
    """A stable 31-bit sampling seed for a request id."""
    return int.from_bytes(hashlib.sha256(rid.encode()).digest()[:4], "little") & 0x7FFFFFFF


class SGLangClient:
    """One base URL (a server or the router); use as ``async with SGLangClient(url) as c:``."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float = 600.0,
        total_timeout_s: float = 1800.0,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 512,
        routed_experts_shape: Optional[tuple[int, int]] = None,
        one_request_per_sample: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        self.one_request_per_sample = one_request_per_sample
        self.request_timeout_s = request_timeout_s
        self.total_timeout_s = total_timeout_s
        self.retry = retry
        self.max_connections = max_connections
        self.routed_experts_shape = routed_experts_shape
        self._session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_connections))
        return self._session

    # ---- transport -----------------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        endpoint: str,
        body: Optional[dict] = None,
        *,
        retry: bool,
        timeout_s: Optional[float] = None,
        total_timeout_s: Optional[float] = None,
        body_for_attempt=None,
    ) -> tuple[int, str]:
        """Send with retries when ``retry``; returns (status, text) of a 2xx or raises."""
        session = self._get_session()
        total = self.total_timeout_s if total_timeout_s is None else total_timeout_s
        start = time.monotonic()
        deadline = start + total
        attempts = self.retry.max_attempts if retry else 1
        last_error = "no attempt made"
        attempt = 0
        first_failure: Optional[float] = None
        while attempts is None or attempt < attempts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            per_try = min(timeout_s or self.request_timeout_s, remaining)
            payload = body_for_attempt(attempt) if body_for_attempt is not None else body
            try:
                async with session.request(method, self.base_url + endpoint, json=payload,
                                           timeout=aiohttp.ClientTimeout(total=per_try)) as resp:
                    text = await resp.text()
                    if 200 <= resp.status < 300:
                        return resp.status, text
                    if resp.status < 500:
                        raise ServerHTTPError(self.base_url, endpoint, resp.status, text)
                    last_error = f"HTTP {resp.status}: {text[:200]}"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            attempt += 1
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if retry and self.retry.unavailable_s is not None and now - first_failure >= self.retry.unavailable_s:
                break
            if attempts is None or attempt < attempts:
                await asyncio.sleep(min(self.retry.backoff(attempt - 1), max(0.0, deadline - time.monotonic())))
        raise ServerUnavailableError(self.base_url, endpoint, attempt, time.monotonic() - start, last_error)

    def _parse_json(self, text: str, endpoint: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise ResponseFormatError(self.base_url + endpoint, "<body>", f"not JSON: {text[:120]!r}") from None

    async def _get_json(self, endpoint: str) -> Any:
        _, text = await self._request("GET", endpoint, retry=True)
        return self._parse_json(text, endpoint)

    async def _post_json(self, endpoint: str, body: Optional[dict] = None, *, retry: bool,
                         timeout_s: Optional[float] = None) -> Any:
        _, text = await self._request("POST", endpoint, body, retry=retry, timeout_s=timeout_s)
        return self._parse_json(text, endpoint) if text.strip() else {}

    # ---- generation ----------------------------------------------------------------------------
    async def generate(
        self,
        input_ids: Seq[int],
        sampling_params: Optional[dict] = None,
        *,
        n: int = 1,
        return_logprob: bool = True,
        return_routed_experts: bool = False,
        rid: Optional[str] = None,
        total_timeout_s: Optional[float] = None,
    ) -> list[Sample]:
        """Generate ``n`` samples for one prompt, in sample order; each :class:`Sample`'s rid is its SGLang
        id (:func:`engine_api.sample_rids`). One request, or one per sample (see the module docstring);
        if a sample fails for good the other requests are cancelled."""
        rid = rid or uuid.uuid4().hex
        rids = api.sample_rids(rid, n)
        options = dict(return_logprob=return_logprob, return_routed_experts=return_routed_experts,
                       total_timeout_s=total_timeout_s)
        if self.one_request_per_sample and n > 1:
            pieces = await gather_or_cancel([self._request_samples(input_ids, sampling_params, 1, r, **options)
                                             for r in rids])
            return [s for piece in pieces for s in piece]
        samples = await self._request_samples(input_ids, sampling_params, n, rid, **options)
        for sample, sample_rid in zip(samples, rids):
            sample.rid = sample_rid
        return samples

    async def _request_samples(self, input_ids: Seq[int], sampling_params: Optional[dict], n: int, rid: str, *,
                               return_logprob: bool, return_routed_experts: bool,
                               total_timeout_s: Optional[float]) -> list[Sample]:
        """One /generate request for ``n`` samples, seeded from ``rid``."""
        params = dict(sampling_params or {})
        params["n"] = n
        params["sampling_seed"] = seed_from_rid(rid)  # the request's own, whatever the caller passed
        body = api.generate_body(input_ids, params, rid=rid, return_logprob=return_logprob,
                                 return_routed_experts=return_routed_experts)

        def body_for_attempt(attempt: int) -> dict:
            return {**body, "rid": rid if attempt == 0 else f"{rid}.retry{attempt}"}

        endpoint = api.GENERATE.path
        _, text = await self._request(api.GENERATE.method, endpoint, retry=True, body_for_attempt=body_for_attempt,
                                      total_timeout_s=total_timeout_s)
        data = self._parse_json(text, endpoint)
        items = data if isinstance(data, list) else [data]
        if len(items) != n:
            raise ResponseFormatError(self.base_url + endpoint, "<body>", f"expected {n} result(s); got {len(items)}")
        return [parse_generate_item(item, server=self.base_url, rid=rid, prompt_ids=list(input_ids),
                                    expect_logprobs=return_logprob, expect_routed_experts=return_routed_experts,
                                    routed_experts_shape=self.routed_experts_shape, index=i if n > 1 else None)
                for i, item in enumerate(items)]

    async def generate_batch(self, prompts: Seq[Seq[int]], sampling_params: Optional[dict] = None,
                             **options: Any) -> list[list[Sample]]:
        """:func:`generate_batch` through this client (``n``, ``max_concurrency``, ``rid_prefix``, ...)."""
        return await generate_batch(self, prompts, sampling_params, **options)

    # ---- reads and aborts ------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            await self._request(api.HEALTH.method, api.HEALTH.path, retry=False, timeout_s=timeout_s,
                                total_timeout_s=timeout_s)
            return True
        except (ServerUnavailableError, ServerHTTPError):
            return False

    async def server_info(self) -> dict:
        return await self._get_json(api.SERVER_INFO.path)

    async def model_info(self) -> dict:
        return await self._get_json(api.MODEL_INFO.path)

    async def weight_version(self) -> str:
        version = api.weight_version_of(await self.model_info())
        if version is None:
            raise ResponseFormatError(self.base_url + api.MODEL_INFO.path, "weight_version", "missing")
        return version

    async def abort(self, rid: Optional[str] = None) -> None:
        """Abort one sample's request id (see :func:`engine_api.sample_rids`), or every request when None."""
        await self._post_json(api.ABORT_REQUEST.path, api.abort_body(rid), retry=True)


async def generate_batch(
    target: Any,
    prompts: Seq[Seq[int]],
    sampling_params: Optional[dict] = None,
    *,
    n: int = 1,
    return_logprob: bool = True,
    return_routed_experts: bool = False,
    max_concurrency: int = 256,
    rid_prefix: Optional[str] = None,
) -> list[list[Sample]]:
    """``n`` samples for every prompt through ``target.generate`` (an :class:`SGLangClient`, or anything
    with its ``generate``), at most ``max_concurrency`` prompts at a time; result[i] belongs to
    prompts[i]. Request ids are ``<rid_prefix>-<i>``: they (hence the sampling seeds) depend only on
    the prompt's index, never on which server ran it."""
    prefix = rid_prefix or uuid.uuid4().hex
    gate = asyncio.Semaphore(max_concurrency)

    async def one(i: int, prompt: Seq[int]) -> list[Sample]:
        async with gate:
            return await target.generate(prompt, sampling_params, n=n, return_logprob=return_logprob,
                                         return_routed_experts=return_routed_experts, rid=f"{prefix}-{i}")

    return await gather_or_cancel([one(i, p) for i, p in enumerate(prompts)])


async def gather_or_cancel(coroutines: Seq[Any]) -> list[Any]:
    """The results of ``coroutines`` run concurrently, in order; when one fails for good the others are
    cancelled (and awaited) instead of leaking, and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
