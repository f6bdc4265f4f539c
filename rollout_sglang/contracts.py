"""What the rollout fleet offers the trainer's driver: three small interfaces.

- :class:`GenerationTarget`: where /generate requests go. The router's client
  (:class:`~rollout_sglang.client.SGLangClient`) and the pool of its workers
  (:class:`~rollout_sglang.worker_pool.WorkerPool`, for routed experts) both satisfy it;
  :func:`~rollout_sglang.worker_pool.generation_target` picks one.
- :class:`WeightSync`: a transport that puts new weights on every server, bucket by bucket, under a
  version (disk, distributed broadcast, CUDA IPC: :mod:`rollout_sglang.weight_sync`).
- :class:`RolloutFleet`: the servers behind the router, as the driver sees them: where to send
  requests, the version each server reports, and the control calls around a weight update.
  :class:`~rollout_sglang.fleet.Fleet` satisfies it; the driver never sends raw HTTP itself.

A weight bucket is a list of ``(hf_name, tensor)`` pairs (Hugging Face names and dtypes, what
SGLang's loaders take). Buckets are the unit of transfer: a transport sends each as it comes and
only the last one carries the new version, so a server reports it only once it holds every tensor.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch

from rollout_sglang.types import Sample

Bucket = list[tuple[str, torch.Tensor]]


@runtime_checkable
class GenerationTarget(Protocol):
    """Generation with per-token log-probs; an async context manager (``async with target:``) that owns its
    connections, used from one event loop."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: Any) -> None: ...

    async def generate(self, input_ids: Sequence[int], sampling_params: Optional[dict] = None, *, n: int = 1,
                       return_logprob: bool = True, return_routed_experts: bool = False,
                       rid: Optional[str] = None) -> list[Sample]:
        """``n`` samples of one prompt, in sample order (the request id fixes the sampling seed)."""
        ...


@runtime_checkable
class WeightSync(Protocol):
    """Puts new weights on the fleet. ``push`` pauses generation, sends every bucket, flushes and
    continues; afterwards every healthy server reports ``version``. Returns the bytes sent."""

    def push(self, buckets: Iterable[Bucket], version: str) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class RolloutFleet(Protocol):
    """The rollout servers as the driver sees them (supervision and restarts stay inside the fleet)."""

    @property
    def router_url(self) -> str:
        """Where generation requests go (sglang-router)."""
        ...

    @property
    def one_request_per_sample(self) -> bool:
        """Whether generation must send each sample as its own request (see ``client.py``)."""
        ...

    def weight_versions(self) -> list[Optional[str]]:
        """The weight version each healthy server that answers reports (None where it gave none); a server
        that does not answer is the fleet's to restart, at the current weights."""
        ...

    def abort_all(self) -> None:
        """Abort every request in flight on every healthy server that answers (they return their partial
        output)."""
        ...

    def pause_generation(self, mode: str = "in_place") -> None: ...

    def continue_generation(self) -> None: ...

    def stop(self) -> None:
        """Stop the router and every server."""
        ...
