"""MetricBag: named training statistics that reduce correctly over micro-batches and ranks.

A statistic is stored as the parts that combine by a plain SUM, MAX or MIN, never as a finished
average, so that merging micro-batches and all-reducing over data-parallel ranks gives exactly the
statistic of the whole mini-batch:

- ``mean``: (sum, count)           -> sum / count
- ``std``:  (sum, sum of squares, count) -> population standard deviation
- ``sum``:  (sum,)                 -> sum
- ``max``:  (max,)  ``min``: (min,)

Values stay as detached float64 tensors on the device they came from until :meth:`MetricBag.compute`,
which moves everything to the host in one transfer (no per-metric synchronisation inside the step).

Empty groups: :meth:`compute` leaves out a ``mean`` or ``std`` whose count is 0 and a ``max``/``min``
that never saw a value; a ``sum`` is always reported (0 when nothing was added). So every key that
is present holds a finite number built from real data (given finite inputs).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist

Number = Union[float, int, torch.Tensor]

# Kind -> the reduction op of each stored part.
_PARTS: dict[str, tuple[str, ...]] = {
    "mean": ("sum", "sum"),
    "std": ("sum", "sum", "sum"),
    "sum": ("sum",),
    "max": ("max",),
    "min": ("min",),
}
_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}


def _as_tensor(values: Number) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    return torch.tensor(float(values), dtype=torch.float64)


def _masked(values: Number, mask: Optional[torch.Tensor],
            weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values with masked-out entries zeroed, per-entry weights (0 where masked out), keep mask).

    Uses torch.where rather than boolean indexing: indexing would synchronise with the device to
    learn the output size, once per metric."""
    x = _as_tensor(values).reshape(-1)
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.detach().reshape(-1).to(torch.bool)
    if weights is None:
        w = keep.to(torch.float64)
    else:
        w = torch.where(keep, _as_tensor(weights).reshape(-1), 0.0)
        keep = keep & (w != 0)  # a zero weight drops the value entirely (no 0 * inf = nan)
    return torch.where(keep, x, 0.0), w, keep


def _masked_extreme(values: Number, mask: Optional[torch.Tensor], op: str) -> torch.Tensor:
    x = _as_tensor(values).reshape(-1)
    identity = torch.full((1,), _IDENTITY[op], dtype=torch.float64, device=x.device)
    if mask is not None:
        x = torch.where(mask.detach().reshape(-1).to(torch.bool), x, identity)
    both = torch.cat([x, identity])  # the identity element makes an empty input well defined
    return both.max() if op == "max" else both.min()


class MetricBag:
    """Accumulates named statistics; see the module docstring for the reduction of each kind."""

    def __init__(self) -> None:
        # name -> (kind, list of 0-dim float64 tensors, one per stored part)
        self._entries: dict[str, tuple[str, list[torch.Tensor]]] = {}

    # ----------------------------------------------------------------------------------- adding
    def _accumulate(self, name: str, kind: str, parts: list[torch.Tensor]) -> None:
        entry = self._entries.get(name)
        if entry is None:
            self._entries[name] = (kind, parts)
            return
        if entry[0] != kind:
            raise ValueError(f"metric {name!r} was added as {entry[0]!r}; cannot add it as {kind!r}")
        old = entry[1]
        ops = _PARTS[kind]
        for i, op in enumerate(ops):
            if op == "sum":
                old[i] = old[i] + parts[i].to(old[i].device)
            elif op == "max":
                old[i] = torch.maximum(old[i], parts[i].to(old[i].device))
            else:
                old[i] = torch.minimum(old[i], parts[i].to(old[i].device))

    def add_mean(self, name: str, values: Number, mask: Optional[torch.Tensor] = None,
                 weights: Optional[torch.Tensor] = None) -> None:
        """Mean of ``values`` (the elements where ``mask`` is true), pooled with earlier adds.
        ``weights`` (default 1) weigh each element, e.g. a sequence's share of its tokens held by
        this context-parallel rank, so that sequences split over ranks count once in total."""
        x, w, _ = _masked(values, mask, weights)
        self._accumulate(name, "mean", [(x * w).sum(), w.sum()])

    def add_mean_parts(self, name: str, total: Number, count: Number) -> None:
        """Mean given as a pre-summed ``total`` over ``count`` items (e.g. a ratio of two sums)."""
        self._accumulate(name, "mean", [_as_tensor(total).sum(), _as_tensor(count).sum()])

    def add_std(self, name: str, values: Number, mask: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None) -> None:
        """Population standard deviation of ``values`` (optionally weighted), pooled with earlier adds."""
        x, w, _ = _masked(values, mask, weights)
        self._accumulate(name, "std", [(x * w).sum(), (x * x * w).sum(), w.sum()])

    def add_sum(self, name: str, values: Number, mask: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None) -> None:
        x, w, _ = _masked(values, mask, weights)
        self._accumulate(name, "sum", [(x * w).sum()])

    def add_max(self, name: str, values: Number, mask: Optional[torch.Tensor] = None) -> None:
        self._accumulate(name, "max", [_masked_extreme(values, mask, "max")])

    def add_min(self, name: str, values: Number, mask: Optional[torch.Tensor] = None) -> None:
        self._accumulate(name, "min", [_masked_extreme(values, mask, "min")])

    def merge(self, other: "MetricBag") -> "MetricBag":
        """Pools ``other`` into this bag (e.g. the next micro-batch); returns self."""
        for name, (kind, parts) in other._entries.items():
            self._accumulate(name, kind, [p.clone() for p in parts])
        return self

    @classmethod
    def merged(cls, bags: Iterable["MetricBag"]) -> "MetricBag":
        out = cls()
        for bag in bags:
            out.merge(bag)
        return out

    def names(self) -> list[str]:
        return sorted(self._entries)

    def kind(self, name: str) -> str:
        return self._entries[name][0]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------------------- reduction
    def _signature(self) -> float:
        """A number identifying the (name, kind) list, exact in float64 (52-bit hash)."""
        text = "\n".join(f"{n}:{self._entries[n][0]}" for n in self.names())
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return float(digest % (1 << 52))

    def _add_missing(self, names_and_kinds: Iterable[tuple[str, str]]) -> None:
        for name, kind in names_and_kinds:
            if name in self._entries:
                if self._entries[name][0] != kind:
                    raise ValueError(f"metric {name!r} is {self._entries[name][0]!r} on this rank and {kind!r} on another")
                continue
            parts = [torch.tensor(_IDENTITY[op], dtype=torch.float64) for op in _PARTS[kind]]
            self._entries[name] = (kind, parts)

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "MetricBag":
        """Reduces every statistic over the ranks of ``group`` in place; returns self.

        One all_reduce per op kind (SUM, MAX, MIN), each over one tensor holding all values of that
        kind, after a tiny fixed-size MAX reduction that checks every rank holds the same metric
        names. Ranks whose names differ (a metric only some ranks produced) first exchange their
        name lists and fill the missing ones with the identity of each op, so they never hang or
        mix up values. A no-op when torch.distributed is not initialised or the group has 1 rank.
        """
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        device = _comm_device(group)
        sig = self._signature()
        header = torch.tensor([sig, -sig], dtype=torch.float64, device=device)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
        if header[0].item() != -header[1].item():  # some rank holds a different name list
            gathered: list[list[tuple[str, str]]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
            dist.all_gather_object(gathered, [(n, self._entries[n][0]) for n in self.names()], group=group)
            self._add_missing(pair for names in gathered for pair in names)

        names = self.names()
        slots: dict[str, list[tuple[str, int]]] = {"sum": [], "max": [], "min": []}
        for name in names:
            for i, op in enumerate(_PARTS[self._entries[name][0]]):
                slots[op].append((name, i))
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        for op, where in slots.items():
            if not where:
                continue
            flat = torch.stack([self._entries[n][1][i].to(device) for n, i in where])
            dist.all_reduce(flat, op=ops[op], group=group)
            for (n, i), value in zip(where, flat.unbind(0)):
                self._entries[n][1][i] = value
        return self

    # ---------------------------------------------------------------------------------- result
    def compute(self) -> dict[str, float]:
        """Final values, host-side, sorted by name (see the module docstring for empty groups)."""
        names = self.names()
        if not names:
            return {}
        parts = [p for n in names for p in self._entries[n][1]]
        flat = torch.stack([p.to(parts[0].device) for p in parts]).tolist()  # one device-to-host copy
        out: dict[str, float] = {}
        pos = 0
        for name in names:
            kind = self._entries[name][0]
            parts = flat[pos:pos + len(_PARTS[kind])]
            pos += len(parts)
            if kind == "sum":
                out[name] = parts[0]
            elif kind in ("max", "min"):
                if parts[0] != _IDENTITY[kind]:  # still the identity: no value was ever added
                    out[name] = parts[0]
            elif kind == "mean":
                if parts[1] > 0:
                    out[name] = parts[0] / parts[1]
            else:  # std
                total, squares, count = parts
                if count > 0:
                    mean = total / count
                    out[name] = math.sqrt(max(squares / count - mean * mean, 0.0))
        return out


def _comm_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend here (gloo) reduces host tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
