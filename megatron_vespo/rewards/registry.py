"""Verifiers by name, and batch scoring that survives a broken or hanging verifier.

A verifier is ``fn(request: ScoreRequest) -> float``. :func:`score_all` runs each call in a worker
thread with a deadline: an exception or a call past ``timeout_s`` scores 0.0 and is counted in
:class:`RewardStats` (a hung thread cannot be killed; it is abandoned and finishes on its own).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

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
    return sorted(_REGISTRY)


def get_verifier(name: str) -> Verifier:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"reward.verifier: unknown verifier {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def score_all(verifier: Verifier, requests: Sequence[ScoreRequest], timeout_s: float,
              max_workers: int = 8) -> tuple[list[float], RewardStats]:
    """Score every request; a verifier that raises, times out or returns a non-finite value gives 0."""
    stats = RewardStats()
    scores = [0.0] * len(requests)
    pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verifier")
    try:
        futures = [pool.submit(verifier, r) for r in requests]
        deadline_futures = cf.wait(futures, timeout=timeout_s)
        del deadline_futures
        for i, fut in enumerate(futures):
            if not fut.done():
                # Deadline for the whole batch is generous (timeout per call, calls run in parallel);
                # give a late call its own full timeout before giving up on it.
                try:
                    fut.result(timeout=timeout_s)
                except cf.TimeoutError:
                    stats.timeouts += 1
                    fut.cancel()
                    continue
                except Exception:
                    pass
            exc = fut.exception()
            if exc is not None:
                stats.errors += 1
                stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"
                continue
            value = fut.result()
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                stats.errors += 1
                stats.first_error = stats.first_error or f"non-numeric or non-finite score {value!r}"
                continue
            scores[i] = value
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return scores, stats
