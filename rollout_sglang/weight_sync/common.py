"""What every weight-sync transport shares: size-bounded buckets of HF-named tensors, the check of a
server's answer to an update call, and the restart of servers that a failed update left half-updated."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch

from rollout_sglang.contracts import Bucket
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet, ManagedServer

T = TypeVar("T")

logger = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _named_tensor_bytes(item: tuple[str, torch.Tensor]) -> int:
    return item[1].numel() * item[1].element_size()


def iter_buckets(items: Iterable[T], bucket_bytes: int,
                 nbytes: Callable[[T], int] = _named_tensor_bytes) -> Iterator[list[T]]:
    """Group items (default: ``(name, tensor)`` pairs) in order into buckets of at most
    ``bucket_bytes`` as measured by ``nbytes``; an item bigger than that goes alone."""
    bucket: list[T] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag telling whether it is the last one (one item of lookahead, so a stream of
    buckets is never held in memory to find its end)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def flatten_bucket(bucket: Bucket) -> torch.Tensor:
    """SGLang's FlattenedTensorBucket layout: each tensor's bytes, concatenated in order, as uint8."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def check_update_response(server: ManagedServer, endpoint: str, status: int, data: object) -> None:
    """Raise :class:`WeightSyncError` naming the server unless it answered 200 without ``success: false``."""
    if status != 200 or not isinstance(data, dict) or data.get("success") is False:
        raise WeightSyncError(f"server {server.index} ({server.url}){endpoint}: HTTP {status}: {str(data)[:300]}")


def _capture(fn: Callable, *args) -> Optional[Exception]:
    try:
        fn(*args)
        return None
    except Exception as exc:
        return exc


def restart_half_updated(fleet: Fleet, servers: list[ManagedServer]) -> None:
    """After a failed update every member may hold a mix of versions: restart them at the last good one.

    Runs inside ``Fleet.updating`` (this thread holds ``update_lock``): relaunch concurrently, then
    restore and re-register here.
    """
    if not servers:
        return
    logger.error("weight update failed; restarting %d server(s) at version %s", len(servers), fleet.weights.version)
    with ThreadPoolExecutor(len(servers)) as pool:
        outcomes = list(pool.map(lambda s: _capture(fleet.relaunch, s), servers))
    for server, error in zip(servers, outcomes):
        error = error or _capture(fleet.restore_and_register, server)
        if error is not None:
            logger.error("server %d: restart after the failed update failed: %s", server.index, error)
            if server.state != "failed":
                server.state = "dead"  # the supervisor keeps trying
            fleet.terminate(server)
