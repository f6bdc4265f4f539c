"""Async client for SGLang's native HTTP API (works against SGLang, the router, or the CPU server).

Generation sends one request per prompt carrying all of its n samples, so a retry regenerates the
whole group and the caller can never see two copies of a sample: an attempt's output is used only
if that attempt answered. Each attempt gets its own rid (``rid``, ``rid.retry1``, ...) so a server
that still runs an abandoned attempt cannot be confused with the retry, and every request carries
a sampling seed derived from the rid, so a retried group is reproducible.

Retries (exponential backoff) happen only where repeating is safe: connection errors, timeouts
and 5xx on /generate and on read-only or idempotent control calls. Weight updates are never
retried automatically: a half-applied update needs a restart, not a repeat.
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

from rollout_sglang.errors import ResponseFormatError, ServerHTTPError, ServerUnavailableError
from rollout_sglang.types import Sample, parse_generate_item


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a safe request."""

    max_attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 4.0
    multiplier: float = 2.0

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
    ):
        self.base_url = base_url.rstrip("/")
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
        while attempt < attempts:
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
            if attempt < attempts:
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
        """Generate ``n`` samples for one prompt; returns them in sample order."""
        rid = rid or uuid.uuid4().hex
        params = dict(sampling_params or {})
        params["n"] = n
        params.setdefault("sampling_seed", seed_from_rid(rid))
        body = {"input_ids": list(input_ids), "sampling_params": params, "return_logprob": return_logprob,
                "stream": False}
        if return_routed_experts:
            body["return_routed_experts"] = True

        def body_for_attempt(attempt: int) -> dict:
            return {**body, "rid": rid if attempt == 0 else f"{rid}.retry{attempt}"}

        _, text = await self._request("POST", "/generate", retry=True, body_for_attempt=body_for_attempt,
                                      total_timeout_s=total_timeout_s)
        data = self._parse_json(text, "/generate")
        items = data if isinstance(data, list) else [data]
        if len(items) != n:
            raise ResponseFormatError(self.base_url + "/generate", "<body>", f"expected {n} result(s); got {len(items)}")
        return [
            parse_generate_item(item, server=self.base_url, rid=rid, prompt_ids=list(input_ids),
                                expect_logprobs=return_logprob, expect_routed_experts=return_routed_experts,
                                routed_experts_shape=self.routed_experts_shape, index=i if n > 1 else None)
            for i, item in enumerate(items)
        ]

    async def generate_batch(self, prompts: Seq[Seq[int]], sampling_params: Optional[dict] = None,
                             **options: Any) -> list[list[Sample]]:
        """:func:`generate_batch` through this client (``n``, ``max_concurrency``, ``rid_prefix``, ...)."""
        return await generate_batch(self, prompts, sampling_params, **options)

    # ---- control -------------------------------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            await self._request("GET", "/health", retry=False, timeout_s=timeout_s, total_timeout_s=timeout_s)
            return True
        except (ServerUnavailableError, ServerHTTPError):
            return False

    async def server_info(self) -> dict:
        return await self._get_json("/get_server_info")

    async def model_info(self) -> dict:
        return await self._get_json("/get_model_info")

    async def weight_version(self) -> str:
        data = await self._get_json("/get_weight_version")
        if not isinstance(data, dict) or "weight_version" not in data:
            raise ResponseFormatError(self.base_url + "/get_weight_version", "weight_version", "missing")
        return str(data["weight_version"])

    async def flush_cache(self) -> bool:
        """True if flushed; False if the server refused because it is busy (HTTP 400)."""
        try:
            await self._request("POST", "/flush_cache", retry=True)
            return True
        except ServerHTTPError as exc:
            if exc.status == 400:
                return False
            raise

    async def pause(self, mode: str = "abort") -> None:
        await self._post_json("/pause_generation", {"mode": mode}, retry=True)

    async def resume(self) -> None:
        await self._post_json("/continue_generation", {}, retry=True)

    async def abort(self, rid: Optional[str] = None) -> None:
        """Abort one request id, or every request when ``rid`` is None."""
        await self._post_json("/abort_request", {"abort_all": True} if rid is None else {"rid": rid}, retry=True)

    async def update_weights_from_disk(self, model_path: str, weight_version: Optional[str] = None) -> dict:
        body: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._check_success(await self._post_json("/update_weights_from_disk", body, retry=False), "/update_weights_from_disk")

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str) -> dict:
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size, "group_name": group_name, "backend": backend}
        return self._check_success(await self._post_json("/init_weights_update_group", body, retry=False), "/init_weights_update_group")

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, weight_version: Optional[str] = None,
                                              flush_cache: bool = False, load_format: Optional[str] = None) -> dict:
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        if load_format is not None:
            body["load_format"] = load_format
        return self._check_success(await self._post_json("/update_weights_from_distributed", body, retry=False),
                                   "/update_weights_from_distributed")

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *,
                                         load_format: Optional[str] = None, flush_cache: bool = False,
                                         weight_version: Optional[str] = None) -> dict:
        """Colocated engines: ``serialized_named_tensors`` has one entry per TP rank of the engine, each
        a base64 ForkingPickler payload of CUDA-IPC handles (``weight_sync.serialize_for_sglang``)."""
        body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                                "load_format": load_format, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._check_success(await self._post_json("/update_weights_from_tensor", body, retry=False),
                                   "/update_weights_from_tensor")

    async def destroy_weights_update_group(self, group_name: str) -> dict:
        return self._check_success(await self._post_json("/destroy_weights_update_group", {"group_name": group_name},
                                                         retry=False), "/destroy_weights_update_group")

    def _check_success(self, data: Any, endpoint: str) -> dict:
        if not isinstance(data, dict):
            raise ResponseFormatError(self.base_url + endpoint, "<body>", f"expected an object; got {data!r:.80}")
        if data.get("success") is False:
            raise ServerHTTPError(self.base_url, endpoint, 200, str(data.get("message", "")))
        return data


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

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:  # one prompt failed for good: stop the rest instead of leaking them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
