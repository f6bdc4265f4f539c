"""Server side of distributed weight updates: join a group as SGLang does, receive broadcasts.

Every update names its tensors in HF checkpoint naming with dtypes and shapes; rank 0 (the trainer)
broadcasts them one by one, or, with ``load_format == "flattened_bucket"``, as one uint8 buffer that
concatenates each tensor's bytes in order (SGLang's FlattenedTensorBucket layout).

Tensors are always received into buffers of their own, never straight into the model's parameters:
the caller checks the whole update and swaps it in only when every tensor is valid, so a bad name or
shape, or a broadcast that dies half-way, leaves the served weights untouched.
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
                load_format: Optional[str] = None, max_numel: Optional[int] = None,
                buffer: Optional[Callable[[str, list[int], torch.dtype], torch.Tensor]] = None,
                ) -> list[tuple[str, torch.Tensor]]:
        """Receive one update's tensors from rank 0 of ``group_name`` into staging buffers.

        Returns every (name, tensor) pair; nothing is loaded into the model here. ``max_numel`` bounds
        the elements an update may declare, so an absurd shape is refused before anything is allocated
        (then without taking part in the broadcast: such a sender is broken anyway). ``buffer(name,
        shape, dtype)`` supplies each tensor's buffer (default: a new one); never a served weight.
        """
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names/dtypes/shapes: lengths differ ({len(names)}, {len(dtypes)}, {len(shapes)})")
        for name, shape in zip(names, shapes):
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise ValueError(f"shapes: {name!r} has shape {shape!r:.80}; expected a list of sizes >= 0")
        total = sum(math.prod(s) for s in shapes)
        if max_numel is not None and total > max_numel:
            raise ValueError(f"shapes: the update declares {total} elements, over this server's bound of {max_numel}")
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
        # Every tensor, even one with a name the model lacks, takes part in the broadcast (the sender
        # would wait forever otherwise); the caller's check reports the bad one afterwards.
        buffer = buffer or (lambda _name, shape, dtype: torch.empty(shape, dtype=dtype))
        tensors = [(name, buffer(name, shape, dtype)) for name, shape, dtype in zip(names, shapes, torch_dtypes)]
        handles = [dist.broadcast(t, group=group, group_src=0, async_op=True) for _, t in tensors]
        for handle in handles:
            handle.wait()
        return tensors
