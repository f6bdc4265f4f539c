"""HF-named weights out of a live, parallel Megatron model, in size-bounded buckets (weight sync).

:class:`HFWeightExporter` turns the shards every rank holds (TP slices, EP experts, PP layers) into
full Hugging Face tensors (the file names of :mod:`megatron_vespo.checkpoint.hf_mapping`, which is
also what SGLang's loaders take), one bucket of at most ``bucket_bytes`` at a time:

- **Who yields what.** Each pipeline stage has one *leader*: the rank with tensor-parallel rank 0
  and data(+context)-parallel rank 0 of that stage. The leader of stage ``s`` yields the HF
  tensors of the layers stage ``s`` holds, plus the embedding on the first stage and the final
  norm / output layer on the last (tied embeddings: the first stage's copy only). Together the
  leaders yield the full HF state dict exactly once.
- **How.** Shard metadata is exchanged once (an all-gather of keys and offsets); then, bucket by
  bucket, every rank of a stage sends its main-replica shards of that bucket to the stage leader
  (point-to-point, so TP slices and EP experts arrive without any all-gather), the leader
  assembles the canonical Megatron tensors and converts them to HF tensors.
- **Lockstep.** Every rank of a stage must iterate :meth:`HFWeightExporter.buckets` to the end: it
  yields once per bucket on every rank of the stage (the leader's list holds the tensors, the
  other ranks' lists are empty), so callers may run collectives between buckets. Stages have
  different bucket counts; do not synchronise across stages inside the loop.

Memory: the leader holds one bucket of assembled tensors (``bucket_bytes``, or the one tensor that is
larger). A unit this rank holds whole, in one block of memory (PP, EP and DP layouts; SwiGLU's gate and
up halves of one fc1), is not copied at all: the bucket holds views of the parameters. Pieces from
other ranks whose place in the assembled tensor is contiguous are received straight into it; only
row-parallel slices go through a receive buffer, one piece at a time. HF tensors are views of the
assembled ones where the mapping allows (copies, gate/up halves); a QKV split copies and its assembled
tensor is dropped at once. Other ranks send views of their parameters (made contiguous when they are
not). Everything stays on the parameters' device: a GPU model's buckets are GPU tensors (the
transports send them from there). :func:`prefetched` assembles the next bucket while the current one
is sent: two buckets at most.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping, Transform, Unit, detect_stacked_layers
from megatron_vespo.config.schema import ModelConfig
from megatron_vespo.models.full_state import Shard, local_shards
from rollout_sglang.weight_sync.common import iter_buckets

T = TypeVar("T")


@dataclass(frozen=True)
class _Piece:
    """A main-replica shard of one unit: who holds it and which part of the unit it covers."""

    rank: int
    unit_index: int
    local_index: int  # position in the holder's shard list
    slices: tuple[tuple[int, int], ...]  # (start, length) per unit axis
    dtype: torch.dtype


class HFWeightExporter:
    """Plans, once, which rank sends which shard to which stage leader; then yields HF buckets.

    Collective on construction and on each :meth:`buckets` pass (all ranks of the world).
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module] | torch.nn.Module, model_cfg: ModelConfig,
                 *, bucket_bytes: int = 512 * 2**20, dtype: Optional[torch.dtype] = None):
        from megatron.core import parallel_state as ps

        self.chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        self.dtype = dtype
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        stage = ps.get_pipeline_model_parallel_rank()
        is_leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
        shards = self._main_shards()
        mine = (stage, is_leader, [(s.key, s.global_offset, s.prepend_axis_num, tuple(s.tensor.shape), s.tensor.dtype)
                                   for s in shards])
        if self.distributed:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]

        keys = {key for _, _, metas in everyone for key, *_ in metas}
        self.mapping = Qwen3Mapping(model_cfg, stacked_layers=detect_stacked_layers(keys))
        order = {id(u): i for i, u in enumerate(self.mapping.units)}
        leaders = {st: r for r, (st, lead, _) in enumerate(everyone) if lead}
        if stage not in leaders:
            raise RuntimeError(f"pipeline stage {stage} has no leader (tensor rank 0, data rank 0)")
        self.leader = leaders[stage]
        self.is_leader = self.rank == self.leader

        # Pieces of the units this stage holds, grouped per unit in mapping order.
        pieces: dict[int, list[_Piece]] = {}
        for rank, (st, _, metas) in enumerate(everyone):
            if st != stage:
                continue
            for local_index, (key, offset, prepend, shape, dt) in enumerate(metas):
                unit = self.mapping.unit_at(key, offset[:prepend])
                piece = _Piece(rank, order[id(unit)], local_index,
                               tuple((offset[prepend + a], n) for a, n in enumerate(shape)), dt)
                pieces.setdefault(piece.unit_index, []).append(piece)
        # Aliases (the TE spec's MoE pre-MLP norm) would make a unit appear twice: keep one key's pieces.
        self.units: list[tuple[Unit, list[_Piece]]] = [
            (self.mapping.units[i], _one_cover(self.mapping.units[i], pieces[i])) for i in sorted(pieces)
        ]
        self.buckets_plan = _bucketize(self.units, bucket_bytes)
        self.stage = stage
        self.num_stages = ps.get_pipeline_model_parallel_world_size()
        # Global ranks of every stage (the IPC transport makes a group per stage).
        self.stage_ranks: list[list[int]] = [[r for r, (st, _, _) in enumerate(everyone) if st == s]
                                             for s in range(self.num_stages)]
        self.stage_leaders: list[int] = [leaders[s] for s in range(self.num_stages)]
        # The dtype of the exported tensors (config.json's torch_dtype): the model's, unless converted.
        first = next((dt for _, _, metas in everyone for *_, dt in metas), torch.float32)
        self.hf_dtype: torch.dtype = dtype or first

    def hf_bytes(self) -> int:
        """Bytes of the HF tensors this stage's leader yields per pass (every rank of the stage knows it)."""
        size = torch.empty((), dtype=self.hf_dtype).element_size()
        return sum(unit.numel for unit, _ in self.units) * size

    def _main_shards(self) -> list[Shard]:
        return [s for s in local_shards(self.chunks) if s.main_replica]

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield ``[(hf_name, tensor), ...]`` per bucket (empty lists off the leader); see the module doc.

        Not decorated with ``torch.no_grad()``: torch's generator wrapper keeps the last yielded value while it
        computes the next, i.e. two buckets alive instead of one (``_bucket`` turns gradients off instead)."""
        with torch.no_grad():
            shards = self._main_shards()
        device = shards[0].tensor.device if shards else torch.device("cpu")
        for bucket in self.buckets_plan:
            yield self._bucket(bucket, shards, device)  # (a function: none of its locals outlives the bucket)

    @torch.no_grad()
    def _bucket(self, bucket: list[tuple[Unit, list[_Piece]]], shards: list[Shard],
                device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """One bucket: this rank's pieces sent to the leader, or (leader) received, assembled and converted."""
        requests = []  # (work, buffer): receives straight into place, sends
        strided: list[tuple[int, int, torch.Tensor]] = []  # (source rank, tag, target): received one at a time
        assembled: list[Optional[torch.Tensor]] = []
        for tag, (unit, pieces) in enumerate(bucket):
            if self.is_leader:
                full = _local_view(unit, pieces, shards, self.rank)
                if full is not None:  # this rank holds the unit in one block of memory: no copy
                    assembled.append(full)
                    continue
                full = torch.empty(unit.shape, dtype=pieces[0].dtype, device=device)
                assembled.append(full)
            for j, piece in enumerate(pieces):
                piece_tag = tag * 4096 + j
                if self.is_leader:
                    target = _narrow(full, piece.slices)
                    if piece.rank == self.rank:
                        target.copy_(shards[piece.local_index].tensor)
                    elif target.is_contiguous():  # straight into place, no buffer
                        requests.append((dist.irecv(target, src=piece.rank, tag=piece_tag), None))
                    else:
                        strided.append((piece.rank, piece_tag, target))
                elif piece.rank == self.rank:
                    data = shards[piece.local_index].tensor.contiguous()
                    requests.append((dist.isend(data, dst=self.leader, tag=piece_tag), data))
        target = data = full = None
        # A strided place (a row-parallel slice) cannot take a receive: through a buffer of one piece at a time,
        # so the extra memory stays one piece, not a bucket (the senders' isends are already posted).
        for source, tag, target in strided:
            buffer = torch.empty(target.shape, dtype=target.dtype, device=device)
            dist.recv(buffer, src=source, tag=tag)
            target.copy_(buffer)
        for work, _ in requests:
            work.wait()
        requests = strided = target = buffer = None  # send copies go before the conversion
        out: list[tuple[str, torch.Tensor]] = []
        if self.is_leader:
            for i, (unit, _) in enumerate(bucket):
                full, assembled[i] = assembled[i], None  # the HF tensors keep what they still need
                for name, tensor in self.mapping.megatron_to_hf(unit, full):
                    out.append((name, tensor if self.dtype is None else tensor.to(self.dtype)))
                full = tensor = None
        return out


def _local_view(unit: Unit, pieces: list[_Piece], shards: list[Shard], rank: int) -> Optional[torch.Tensor]:
    """The unit as a view of this rank's memory when its pieces are all here and lie back to back in one
    storage in the unit's own row-major layout (a whole parameter; SwiGLU's gate and up halves of one fc1;
    an expert of a PP/EP layout), else None. The export then sends views of the parameters themselves."""
    if any(p.rank != rank for p in pieces):
        return None
    tensors = [shards[p.local_index].tensor for p in pieces]
    first = tensors[0]
    strides = [1] * len(unit.shape)
    for d in range(len(unit.shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * unit.shape[d + 1]
    base = None
    for piece, t in zip(pieces, tensors):
        if (t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.dtype != first.dtype
                or not t.is_contiguous()):
            return None
        # A row block of the unit (whole along every other axis) is contiguous in the unit's layout.
        if any(sl != (0, unit.shape[d]) for d, sl in enumerate(piece.slices) if d > 0):
            return None
        offset = t.storage_offset() - piece.slices[0][0] * strides[0] if unit.shape else t.storage_offset()
        if base is None:
            base = offset
        elif offset != base:
            return None
    if base < 0 or (base + unit.numel) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return first.as_strided(unit.shape, strides, base)


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items`` produced one ahead in a background thread: the next bucket is assembled (its point-to-point
    transfers and copies run) while the caller sends the current one. At most two items are alive: the one
    the caller holds and the next. The caller must consume to the end (lockstep ranks)."""
    requests: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    device = torch.cuda.current_device() if torch.cuda.is_available() else None  # the current device is per thread

    def produce() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        while requests.get() is not None:
            try:
                results.put(("item", next(items)))
            except StopIteration:
                results.put(("end", None))
                return
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
                results.put(("error", exc))
                return

    worker = threading.Thread(target=produce, name="export-prefetch", daemon=True)
    worker.start()
    requests.put(True)
    try:
        while True:
            kind, item = results.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            requests.put(True)  # assemble the next while the caller uses this one
            yield item
            del item
    finally:
        requests.put(None)
        worker.join()


def _narrow(t: torch.Tensor, slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    for dim, (start, length) in enumerate(slices):
        t = t.narrow(dim, start, length)
    return t


def _one_cover(unit: Unit, pieces: list[_Piece]) -> list[_Piece]:
    """The pieces of one unit, deduplicated (an alias key holds the same slices a second time) and
    checked to cover the unit exactly."""
    seen: dict[tuple, _Piece] = {}
    for p in pieces:
        seen.setdefault(p.slices, p)
    unique = list(seen.values())
    covered = sum(_numel(p.slices) for p in unique)
    if covered != unit.numel:
        raise RuntimeError(f"main-replica shards of {unit.key}{list(unit.prefix)} cover {covered} of "
                           f"{unit.numel} elements")
    return unique


def _numel(slices: tuple[tuple[int, int], ...]) -> int:
    n = 1
    for _, length in slices:
        n *= length
    return n


def _bucketize(units: list[tuple[Unit, list[_Piece]]], bucket_bytes: int) -> list[list[tuple[Unit, list[_Piece]]]]:
    def nbytes(item: tuple[Unit, list[_Piece]]) -> int:
        unit, pieces = item
        # A QKV unit is briefly held twice (fused, and its q/k/v copies): counted twice, so that building a
        # bucket never holds more than bucket_bytes.
        copies = 2 if unit.transform is Transform.QKV else 1
        return copies * unit.numel * torch.empty((), dtype=pieces[0].dtype).element_size()

    return list(iter_buckets(units, bucket_bytes, nbytes))


def iter_hf_weights(model_chunks: Sequence[torch.nn.Module] | torch.nn.Module, model_cfg: ModelConfig,
                    *, bucket_bytes: int = 512 * 2**20, dtype: Optional[torch.dtype] = None
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """One pass of :class:`HFWeightExporter` (plan + buckets). Collective; see the module doc."""
    yield from HFWeightExporter(model_chunks, model_cfg, bucket_bytes=bucket_bytes, dtype=dtype).buckets()


__all__ = ["HFWeightExporter", "iter_hf_weights", "prefetched"]
