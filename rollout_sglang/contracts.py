"""What the rollout fleet offers the trainer's driver: three small interfaces.

- :class:`GenerationTarget`: where /generate requests go. The router's client
  (:class:`~rollout_sglang.client.SGLangClient`) and the pool of its workers
  (:class:`~rollout_sglang.worker_pool.WorkerPool`, for routed experts) both satisfy it;
  :func:`~rollout_sglang.worker_pool.generation_target` picks one.
- :class:`WeightSync`: a transport that puts new weights on every server, bucket by bucket, under a
  version (disk, distributed broadcast, CUDA IPC: :mod:`rollout_sglang.weight_sync`).
- :class:`StagedWeightSync` and :class:`WeightSender`: the same push split between the process that owns
  the fleet (opens and commits it: pause, session, flush, version) and the processes that hold the
  tensors (one source per pipeline stage; each sends its own buckets straight to the servers), so that
  no process ever holds the whole model. The :class:`PushPlan` is all that crosses between them.
- :class:`RolloutFleet`: the servers behind the router, as the driver sees them: where to send
  requests, the version each server reports, and the control calls around a weight update.
  :class:`~rollout_sglang.fleet.Fleet` satisfies it; the driver never sends raw HTTP itself.

A weight bucket is a list of ``(hf_name, tensor)`` pairs (Hugging Face names and dtypes, what
SGLang's loaders take). Buckets are the unit of transfer: a transport sends each as it comes and
only the last one carries the new version, so a server reports it only once it holds every tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class PushTarget:
    """One server a push updates, as any trainer process reaches it (picklable, no fleet needed)."""

    index: int
    url: str
    tp: int = 1  # ranks the server takes in a weight-sync group
    gpus: tuple[str, ...] = ()  # IPC: the physical GPU (index or UUID) of each of its TP ranks, when known


@dataclass(frozen=True)
class PushPlan:
    """What the fleet's owner tells every sender when it opens a push: small and picklable (no tensors).

    ``group_prefix`` (broadcast): stage ``s`` sends over the group ``f"{group_prefix}_pp{s}"`` with exactly
    ``targets``; a new prefix means the membership changed and the groups are formed again.
    ``directory`` (disk): where every stage writes its shard files."""

    version: str
    targets: tuple[PushTarget, ...] = ()
    group_prefix: str = ""
    directory: str = ""
    extra: dict = field(default_factory=dict)


@runtime_checkable
class WeightSender(Protocol):
    """The source of one pipeline stage's buckets (any trainer process). Stages send one after another:
    the caller serialises them, so two stages never send at once (an engine handles one update at a time)."""

    def begin(self, plan: PushPlan, stage: int) -> None:
        """Get ready to send this stage's buckets of ``plan`` (e.g. join or form the stage's group)."""
        ...

    def send(self, bucket: Bucket, last: bool) -> None:
        """One bucket to every target; ``last``: the last bucket of the whole push (it carries the version)."""
        ...

    def end(self) -> dict:
        """This stage is done; a small picklable receipt for the owner's commit (bytes, files written)."""
        ...

    def reset(self) -> None:
        """After a failed push: drop what the failure left unusable (a broken group)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StagedWeightSync(WeightSync, Protocol):
    """The fleet owner's side of a push whose buckets come from other processes (:class:`WeightSender`).
    ``open_push`` -> every stage's sender sends -> ``commit_push`` (or ``abort_push`` on any failure)."""

    def open_push(self, version: str, restore_only: bool = False) -> PushPlan:
        """Pause and open the update on every server that takes it (``restore_only``: only the restarted servers
        that wait for the fleet's weights, without pausing the others); the plan the senders follow."""
        ...

    def commit_push(self, receipts: list[dict]) -> int:
        """Every sender succeeded: finish the update (session end, flush, version), continue; bytes pushed."""
        ...

    def abort_push(self) -> None:
        """Some sender failed: restart the half-updated servers at the last good version, continue."""
        ...

    def sender(self) -> WeightSender:
        """A sender of this transport for the owner's own process (e.g. when it also leads a stage)."""
        ...


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

    def awaiting_weights(self) -> list[Any]:
        """Restarted servers that wait outside the router for the trainer's next push (no copy of the fleet's
        weights exists to restore them from)."""
        ...

    def abort_all(self) -> None:
        """Abort every request in flight on every healthy server that answers (they return their partial
        output)."""
        ...

    def pause_generation(self, mode: str = "in_place") -> None: ...

    def continue_generation(self) -> None:
        """Continue generation (a server with released memory stays paused until it is resumed)."""
        ...

    def release_memory_occupation(self, tags: Sequence[str]) -> list[Any]:
        """Colocated placement: pause, then release these memory regions (``engine_api.MEMORY_TAGS``) on every
        server; returns the servers that released."""
        ...

    def resume_memory_occupation(self, tags: Sequence[str]) -> list[Any]:
        """Give back these regions on every server that released them; returns the servers that resumed."""
        ...

    def resident_memory(self) -> dict[int, int]:
        """Resident bytes of each server process on this node, by server index (CPU servers' memory)."""
        ...

    def stop(self) -> None:
        """Stop the router and every server."""
        ...
