"""Verifiers by name, and batch scoring that survives a broken or hanging verifier.

A verifier is ``fn(request: ScoreRequest) -> float``. Registered verifiers need no settings; ``http``
(``rewards/http.py``) is built from the run's ``reward`` section, so :func:`get_verifier` takes it.
:func:`score_all` runs each call in its own thread with a deadline: an exception or a call past
``timeout_s`` scores 0.0 and is counted in :class:`RewardStats` (a hung thread cannot be killed;
it is abandoned and finishes on its own).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    from megatron_vespo.config.schema import RewardConfig

Verifier = Callable[["ScoreRequest"], float]


@dataclass(frozen=True)
class ScoreRequest:
    response_ids: list[int]
    response_text: Optional[str]  # None when there is no tokenizer (token-level tasks)
    ground_truth: Any
    prompt_ids: list[int]


@dataclass
class RewardStats:
    errors: int = 0
    timeouts: int = 0
    first_error: str = ""


_REGISTRY: dict[str, Verifier] = {}
# Built from settings (reward.http) rather than registered: one per process and URL (rewards/http.py).
HTTP_VERIFIER = "http"
_BUILTINS_LOADED = False


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    def wrap(fn: Verifier) -> Verifier:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"verifier {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import megatron_vespo.rewards.math  # noqa: F401  (registers "math")
        import megatron_vespo.rewards.synthetic  # noqa: F401  (registers "synthetic")


def registered_verifiers() -> list[str]:
    _load_builtins()
    return sorted([*_REGISTRY, HTTP_VERIFIER])


def get_verifier(name: str, reward: Optional["RewardConfig"] = None) -> Verifier:
    """The verifier called ``name``; ``http`` is built from ``reward`` (``reward.http``, ``reward.timeout_s``)."""
    _load_builtins()
    if name == HTTP_VERIFIER and name not in _REGISTRY:
        if reward is None:
            raise KeyError("reward.verifier: 'http' is built from the run's reward section (reward.http)")
        from megatron_vespo.rewards.http import http_verifier, settings_from_config

        return http_verifier(settings_from_config(reward))
    if name not in _REGISTRY:
        raise KeyError(f"reward.verifier: unknown verifier {name!r}; registered: {', '.join(registered_verifiers())}")
    return _REGISTRY[name]


def _call(verifier: Verifier, request: ScoreRequest, box: dict) -> None:
    try:
        box["value"] = verifier(request)
    except BaseException as exc:  # noqa: BLE001 -- any verifier failure scores 0 and is counted
        box["error"] = exc


def score_all(verifier: Verifier, requests: Sequence[ScoreRequest], timeout_s: float,
              max_workers: Optional[int] = None) -> tuple[list[float], RewardStats]:
    """Score every request; a call that raises, runs past ``timeout_s`` or returns a non-finite
    value scores 0.0 and is counted. Up to ``max_workers`` calls run at once (default: the verifier's
    ``parallel_calls`` if it has one, else 8), each in a daemon thread (a timed-out thread is
    abandoned and its slot reused)."""
    if max_workers is None:
        max_workers = int(getattr(verifier, "parallel_calls", 8))
    stats = RewardStats()
    scores = [0.0] * len(requests)
    pending = list(range(len(requests)))[::-1]
    running: dict[int, tuple[threading.Thread, float, dict]] = {}
    while pending or running:
        while pending and len(running) < max_workers:
            i = pending.pop()
            box: dict = {}
            thread = threading.Thread(target=_call, args=(verifier, requests[i], box), daemon=True,
                                      name=f"verifier-{i}")
            thread.start()
            running[i] = (thread, time.monotonic(), box)
        oldest_i = min(running, key=lambda k: running[k][1])
        thread, started, _ = running[oldest_i]
        thread.join(timeout=max(0.0, started + timeout_s - time.monotonic()))
        now = time.monotonic()
        for i, (thread, started, box) in list(running.items()):
            if thread.is_alive():
                if now - started >= timeout_s:
                    stats.timeouts += 1
                    del running[i]
                continue
            del running[i]
            if "error" in box:
                exc = box["error"]
                stats.errors += 1
                stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"
                continue
            try:
                value = float(box.get("value"))
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                stats.errors += 1
                stats.first_error = stats.first_error or f"non-finite or non-numeric score {box.get('value')!r}"
                continue
            scores[i] = value
    return scores, stats
