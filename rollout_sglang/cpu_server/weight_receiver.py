"""Server side of distributed weight updates: join a group as SGLang does, receive broadcasts.

Every update names its tensors in HF checkpoint naming with dtypes and shapes; rank 0 (the trainer)
broadcasts them one by one, or, with ``load_format == "flattened_bucket"``, as one uint8 buffer that
concatenates each tensor's bytes in order (SGLang's FlattenedTensorBucket layout).
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' -> torch.bfloat16; ValueError for anything else."""
    short = name.removeprefix("torch.")
    dtype = getattr(torch, short, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: unknown torch dtype {name!r}")
    return dtype


class WeightReceiver:
    """The process groups this server has joined, by group name."""

    def __init__(self) -> None:
        self._groups: dict[str, dist.ProcessGroup] = {}
        self._lock = threading.Lock()

    def init_group(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str, tp_rank: int = 0) -> None:
        with self._lock:
            if group_name in self._groups:
                raise ValueError(f"group_name: {group_name!r} already initialised; destroy it first")
        group = init_custom_process_group(
            backend=backend, master_address=master_address, master_port=master_port,
            world_size=world_size, rank=rank_offset + tp_rank, group_name=group_name,
        )
        with self._lock:
            self._groups[group_name] = group

    def destroy_group(self, group_name: str) -> None:
        with self._lock:
            group = self._groups.pop(group_name, None)
        if group is None:
            raise ValueError(f"group_name: {group_name!r} is not initialised")
        destroy_custom_process_group(group)

    def destroy_all(self) -> None:
        """Leave every group (at shutdown, so gloo threads are not torn down mid-flight)."""
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            destroy_custom_process_group(group)

    def receive(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                load_format: Optional[str] = None,
                destination: Optional[Callable[[str], Optional[torch.Tensor]]] = None) -> list[tuple[str, torch.Tensor]]:
        """Receive one update's tensors from rank 0 of ``group_name``.

        Returns the (name, tensor) pairs still to be loaded; tensors received in place through
        ``destination(name)`` are already in the model (the caller holds the model lock).
        """
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names/dtypes/shapes: lengths differ ({len(names)}, {len(dtypes)}, {len(shapes)})")
        with self._lock:
            group = self._groups.get(group_name)
        if group is None:
            raise ValueError(f"group_name: {group_name!r} is not initialised; call /init_weights_update_group first")
        torch_dtypes = [parse_dtype(d) for d in dtypes]
        if load_format == "flattened_bucket":
            sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, torch_dtypes)]
            offset = 0
            for name, dtype, size in zip(names, torch_dtypes, sizes):  # as SGLang's FlattenedTensorBucket.empty
                if offset % dtype.itemsize:
                    raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
                offset += size
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            dist.broadcast(flat, group=group, group_src=0)
            out, offset = [], 0
            for name, shape, dtype, size in zip(names, shapes, torch_dtypes, sizes):
                out.append((name, flat[offset:offset + size].view(dtype).reshape(shape)))
                offset += size
            return out
        if load_format not in (None, "direct"):
            raise ValueError(f"load_format: expected null or 'flattened_bucket'; got {load_format!r}")
        # Receive straight into the model's parameters where layout and dtype allow (no extra copy);
        # anything else lands in a temporary that the caller copies in.
        tensors, buffers = [], []
        for name, shape, dtype in zip(names, shapes, torch_dtypes):
            try:
                dst = destination(name) if destination is not None else None
            except ValueError:
                dst = None  # still take part in the broadcast; loading reports the bad name afterwards
            if dst is not None and dst.dtype == dtype and list(dst.shape) == list(shape) and dst.is_contiguous():
                buffers.append(dst)
            else:
                tmp = torch.empty(shape, dtype=dtype)
                tensors.append((name, tmp))
                buffers.append(tmp)
        handles = [dist.broadcast(b, group=group, group_src=0, async_op=True) for b in buffers]
        for handle in handles:
            handle.wait()
        return tensors
