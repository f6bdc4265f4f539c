"""The trainer's state out of device memory and back, between the phases of a colocated run (the rollout
engines use the GPUs while the trainer's state waits in host memory).

Three parts, moved separately (:data:`PARTS`):

- ``grads``: Megatron DDP's contiguous gradient buffers (every ``param.main_grad`` is a view of them), through
  Megatron's own ``DistributedDataParallel.offload_grad_buffers`` / ``restore_grad_buffers`` (megatron-core
  0.16.1 through 0.19.x): the storage is freed, not copied, and comes back zeroed, which is what the next
  train step starts from anyway. The optimizer's gradients (main params' ``.grad``) are dropped first
  (``zero_grad``, as the next step would).
- ``params``: every storage the model's parameters live in (the distributed optimizer's contiguous parameter
  buffer, or each parameter's own);
- ``optimizer``: what the optimizer keeps on the device beside the parameters: fp32 main params and the
  state (Adam's moments); storages that belong to the model's parameters or gradients are left to those parts.

Megatron's other facilities are not used, and why: ``_ParamAndGradBuffer.offload_to_cpu(move_params=True)``
covers only the distributed optimizer's parameter buffer and copies with ``tensor.cpu()``, which on a
machine without a GPU returns the tensor itself, so the resize that follows would destroy the only copy;
``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu`` (0.16.1 on) re-point ``.data`` to unpinned copies
and skip every non-CUDA tensor, i.e. do nothing where CI runs. One explicit move serves both parts instead:
a storage's bytes are copied into a host buffer (pinned when CUDA is present; allocated once and reused every
cycle), then the storage is resized to 0 bytes; :meth:`TrainerOffloader.reload` resizes it back and copies
the bytes in. Every view of the storage (parameters inside the parameter buffer, the distributed
optimizer's shard views, ``main_grad``) stays valid and nothing is re-pointed, so the values come back bit
for bit. Only storages on the compute device move (state Megatron already keeps in host memory, such as
``optimizer.cpu_offload``'s, stays). On CPU host and device memory are the same kind, but the move is
the same and just as real: an offloaded storage holds 0 bytes (tested, with training bitwise equal to a
run without offloading, ``tests/multiproc/test_offload.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

PARAMS, GRADS, OPTIMIZER = "params", "grads", "optimizer"
PARTS = (PARAMS, GRADS, OPTIMIZER)


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (a chained one holds one per parameter kind)."""
    if hasattr(optimizer, "chained_optimizers"):
        for inner in optimizer.chained_optimizers:
            yield from torch_optimizers(inner)
    elif isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
    elif getattr(optimizer, "optimizer", None) is not None:
        yield from torch_optimizers(optimizer.optimizer)


@dataclass
class _Moved:
    """One offloaded storage: a tensor on it (to reach it again) and its bytes' host copy."""

    tensor: torch.Tensor
    host: torch.Tensor


class TrainerOffloader:
    """Moves the parts of a trainer's state (:data:`PARTS`) out of device memory and back; see the module
    docstring. Every rank moves its own state: no collective is involved."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer: Any):
        self.chunks = list(model_chunks)
        self.optimizer = optimizer
        self.device_type = _device_type()
        self.offloaded: set[str] = set()
        self._moved: dict[str, list[_Moved]] = {}
        # Per part, id(tensor) -> (tensor, host buffer) of the last move: reused by the next one. Rebuilt at
        # every move, so a tensor the optimizer replaced (a checkpoint load) is not kept alive here.
        self._host: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- what lives where -------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device_type and t.untyped_storage().nbytes() > 0

    @staticmethod
    def _distinct(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> list[torch.Tensor]:
        """One tensor per storage (by its data pointer), leaving out the storages in ``exclude``."""
        seen = set(exclude)
        out = []
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                out.append(t)
        return out

    def _param_tensors(self) -> list[torch.Tensor]:
        return [p for chunk in self.chunks for p in chunk.parameters() if self._on_device(p)]

    def _grad_tensors(self) -> list[torch.Tensor]:
        return [buffer.grad_data for chunk in self.chunks for buffer in self._buffers(chunk)
                if buffer.grad_data is not None and self._on_device(buffer.grad_data)]

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        found = []
        for opt in torch_optimizers(self.optimizer):
            for group in opt.param_groups:
                found += [p for p in group["params"] if isinstance(p, torch.Tensor)]
            for state in opt.state.values():
                found += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return [t for t in found if self._on_device(t)]

    @staticmethod
    def _buffers(chunk: torch.nn.Module) -> list:
        return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))

    def device_bytes(self, part: str) -> int:
        """Bytes of ``part`` in device memory now (0 once offloaded)."""
        if part == PARAMS:
            tensors = self._distinct(self._param_tensors())
        elif part == GRADS:
            tensors = self._distinct(self._grad_tensors())
        else:
            tensors = self._distinct(self._optimizer_tensors(), self._model_storages())
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def _model_storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in self._param_tensors() + self._grad_tensors()}

    # ---- the moves --------------------------------------------------------------------------------
    def offload(self, parts: Sequence[str] = PARTS) -> int:
        """Move ``parts`` (any of :data:`PARTS` still resident) out of device memory; the bytes freed there."""
        parts = [p for p in PARTS if p in parts and p not in self.offloaded]
        freed = 0
        if GRADS in parts or OPTIMIZER in parts:
            self.optimizer.zero_grad()  # the main params' gradients: the next step starts without them anyway
        if OPTIMIZER in parts:  # before the model's parts: its own storages are told apart from theirs
            freed += self._move_out(OPTIMIZER, self._distinct(self._optimizer_tensors(), self._model_storages()))
        if PARAMS in parts:
            freed += self._move_out(PARAMS, self._distinct(self._param_tensors()))
        if GRADS in parts:
            freed += sum(t.untyped_storage().nbytes() for t in self._distinct(self._grad_tensors()))
            cuda = self.device_type == "cuda"
            for chunk in self.chunks:  # Megatron's: the storage is freed, views kept; restored zeroed
                chunk.offload_grad_buffers(synchronize=cuda, empty_cache=False)
            self.offloaded.add(GRADS)
        if self.device_type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back to the driver: the engines allocate next
        return freed

    def _move_out(self, part: str, tensors: list[torch.Tensor]) -> int:
        pinned = [t for t in tensors if not t.untyped_storage().resizable()]
        if pinned:  # checked before anything moves: a part is offloaded whole or not at all
            raise RuntimeError(f"offloading the trainer's {part}: {len(pinned)} storage(s) cannot be freed in place "
                               f"(not resizable, e.g. a numpy view of a CPU tensor pins its storage); the first holds "
                               f"{pinned[0].untyped_storage().nbytes()} bytes, shape {tuple(pinned[0].shape)}")
        moved = []
        previous, self._host[part] = self._host.get(part, {}), {}
        for t in tensors:
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            kept = previous.get(id(t))
            host = kept[1] if kept is not None and kept[0] is t and kept[1].numel() == nbytes else None
            if host is None:  # pinning is slow: a buffer is made once and reused every cycle
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device_type == "cuda")
            self._host[part][id(t)] = (t, host)  # the tensor is held: its id stays its own
            host.copy_(_bytes_view(storage), non_blocking=True)
            moved.append(_Moved(t, host))
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # every copy landed before its storage goes
        for m in moved:
            m.tensor.untyped_storage().resize_(0)
        self._moved[part] = moved
        self.offloaded.add(part)
        return sum(m.host.numel() for m in moved)

    def reload(self, parts: Sequence[str] = PARTS) -> int:
        """Bring ``parts`` back into device memory (each exactly as it left; gradients zeroed); bytes restored."""
        restored = 0
        for part in [p for p in PARTS if p in parts and p in self.offloaded]:
            if part == GRADS:
                for chunk in self.chunks:
                    chunk.restore_grad_buffers(synchronize=False)
                restored += sum(t.untyped_storage().nbytes() for t in self._distinct(self._grad_tensors()))
            else:
                for m in self._moved.pop(part):
                    storage = m.tensor.untyped_storage()
                    storage.resize_(m.host.numel())
                    _bytes_view(storage).copy_(m.host, non_blocking=True)
                    restored += m.host.numel()
            self.offloaded.discard(part)
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # resident before anything reads it
        return restored
