"""The remote verifier (``reward.verifier: http``): every response is scored by POSTing it to a URL.

Request body (JSON): ``{"prompt_ids": [...], "response_ids": [...], "response_text": str | null,
"ground_truth": <the row's ground truth>}``; answer: ``{"score": <finite number>}`` with status 200.
``python -m megatron_vespo.rewards.server`` is a reference server that wraps the built-in verifiers.

Failures are per response, like every verifier's (see ``registry.score_all``): the call raises, the
response scores 0 and is counted in ``reward/verifier_errors``, and the first error message (one line,
naming the URL, the attempts and the last error) becomes ``reward/first_error``; a run whose every
response fails stops after ``run.max_failed_steps`` batches with that message.

- Retries: connection errors, timeouts, 5xx and 429 answers are retried ``retries`` times, waiting
  ``backoff_s``, then twice as long before each further attempt. Other 4xx answers are the server
  refusing this request (a bad body, a ground truth it cannot read): retrying would get the same answer.
- Deadline: all attempts of one response, and the wait for a concurrency slot, fit in the registry's
  per-call bound (``reward.timeout_s``): an attempt is given at most the time left, so a response fails
  with the server's last error rather than as an anonymous timeout.
- Concurrency: at most ``max_concurrency`` requests are in flight for the whole process, whichever
  scorer sends them (training batches, asynchronous groups scored in parallel, evaluation).
- A dead server: once a response has used all its retries without a success, later responses make a
  single attempt until one succeeds again, so a dead verifier costs one timeout per response, not
  ``retries + 1`` of them plus the backoff.
"""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from megatron_vespo.rewards.registry import ScoreRequest

# Status codes worth another attempt: the server is overloaded or failed, not refusing the request.
RETRY_STATUS = frozenset({408, 429})
# Time kept back from the registry's deadline so that the verifier's own error (with the URL) is reported.
DEADLINE_MARGIN_S = 0.05


class RemoteVerifierError(RuntimeError):
    """A response could not be scored by the remote verifier (the message is one line)."""


class _Retryable(Exception):
    pass


@dataclass(frozen=True)
class HttpVerifierSettings:
    """What an :class:`HttpVerifier` needs (``reward.http`` plus the per-call bound ``reward.timeout_s``)."""

    url: str
    timeout_s: float
    retries: int
    backoff_s: float
    max_concurrency: int
    deadline_s: float


def request_body(request: ScoreRequest) -> bytes:
    """The JSON body POSTed for ``request`` (the ground truth must be JSON: a string, number or list)."""
    return json.dumps({"prompt_ids": list(request.prompt_ids), "response_ids": list(request.response_ids),
                       "response_text": request.response_text, "ground_truth": request.ground_truth}).encode()


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class HttpVerifier:
    """A :data:`~megatron_vespo.rewards.registry.Verifier` that asks a server (see the module docstring)."""

    def __init__(self, settings: HttpVerifierSettings):
        self.settings = settings
        self.parallel_calls = settings.max_concurrency  # score_all runs this many calls at once (no slot waits)
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._lock = threading.Lock()
        self._server_down = False  # the last response that used all its attempts had no success since
        # A verifier on this machine is reached directly even where http_proxy is set for the outside world.
        host = urllib.parse.urlsplit(settings.url).hostname or ""
        local = host in ("localhost", "::1") or host.startswith("127.")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if local \
            else urllib.request.build_opener()
        self.requests_sent = 0  # every POST, retries included
        self.retries_sent = 0
        self.failed_responses = 0  # responses that could not be scored

    def metrics(self) -> dict[str, float]:
        """Cumulative counters since the run started (exact whichever scorers share the verifier)."""
        with self._lock:
            return {"reward/remote_requests_total": float(self.requests_sent),
                    "reward/remote_retries_total": float(self.retries_sent),
                    "reward/remote_failed_total": float(self.failed_responses)}

    def __call__(self, request: ScoreRequest) -> float:
        s = self.settings
        deadline = time.monotonic() + max(s.deadline_s - DEADLINE_MARGIN_S, 0.0)
        try:
            body = request_body(request)
            if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise RemoteVerifierError(f"http verifier {s.url}: no free request slot within {s.deadline_s:g} s "
                                          f"(reward.http.max_concurrency={s.max_concurrency})")
            try:
                return self._score(body, deadline)
            finally:
                self._slots.release()
        except Exception:
            with self._lock:
                self.failed_responses += 1
            raise

    def _score(self, body: bytes, deadline: float) -> float:
        s = self.settings
        with self._lock:
            attempts = 1 if self._server_down else s.retries + 1
        last_error = "no attempt made"
        made = 0
        for attempt in range(attempts):
            if attempt:
                wait = s.backoff_s * 2 ** (attempt - 1)
                if time.monotonic() + wait >= deadline:
                    break
                time.sleep(wait)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            made += 1
            if attempt:
                with self._lock:
                    self.retries_sent += 1
            try:
                score = self._attempt(body, min(s.timeout_s, left))
            except _Retryable as exc:
                last_error = str(exc)
                continue
            except RemoteVerifierError:  # the server answered (refused, or a bad answer): it is up
                with self._lock:
                    self._server_down = False
                raise
            with self._lock:
                self._server_down = False
            return score
        with self._lock:
            self._server_down = True
        raise RemoteVerifierError(f"http verifier {s.url}: {made} attempt(s) failed "
                                  f"(reward.http.retries={s.retries}); last error: {last_error}")

    def _attempt(self, body: bytes, timeout_s: float) -> float:
        """One POST; a score, :class:`_Retryable` for what another attempt may fix, else
        :class:`RemoteVerifierError`."""
        url = self.settings.url
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with self._lock:
            self.requests_sent += 1
        try:
            with self._opener.open(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _one_line(exc.read().decode(errors="replace"))
            message = f"HTTP {exc.code}: {detail}"
            if exc.code >= 500 or exc.code in RETRY_STATUS:
                raise _Retryable(message) from None
            raise RemoteVerifierError(f"http verifier {url}: refused the request ({message})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, torn
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise _Retryable(_one_line(f"{type(reason).__name__}: {reason}")) from None
        return parse_score(raw, url)


def parse_score(raw: bytes, url: str) -> float:
    """The finite ``score`` of a verifier's answer; :class:`RemoteVerifierError` naming ``url`` otherwise."""
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        text = _one_line(raw.decode(errors="replace"))
        raise RemoteVerifierError(f"http verifier {url}: answer is not JSON: {text!r}") from None
    score = answer.get("score") if isinstance(answer, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RemoteVerifierError(f"http verifier {url}: answer has no finite number 'score': "
                                  f"{_one_line(json.dumps(answer))}")
    return float(score)


_SHARED: dict[HttpVerifierSettings, HttpVerifier] = {}
_SHARED_LOCK = threading.Lock()


def http_verifier(settings: HttpVerifierSettings) -> HttpVerifier:
    """The process's verifier for ``settings``: one per settings, so that the reward and the evaluation share
    the concurrency limit and the dead-server state."""
    with _SHARED_LOCK:
        verifier = _SHARED.get(settings)
        if verifier is None:
            verifier = _SHARED[settings] = HttpVerifier(settings)
        return verifier


def settings_from_config(reward: Any) -> HttpVerifierSettings:
    """:class:`HttpVerifierSettings` from a ``RewardConfig`` (``reward.http`` and ``reward.timeout_s``)."""
    http = reward.http
    if not http.url:
        raise KeyError("reward.verifier: 'http' needs reward.http.url")
    return HttpVerifierSettings(url=http.url, timeout_s=http.timeout_s, retries=http.retries,
                                backoff_s=http.backoff_s, max_concurrency=http.max_concurrency,
                                deadline_s=reward.timeout_s)
