"""What every weight-sync transport shares: size-bounded buckets of HF-named tensors, the check of a
server's answer to an update call, SGLang's weight-update session, the restart of servers that a
failed update left half-updated, and the open/commit bookkeeping of a push whose buckets come from
other processes (:class:`OpenPush`)."""
from __future__ import annotations

import contextlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, TypeVar, Union

import torch

from rollout_sglang import engine_api as api
from rollout_sglang.contracts import Bucket, PushTarget
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet, ManagedServer, RestoreDeferred, WeightState
from rollout_sglang.net import http_json

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


def one_dtype_buckets(buckets: Iterable[Bucket], bucket_bytes: int) -> Iterator[Bucket]:
    """The same tensors, in order, re-cut into size-bounded buckets that never mix dtypes.

    A flattened bucket is one byte buffer that SGLang reads back tensor by tensor at byte offsets
    (``FlattenedTensorBucket``); it refuses a tensor at an offset that is not a multiple of its
    element size, which mixing dtypes produces (a bf16 tensor of odd length before an fp32 one)."""
    named = itertools.chain.from_iterable(buckets)
    for _, run in itertools.groupby(named, key=lambda item: item[1].dtype):
        yield from iter_buckets(run, bucket_bytes)


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


def check_update_response(server: Union[ManagedServer, PushTarget], route: api.Route, status: int,
                          data: object) -> None:
    """Raise :class:`WeightSyncError` naming the server unless it answered 200 without ``success: false``."""
    if status != 200 or not isinstance(data, dict) or data.get("success") is False:
        raise WeightSyncError(f"server {server.index} ({server.url}){route.path}: HTTP {status}: {str(data)[:300]}")


def call_checked(fleet: Fleet, servers: list[ManagedServer], route: api.Route, body: dict,
                 timeout_s: float = 600.0) -> None:
    """The same update call to every one of ``servers``; raises naming the first that refused."""
    for server, (status, data) in zip(servers, fleet.call_all(route, body, timeout_s=timeout_s, servers=servers)):
        check_update_response(server, route, status, data)


@contextlib.contextmanager
def weight_update_session(fleet: Fleet, servers: list[ManagedServer]) -> Iterator[None]:
    """SGLang's begin/end weight-update session around distributed and tensor updates (refused outside
    one). The end is sent only when the updates succeeded: a failed update restarts the server anyway."""
    call_checked(fleet, servers, api.BEGIN_WEIGHT_UPDATE, api.begin_weight_update_body(), timeout_s=120)
    yield
    call_checked(fleet, servers, api.END_WEIGHT_UPDATE, api.end_weight_update_body(), timeout_s=600)


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
    for server in servers:  # here, where update_lock is held; the relaunches run in other threads
        fleet.take_out(server)
    with ThreadPoolExecutor(len(servers)) as pool:
        outcomes = list(pool.map(lambda s: _capture(fleet.relaunch, s), servers))
    for server, error in zip(servers, outcomes):
        error = error or _capture(fleet.restore_and_register, server)
        if error is not None:
            logger.error("server %d: restart after the failed update failed: %s", server.index, error)
            if server.state != "failed":
                server.state = "dead"  # the supervisor keeps trying
            fleet.terminate(server)


def push_target(server: ManagedServer) -> PushTarget:
    """How a sender in another process reaches ``server``."""
    return PushTarget(index=server.index, url=server.url, tp=server.cfg.tp)


def post(target: PushTarget, route: api.Route, body: dict, timeout_s: float = 600.0) -> tuple[int, object]:
    """One call to one server from any process (a sender has no fleet); raises OSError when unreachable."""
    return http_json(route.method, target.url + route.path, body, timeout_s=timeout_s)


def defer_to_next_push(server: ManagedServer, weights: WeightState) -> None:
    """Fleet restorer of the streaming transports: without a disk copy of the fleet's version, the weights
    exist only in the live trainer, so the restarted server waits for the next push (see ``Fleet``)."""
    if weights.disk_path is not None:
        raise NotImplementedError  # the fleet's own disk restorer reloads the last complete export
    raise RestoreDeferred


@dataclass
class OpenPush:
    """The fleet owner's state of one push between ``open_push`` and ``commit_push`` / ``abort_push``:
    the servers it updates (those paused by ``Fleet.updating`` and the restarted ones waiting for weights),
    and the context that continues generation when it closes."""

    version: str
    servers: list[ManagedServer]
    awaiting: list[ManagedServer]
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def open(cls, fleet: Fleet, version: str, pause_mode: str, restore_only: bool) -> "OpenPush":
        """Take ``update_lock`` and pause (unless ``restore_only``: only the waiting servers, nobody paused)."""
        stack = contextlib.ExitStack()
        try:
            if restore_only:
                stack.enter_context(fleet.update_lock)
                paused: list[ManagedServer] = []
            else:
                paused = stack.enter_context(fleet.updating(pause_mode))
            awaiting = [s for s in fleet.awaiting_weights() if s not in paused]
        except BaseException:
            stack.close()
            raise
        return cls(version=str(version), servers=paused + awaiting, awaiting=awaiting, stack=stack)

    def register_restored(self, fleet: Fleet) -> None:
        """After a committed push: the waiting servers it brought to the version go back behind the router."""
        for server in self.awaiting:
            try:
                fleet.register_restored(server)
            except Exception as exc:  # noqa: BLE001 -- it is the supervisor's again
                logger.error("server %d: not registered after its restore: %s", server.index, exc)
                fleet.take_out(server)
                fleet.terminate(server)
                server.state = "dead"

    def finish(self, fleet: Fleet, route: api.Route, body: dict, disk_path: Optional[str] = None,
               on_failure: Callable[[], None] = lambda: None) -> None:
        """Commit the push on its servers: ``route`` with ``body`` on every one (the end of the update
        session, or the reload from disk), flush their caches, then record the version and put the
        waiting servers back behind the router. When a server fails, ``on_failure`` runs and the servers
        are restarted at the fleet's version. Always closes the push."""
        try:
            if self.servers:
                try:
                    call_checked(fleet, self.servers, route, body)
                    fleet.flush_cache(self.servers)
                except Exception:
                    on_failure()
                    restart_half_updated(fleet, self.servers)
                    raise
            # With no server to take it (all restarting) the version is still the fleet's: each gets it when back.
            fleet.record_weights(self.version, disk_path=disk_path)
            self.register_restored(fleet)
        finally:
            self.close()

    def abort(self, fleet: Fleet, on_failure: Callable[[], None] = lambda: None) -> None:
        """Give up the push: ``on_failure``, then its servers are restarted at the fleet's version."""
        try:
            on_failure()
            restart_half_updated(fleet, self.servers)
        finally:
            self.close()

    def close(self) -> None:
        self.stack.close()


def push_from_one_process(sync, sender, buckets: Iterable[Bucket], version: str,
                          on_error: Callable[[], None] = lambda: None) -> int:
    """A transport's whole push from this process (every stage's buckets through one ``sender``):
    ``open_push``, every bucket, ``commit_push``; on a failed send ``on_error``, then ``abort_push``."""
    plan = sync.open_push(str(version))
    try:
        sender.begin(plan, 0)
        for bucket, last in with_last(buckets):
            sender.send(bucket, last)
        receipt = sender.end()
    except Exception:
        on_error()
        sync.abort_push()
        raise
    return sync.commit_push([receipt])
