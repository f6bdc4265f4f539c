"""The trainer's weights on the fleet, streamed: each pipeline stage sends its own buckets.

:meth:`WeightPublisher.publish` is collective (every trainer rank calls it). Nothing is gathered to one
process and nothing is pickled but small plans and receipts:

1. rank 0, which owns the fleet, opens the push (:meth:`StagedWeightSync.open_push`: pause, session; for
   the broadcast transport, the group names) and broadcasts the resulting
   :class:`~rollout_sglang.contracts.PushPlan` to every rank;
2. the pipeline stages take turns, stage 0 first. In its turn every rank of the stage walks the
   :class:`~megatron_vespo.checkpoint.export.HFWeightExporter` (per bucket: the stage's TP / EP / ETP
   shards of exactly that bucket's tensors go to the stage's source rank, which converts them to HF
   tensors on device), and the source rank hands each bucket to its
   :class:`~rollout_sglang.contracts.WeightSender`, which sends it to the servers directly (a broadcast
   over the stage's own group, a safetensors shard, CUDA-IPC handles). The other stages wait at the end
   of the turn: SGLang handles one update at a time, so stages never send at once, and each stage's
   memory holds at most its current bucket;
3. a small all-gather closes each turn (did the stage succeed; its receipt), so every rank knows the
   outcome; rank 0 commits the push (session end, flush, version; the disk transport's index and rename)
   or aborts it (half-updated servers restarted at the last good version), and a failed push is tried
   once more.

A server the fleet restarts cannot be given weights from a copy (none is kept): it waits outside the
router until a push includes it — the next :meth:`publish`, or :meth:`catch_up` at a point where the
live model still is the fleet's version (the synchronous loop calls it before each rollout). With the
disk transport it reloads the last committed version by itself.

``around_push`` wraps the push on rank 0: the asynchronous loop holds generation there.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter, prefetched
from megatron_vespo.driver.run_health import CannotLearnError, check_finite_weights
from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import PushPlan, RolloutFleet, StagedWeightSync, WeightSender
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.weight_sync import make_sender
from rollout_sglang.weight_sync.disk import ShardWriter, commit_version_dir

PUSH_ATTEMPTS = 2  # a push that fails once (a server died mid-push) is tried again
ADDRESS_ENV = "VESPO_WEIGHT_SYNC_ADDR"  # where servers reach this node's stage source ranks (broadcast groups)


CANNOT_LEARN = "CannotLearnError: "  # how a stage reports non-finite weights in its error string


def _raise_cannot_learn(errors: list[str]) -> None:
    """Non-finite weights found by a stage: raised as :class:`CannotLearnError` on every rank."""
    for error in errors:
        if error.startswith(CANNOT_LEARN):
            raise CannotLearnError(error[len(CANNOT_LEARN):])


@dataclass
class PublishStats:
    """One push: bytes sent per engine (every engine gets the whole model) and wall time."""

    version: str
    bytes: int
    seconds: float
    servers: int
    phases: dict = field(default_factory=dict)  # seconds: open (pause, session), send (every stage), close


class WeightPublisher:
    """Streams the trainer's weights to the fleet (see the module docstring). Built on every rank."""

    def __init__(self, exporter: HFWeightExporter, cfg: WeightSyncConfig):
        self.exporter = exporter
        self.cfg = cfg
        self.version = "0"  # the version the fleet holds (= optimizer steps at the last push)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.fleet: Optional[RolloutFleet] = None  # rank 0, once connected
        self.sync: Optional[StagedWeightSync] = None  # rank 0, once connected
        self.around_push: Callable[[], ContextManager] = contextlib.nullcontext
        self._sender: Optional[WeightSender] = None  # stage source ranks, made at their first turn
        # Control messages (plans, receipts) over gloo whatever the trainer's backend: no GPU sync for them.
        self._group = None
        if self.distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        self._stage_comm = self._make_stage_comm() if cfg.transport == "ipc" and self.distributed else None

    # ---- wiring --------------------------------------------------------------------------------------
    def connect(self, fleet: RolloutFleet, sync: StagedWeightSync) -> None:
        """Rank 0: the fleet and the owner's side of its transport."""
        self.fleet, self.sync = fleet, sync

    def _make_stage_comm(self):
        """IPC: every rank of a stage sends from its own GPU; the stage's groups (collective: every rank makes
        every stage's gloo group, in the same order)."""
        from megatron.core import parallel_state as ps

        from rollout_sglang.weight_sync.ipc import StageComm

        objects = None
        for ranks in self.exporter.stage_ranks:
            group = dist.new_group(ranks, backend="gloo")
            if self.rank in ranks:
                objects = group
        return StageComm(tensors=ps.get_tensor_and_data_parallel_group(with_context_parallel=True), objects=objects,
                         leader=self.exporter.stage_leaders[self.exporter.stage], rank=self.rank)

    def _stage_sender(self) -> WeightSender:
        if self._sender is None:
            self._sender = make_sender(self.cfg, address=self._address(), stage_comm=self._stage_comm)
        return self._sender

    def _address(self) -> str:
        """Where servers reach this process: rank 0's configured address on rank 0's node, else this node's
        (``VESPO_WEIGHT_SYNC_ADDR`` overrides)."""
        if os.environ.get(ADDRESS_ENV):
            return os.environ[ADDRESS_ENV]
        if self.rank == 0 or self.cfg.master_address in ("127.0.0.1", "localhost"):
            return self.cfg.master_address
        return socket.gethostbyname(socket.gethostname())

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # ---- collectives (small objects only) --------------------------------------------------------------
    def _broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _all_gather(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self._group)
        return out

    # ---- the push ---------------------------------------------------------------------------------------
    def publish(self, version: str, restore_only: bool = False, check_finite: Optional[str] = None) -> PublishStats:
        """Collective: the current weights to every server as ``version`` (``restore_only``: only to the
        restarted servers that wait for weights, at the fleet's version); rank 0 then checks that every server
        reports it. A failed push is tried once more (the fleet restarted what it half-updated). ``check_finite``
        (a description of the weights): every HF tensor is checked for NaN / Inf by the rank that sends it, and
        :class:`CannotLearnError` names the first bad one (raised everywhere, not retried)."""
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                stats = self._publish_once(str(version), restore_only, check_finite)
                break
            except WeightSyncError as exc:
                if attempt == PUSH_ATTEMPTS:
                    raise
                if self.rank == 0:
                    print(f"[weights] push of version {version} failed ({exc}); the fleet is back at version "
                          f"{self.version}; pushing again", flush=True)
        if not restore_only:
            self.version = str(version)
        if self.rank == 0:
            self._check_versions(str(version))
        return stats

    def catch_up(self) -> Optional[PublishStats]:
        """Collective: when restarted servers wait for weights, push the fleet's version to them only. Call it
        where the live model is that version (after a push, before the next optimizer step)."""
        waiting = self._broadcast(bool(self.fleet.awaiting_weights()) if self.rank == 0 else None)
        return self.publish(self.version, restore_only=True) if waiting else None

    def _check_versions(self, version: str) -> None:
        reported = self.fleet.weight_versions()
        if any(v != version for v in reported):
            raise WeightSyncError(f"weight sync: pushed version {version}, servers report {reported}")
        if not reported:
            print(f"[weights] version {version}: no server answered (restarting); each gets it when it is back",
                  flush=True)

    def _publish_once(self, version: str, restore_only: bool, check_finite: Optional[str] = None) -> PublishStats:
        t0 = time.monotonic()
        hold = self.around_push() if self.rank == 0 else contextlib.nullcontext()
        with hold:
            opened = None
            if self.rank == 0:
                try:
                    opened = {"plan": self.sync.open_push(version, restore_only=restore_only)}
                except Exception as exc:  # noqa: BLE001 -- every rank must learn it, then it is raised
                    opened = {"error": f"{type(exc).__name__}: {exc}"}
            opened = self._broadcast(opened)
            if "error" in opened:
                raise WeightSyncError(f"opening the push of version {version} failed: {opened['error']}")
            plan: PushPlan = opened["plan"]
            t1 = time.monotonic()
            receipts, errors = self._stream(plan, check_finite) if plan.targets or plan.directory else ([], [])
            t2 = time.monotonic()
            outcome = None
            if self.rank == 0:
                outcome = self._close_push(receipts, errors)
            outcome = self._broadcast(outcome)
        if "error" in outcome:
            if self._sender is not None:
                self._sender.reset()
            _raise_cannot_learn(errors)
            raise WeightSyncError(outcome["error"])
        t3 = time.monotonic()
        return PublishStats(version=version, bytes=outcome["bytes"], seconds=t3 - t0, servers=len(plan.targets),
                            phases={"open": t1 - t0, "send": t2 - t1, "close": t3 - t2, **outcome.get("timing", {})})

    def _close_push(self, receipts: list[dict], errors: list[str]) -> dict:
        """Rank 0: commit when every stage succeeded, else abort; what every rank is told."""
        if errors:
            try:
                self.sync.abort_push()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"abort: {type(exc).__name__}: {exc}")
            return {"error": "; ".join(errors)}
        try:
            timing = {k: sum(float(r.get(k, 0.0)) for r in receipts if r) for k in ("broadcast_s", "answer_s")}
            return {"bytes": self.sync.commit_push(receipts), "timing": timing}
        except Exception as exc:  # noqa: BLE001
            return {"error": f"commit: {type(exc).__name__}: {exc}"}

    def _stream(self, plan: PushPlan, check_finite: Optional[str] = None) -> tuple[list[dict], list[str]]:
        """Every stage in turn sends its buckets through its source rank's sender; every rank returns the
        receipts and errors of all stages (each turn ends with an all-gather of the stage's outcome)."""
        receipts: list[dict] = []
        errors: list[str] = []
        exporter = self.exporter
        for stage in range(exporter.num_stages):
            mine: Optional[tuple[Optional[dict], Optional[str]]] = None
            if stage == exporter.stage and not errors:
                mine = self._send_stage(plan, last_stage=stage == exporter.num_stages - 1, check_finite=check_finite)
            for outcome in self._all_gather(mine):
                if outcome is None:
                    continue
                receipt, error = outcome
                if error is not None:
                    errors.append(error)
                elif receipt is not None:
                    receipts.append(receipt)
            if errors:
                break  # the later stages do not send; the push is aborted
        return receipts, errors

    def _send_stage(self, plan: PushPlan, last_stage: bool,
                    check_finite: Optional[str] = None) -> tuple[Optional[dict], Optional[str]]:
        """This rank's part of its stage's turn. Every rank of the stage walks the exporter to its end (its
        point-to-point transfers are lockstep); the source rank also sends. Returns (receipt, error) on the
        source rank, (None, None) elsewhere."""
        exporter = self.exporter
        # The source rank sends; with a stage-collective sender (IPC) every rank of the stage takes part.
        sender = self._stage_sender() if exporter.is_leader or self._stage_comm is not None else None
        error: Optional[str] = None
        try:
            if sender is not None:
                sender.begin(plan, exporter.stage)
        except Exception as exc:  # noqa: BLE001
            error = f"stage {exporter.stage}: {type(exc).__name__}: {exc}"
        remaining = len(exporter.buckets_plan)
        # No enumerate/zip around the buckets: their cached result tuple would keep the previous bucket alive
        # while the next one is assembled (two buckets instead of one).
        for bucket in prefetched(exporter.buckets()):  # the next bucket is assembled while this one is sent
            remaining -= 1
            # A stage-collective sender is called even after a failure: it tells the stage's other ranks.
            if sender is not None and (error is None or self._stage_comm is not None):
                try:
                    if check_finite is not None and error is None:
                        check_finite_weights(bucket, check_finite)
                    sender.send(bucket, last=last_stage and remaining == 0)
                except CannotLearnError as exc:  # kept whole: it is raised as itself on every rank
                    error = error or f"{CANNOT_LEARN}{exc}"
                except Exception as exc:  # noqa: BLE001 -- keep walking: the stage's other ranks are in lockstep
                    error = error or f"stage {exporter.stage}: {type(exc).__name__}: {exc}"
            del bucket
        if sender is None:
            return None, None
        if error is not None:
            return None, error
        try:
            receipt = sender.end()
            return (receipt, None) if exporter.is_leader else (None, None)
        except Exception as exc:  # noqa: BLE001
            return None, f"stage {exporter.stage}: {type(exc).__name__}: {exc}"

    # ---- an HF directory, without a fleet -------------------------------------------------------------------
    def export_hf_dir(self, directory: Path, write_config: Callable[[Path], None],
                      check_finite: Optional[str] = None) -> Path:
        """Collective: the current weights as an HF directory (each stage's source rank writes its own
        shards, rank 0 the index and ``write_config(dir)``'s files, then renames it into place). What the CPU
        fleet boots from; a shared filesystem when the trainer spans nodes."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
            tmp.mkdir(parents=True)
        self._broadcast(None)  # the directory exists before any stage writes into it
        plan = PushPlan(version=self.version, directory=str(tmp))
        writer = ShardWriter()
        saved, self._sender = self._sender, writer
        try:
            receipts, errors = self._stream(plan, check_finite)
        finally:
            self._sender = saved
        _raise_cannot_learn(errors)
        if errors:
            raise WeightSyncError(f"exporting {directory} failed: {'; '.join(errors)}")
        result = None
        if self.rank == 0:
            try:
                write_config(tmp)
                commit_version_dir(tmp, receipts)  # the index, then the rename to ``directory``
                result = {"ok": str(directory)}
            except Exception as exc:  # noqa: BLE001
                result = {"error": f"{type(exc).__name__}: {exc}"}
        result = self._broadcast(result)
        if "error" in result:
            raise WeightSyncError(f"exporting {directory} failed: {result['error']}")
        return directory
