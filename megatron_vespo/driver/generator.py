"""The asynchronous mode's generation worker (rank 0): a thread running an asyncio loop that keeps the
fleet busy and fills the :class:`RolloutBuffer` with scored prompt groups.

- Up to ``rollout.max_concurrency`` prompts are in flight; a new prompt is sent only when the buffer
  admits it (capacity, and the staleness schedule in throttle mode) and no weight push is under way.
- A group is made by the run's rollout function (``rollout.function``, :mod:`megatron_vespo.rollout_function`;
  by default one request for the prompt's n samples, as in the sync loop), whose client calls go through
  this worker. When a group's responses are final it is scored (GRPO needs the whole group) and handed to
  the buffer.
- Weight pushes: :meth:`hold_for_push` stops new requests; with partial rollouts it also aborts
  every request in flight and waits until all have come back. An aborted response keeps its
  generated prefix and log-probs and, after :meth:`release_after_push`, continues under the new
  weights as prompt + prefix with the remaining token budget; the pieces are concatenated. This happens
  inside the client call, so a rollout function (a multi-turn one too) gets whole responses back.
- Each group records the oldest and newest policy version behind its tokens: a request's tokens
  come from versions between the fleet version when it was sent and the version the server reports
  when it ends (equal unless a push happened mid-request, as without partial rollouts); every response
  of the group counts from the group's oldest version.
- Fleet idle time: wall time with no generation request in flight.
- Routed experts (``rollout.return_routed_experts``): the router drops the field, so requests go to
  the router's healthy workers directly (:mod:`rollout_sglang.worker_pool`: least busy first, failover,
  membership re-read from the router). A resumed response keeps, for each segment, the rows of the
  positions that produced that segment's tokens (under the weights that sampled them), so the merged
  response carries one row per token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from megatron_vespo.config.schema import RolloutConfig
from megatron_vespo.data.dataset import PromptRow, PromptSampler
from megatron_vespo.driver.rollout import RolloutGroup, open_target, response_routed_experts, rollout_sampling
from megatron_vespo.rollout_function import load_rollout_function
from megatron_vespo.driver.rollout_buffer import RolloutBuffer
from rollout_sglang.contracts import GenerationTarget
from rollout_sglang.types import Sample

Scorer = Callable[[RolloutGroup], tuple[list[float], dict[str, float]]]
FlatTest = Callable[[RolloutGroup, list[float]], bool]  # zero reward variance: no learning signal
MAX_RESUMES = 16  # a response aborted this often for other reasons than pushes is kept as it is


@dataclass
class GroupPayload:
    """What the buffer holds for one finished group."""

    group: RolloutGroup
    rewards: list[float]
    reward_stats: dict[str, float]
    resumed_responses: int  # responses continued after at least one abort
    submitted_version: int
    flat: bool = False  # zero reward variance (dynamic sampling filters it)


@dataclass(eq=False)
class _Response:
    """One response being built from one or more request segments."""

    prompt_ids: list[int]
    sample: Sample  # the latest segment (finish reason, server, rid)
    output_ids: list[int]
    logprobs: list[float]
    oldest_version: int
    newest_version: int
    resumes: int = 0
    # With routed experts (else None): the original prompt's rows (P - 1; SGLang's layout puts them
    # first) and, per segment, the rows of the positions that produced its tokens.
    routed_prompt: Optional[np.ndarray] = None
    routed_rows: Optional[list[np.ndarray]] = None

    def add_segment(self, piece: Sample, segment_prompt_ids: list[int]) -> None:
        """Append a segment's tokens, log-probs and (if kept) the routed rows that produced them."""
        if self.routed_rows is not None:
            if piece.output_ids:  # an abort before the first token may come back without any rows
                self.routed_rows.append(response_routed_experts(piece, len(segment_prompt_ids)))
            if self.routed_prompt is None and piece.routed_experts is not None \
                    and piece.routed_experts.shape[0] >= len(self.prompt_ids) - 1:
                self.routed_prompt = piece.routed_experts[:len(self.prompt_ids) - 1]
        self.output_ids += piece.output_ids
        self.logprobs += list(piece.output_logprobs or [])
        self.sample = piece

    def needs_continuation(self, max_response_len: int) -> bool:
        return (self.sample.aborted and self.resumes < MAX_RESUMES
                and len(self.output_ids) < max_response_len)

    def merged(self) -> Sample:
        routed = None
        if self.routed_rows is not None:
            routed = self._merged_routed()
        return dataclasses.replace(self.sample, prompt_ids=list(self.prompt_ids), output_ids=list(self.output_ids),
                                   output_logprobs=list(self.logprobs), completion_tokens=len(self.output_ids),
                                   weight_version=str(self.newest_version), routed_experts=routed)

    def _merged_routed(self) -> np.ndarray:
        prompt = self.routed_prompt
        if prompt is None:  # no segment was ever prefilled (no tokens at all): rows that are never compared
            shape = self.sample.routed_experts.shape[1:] if self.sample.routed_experts is not None else None
            if shape is None or len(shape) != 2:
                raise ValueError(f"response {self.sample.rid}: no routed experts came back for any segment")
            prompt = np.zeros((len(self.prompt_ids) - 1, *shape), np.int32)
        return np.concatenate([prompt.astype(np.int32)] + [r.astype(np.int32) for r in self.routed_rows], axis=0)

    @classmethod
    def start(cls, prompt_ids: list[int], first: Sample, oldest: int, newest: int, keep_routed: bool) -> "_Response":
        """A response from its first segment."""
        r = cls(prompt_ids=list(prompt_ids), sample=first, output_ids=[], logprobs=[], oldest_version=oldest,
                newest_version=newest, routed_rows=[] if keep_routed else None)
        r.add_segment(first, prompt_ids)
        return r


@dataclass
class _GroupVersions:
    """The policy versions behind a group's tokens, over all its client calls, and its resumed responses."""

    admitted: int
    oldest: Optional[int] = None
    newest: Optional[int] = None
    resumed: int = 0

    def add(self, responses: list[_Response]) -> None:
        for r in responses:
            self.oldest = r.oldest_version if self.oldest is None else min(self.oldest, r.oldest_version)
            self.newest = r.newest_version if self.newest is None else max(self.newest, r.newest_version)
        self.resumed += sum(1 for r in responses if r.resumes)


def _version_int(version: str, server: str) -> int:
    try:
        return int(version)
    except (TypeError, ValueError):
        raise RuntimeError(f"{server} reports weight_version {version!r}; the asynchronous mode needs the integer "
                           "versions the trainer pushes (optimizer steps)") from None


class BackgroundGenerator:
    """Owns the generation thread; every public method is called from the trainer (main) thread."""

    def __init__(self, url: str, sampler: PromptSampler, cfg: RolloutConfig, buffer: RolloutBuffer, scorer: Scorer,
                 *, partial_rollouts: bool, abort_all: Callable[[], None], version: int, rid_prefix: str,
                 routed_experts_shape: Optional[tuple[int, int]] = None, one_request_per_sample: bool = False,
                 is_flat: Optional[FlatTest] = None, tokenizer: Any = None):
        self.url = url
        self.runner = load_rollout_function(cfg.function)
        self.sampling = rollout_sampling(cfg)
        self.tokenizer = tokenizer  # the rollout function's client.tokenizer
        self.is_flat = is_flat  # dynamic sampling: flat groups are marked for the buffer to filter
        self.one_request_per_sample = one_request_per_sample
        self.routed_experts_shape = routed_experts_shape  # the model's, for workers that do not report theirs
        self.sampler = sampler
        self.cfg = cfg
        self.buffer = buffer
        self.scorer = scorer
        self.partial_rollouts = partial_rollouts
        self.abort_all = abort_all
        self.rid_prefix = rid_prefix
        self._lock = threading.RLock()
        self._version = version
        self._held = False  # a weight push is under way: send nothing
        self._in_flight = 0  # HTTP generation requests
        self._idle_since: Optional[float] = time.monotonic()
        self._idle_total = 0.0
        self._stop = threading.Event()
        self._error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._rows: dict[int, PromptRow] = {}  # ticket -> prompt of every group not yet in the buffer
        self._replay: deque[PromptRow] = deque()  # prompts to send before drawing new ones (resume)
        self._requests = 0
        self._resumed_responses = 0
        self._aborted_responses = 0

    # ---------------------------------------------------------------------------- trainer thread
    def start(self) -> "BackgroundGenerator":
        self._thread = threading.Thread(target=self._thread_main, name="async-generator", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop sending, abort what is in flight, and join the thread."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            try:
                self.abort_all()
            except Exception:  # noqa: BLE001 -- the fleet may already be gone; the thread still ends
                pass
            self._thread.join(timeout_s)

    @property
    def error(self) -> Optional[str]:
        """Why the generation thread died, if it did (the trainer stops waiting for the buffer)."""
        return self._error

    def hold_for_push(self, timeout_s: float) -> float:
        """Stop sending; with partial rollouts abort everything in flight and wait for it. Seconds waited."""
        start = time.monotonic()
        with self._lock:
            self._held = True
        if not self.partial_rollouts:
            return 0.0
        last_abort = float("-inf")
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return time.monotonic() - start
            if self._error is not None:
                raise RuntimeError(f"generation thread failed: {self._error}")
            now = time.monotonic()
            if now - start > timeout_s:
                raise TimeoutError(f"{self._in_flight} generation request(s) still in flight {timeout_s:.0f}s "
                                   "after aborting them for a weight push")
            # Repeated every 50 ms: a request still on its way to a server when an abort arrived runs on.
            # Polled more often than that: the drain usually takes milliseconds, and the trainer waits.
            if now - last_abort >= 0.05:
                self.abort_all()
                last_abort = now
            time.sleep(0.002)

    def release_after_push(self, version: int) -> None:
        with self._lock:
            self._version = version
            self._held = False

    @property
    def lock(self) -> threading.RLock:
        """Held while a prompt is drawn: hold it to read the sampler and :meth:`in_flight_rows` consistently."""
        return self._lock

    def in_flight_rows(self) -> list[PromptRow]:
        """Prompts drawn but not yet in the buffer (a checkpoint replays them on resume)."""
        with self._lock:
            return list(self._replay) + [self._rows[t] for t in sorted(self._rows)]

    def replay(self, rows: list[PromptRow]) -> None:
        """Send these prompts first (call before start())."""
        self._replay.extend(rows)

    def fleet_idle_seconds(self) -> float:
        """Total wall time so far with no generation request in flight."""
        with self._lock:
            extra = time.monotonic() - self._idle_since if self._idle_since is not None else 0.0
            return self._idle_total + extra

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {"async/generate_requests_total": float(self._requests),
                    "async/partial_resumed_responses_total": float(self._resumed_responses),
                    "async/aborted_responses_total": float(self._aborted_responses),
                    "async/requests_in_flight": float(self._in_flight)}

    # ------------------------------------------------------------------------- generation thread
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 -- reported to the trainer, which stops the run
            if not self._stop.is_set():
                self._error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
                self.buffer.close(f"generation thread failed: {type(exc).__name__}: {exc}")

    def _can_send(self) -> bool:
        with self._lock:
            return not self._held and not self._stop.is_set()

    async def _wait_until_sendable(self) -> None:
        while not self._can_send():
            if self._stop.is_set():
                raise asyncio.CancelledError
            await asyncio.sleep(0.01)

    async def _main(self) -> None:
        groups: set[asyncio.Task] = set()
        async with open_target(self.url, self.cfg, self.routed_experts_shape, self.one_request_per_sample) as target:
            try:
                while not self._stop.is_set():
                    failed = [t for t in groups if t.done() and not t.cancelled() and t.exception() is not None]
                    if failed:
                        raise failed[0].exception()
                    groups = {t for t in groups if not t.done()}
                    ticket = None
                    if len(groups) < self.cfg.max_concurrency and self._can_send():
                        with self._lock:
                            version = self._version
                        ticket = self.buffer.try_admit(version)
                    if ticket is None:
                        await asyncio.sleep(0.02)  # admission waits on the trainer: no need to spin
                        continue
                    with self._lock:
                        row = self._replay.popleft() if self._replay else self.sampler.next_batch(1)[0]
                        self._rows[ticket] = row
                    groups.add(asyncio.create_task(self._run_group(target, ticket, row, version)))
            finally:
                for task in groups:
                    task.cancel()
                await asyncio.gather(*groups, return_exceptions=True)

    async def _request(self, target: GenerationTarget, prompt_ids: list[int], params: dict[str, Any], n: int,
                       rid: str) -> tuple[list[Sample], int]:
        """One /generate call; returns its samples and the fleet version when it was sent."""
        await self._wait_until_sendable()
        with self._lock:  # counted before the await, so hold_for_push() waits for it
            self._in_flight += 1
            self._requests += 1
            version = self._version
            if self._idle_since is not None:
                self._idle_total += time.monotonic() - self._idle_since
                self._idle_since = None
        try:
            samples = await target.generate(prompt_ids, params, n=n, return_logprob=True, rid=rid,
                                            return_routed_experts=self.cfg.return_routed_experts)
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle_since = time.monotonic()
        return samples, version

    async def _run_group(self, target: GenerationTarget, ticket: int, row: PromptRow, admitted: int) -> None:
        try:
            payload, oldest, newest, per_response = await self._generate_group(target, ticket, row, admitted)
        except BaseException:
            self.buffer.cancel(ticket)
            raise
        if self._stop.is_set():  # cut short by stop(): not a sample of the policy's full responses
            self.buffer.cancel(ticket)
        else:
            self.buffer.complete(ticket, oldest, newest, per_response, payload, flat=payload.flat,
                                 rewards=payload.rewards)
        with self._lock:  # after complete(): a checkpoint reads these rows first, then the buffer
            self._rows.pop(ticket, None)

    async def _generate_group(self, target: GenerationTarget, ticket: int, row: PromptRow, admitted: int):
        versions = _GroupVersions(admitted)

        async def send(prompt_ids: list[int], params: dict[str, Any], n: int, rid: str) -> list[Sample]:
            return await self._generate_responses(target, prompt_ids, params, n, rid, versions)

        results, generations = await self.runner.run(send, row, self.sampling, f"{self.rid_prefix}-g{ticket}",
                                                      self.tokenizer)
        group = RolloutGroup(row, results, generations)
        rewards, stats = await asyncio.to_thread(self.scorer, group)
        with self._lock:
            self._resumed_responses += versions.resumed
        flat = self.is_flat is not None and self.is_flat(group, rewards)
        payload = GroupPayload(group, rewards, stats, versions.resumed, admitted, flat=flat)
        if versions.oldest is None:  # the function made no request: its tokens are the admission version's
            versions.oldest = versions.newest = admitted
        return payload, versions.oldest, versions.newest, [versions.oldest] * len(results)

    async def _generate_responses(self, target: GenerationTarget, prompt_ids: list[int], params: dict[str, Any],
                                  n: int, rid: str, versions: "_GroupVersions") -> list[Sample]:
        """One client call of the rollout function: ``n`` responses, each continued after aborts (partial
        rollouts) until it ends; their versions are added to the group's."""
        samples, sent_version = await self._request(target, prompt_ids, params, n, rid)
        sent_version = min(sent_version, versions.admitted)
        responses = []
        for s in samples:
            reported = _version_int(s.weight_version, s.server)
            responses.append(_Response.start(prompt_ids, s, oldest=min(sent_version, reported),
                                             newest=max(sent_version, reported),
                                             keep_routed=self.cfg.return_routed_experts))
        if self.partial_rollouts:
            await self._continue_aborted(target, responses, rid, params)
        versions.add(responses)
        return [r.merged() for r in responses]

    async def _continue_aborted(self, target: GenerationTarget, responses: list[_Response], rid: str,
                                params: dict[str, Any]) -> None:
        """Resume every aborted response from its prefix (after the push that aborted it) until it ends or has
        the call's ``max_new_tokens``."""
        budget = int(params.get("max_new_tokens", self.cfg.max_response_len))
        while True:
            todo = [r for r in responses if r.needs_continuation(budget)]
            if not todo:
                return
            with self._lock:
                self._aborted_responses += len(todo)

            async def resume(k: int, r: _Response) -> None:
                piece_params = {**params, "max_new_tokens": budget - len(r.output_ids)}
                r.resumes += 1
                segment_prompt = r.prompt_ids + r.output_ids
                (piece,), version = await self._request(target, segment_prompt, piece_params, 1,
                                                        f"{rid}-r{k}.{r.resumes}")
                reported = _version_int(piece.weight_version, piece.server)
                r.add_segment(piece, segment_prompt)
                r.oldest_version = min(r.oldest_version, version, reported)
                r.newest_version = max(r.newest_version, version, reported)

            await asyncio.gather(*(resume(k, r) for k, r in enumerate(responses) if r in todo))
