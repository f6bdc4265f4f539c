"""The asynchronous mode's buffer of finished prompt groups, tagged with the policy versions that made them.

Versions are integers: the number of optimizer steps behind the weights (the fleet's weight version).
A group is *admitted* when its prompt is sent (it is then pending, tagged with the fleet version it
starts from: the oldest version any of its tokens can have), *completed* when all its responses are
final, and *taken* by the trainer in a mini-batch at trainer step ``s`` (optimizer steps done so far).

Lag of a sample trained at step ``s`` = ``s`` - the oldest version behind any of its tokens.
Bound: ``max_staleness``. Two policies keep every trained sample within it:

- ``drop``: the generator runs freely (up to ``capacity`` finished groups waiting); at take time
  groups past the bound are discarded and counted.
- ``throttle``: earliest-deadline-first scheduling. A group admitted at version v must train by step
  ``v + max_staleness`` (its deadline). Admission keeps, for every deadline d, the number of
  unconsumed groups due by d within the mini-batch slots left until d; the trainer takes the groups
  with the earliest deadlines, and waits (idle) rather than take a step after which some pending
  group could no longer make its deadline. Nothing is dropped unless a group was admitted at a
  version older than the trainer already allows (then it is dropped and counted, as in ``drop``).

Mini-batches are chosen earliest deadline first (oldest version first, then completion order) in
both modes. Thread-safe: the generator thread admits and completes, the trainer thread takes.

Dynamic sampling (``filter_flat``): a group completed as *flat* (its rewards have zero variance, so every
advantage is 0) is not kept for training: it leaves the buffer at once (freeing its admission slot, so
the generator draws another prompt) and is counted. A take waits for enough groups with variance until
``max_filtered`` flat groups have completed since the previous take; then, with ``on_exhausted`` ``fill``,
it completes the mini-batch with the most recent flat groups (at most a mini-batch of them is kept for
that, within the staleness bound), with ``error`` it raises
:class:`~megatron_vespo.driver.run_health.DynamicSamplingExhaustedError`. Lags and the staleness bound
are unchanged: a filled group is an ordinary group with its own versions.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

from megatron_vespo.driver.run_health import DynamicSamplingExhaustedError

OverStaleness = Literal["drop", "throttle"]


@dataclass
class FinishedGroup:
    """One prompt's responses, scored, with the versions behind them."""

    ticket: int
    oldest_version: int  # the oldest policy version behind any token of any response
    newest_version: int
    response_oldest_versions: list[int]  # per response (its lag is step - this)
    payload: Any  # what the trainer needs (the rollout group, rewards, stats)
    completed_at: float = field(default_factory=time.monotonic)


@dataclass
class TakeResult:
    """A mini-batch for trainer step ``step`` and what happened on the way."""

    step: int
    groups: list[FinishedGroup]
    dropped: list[FinishedGroup]  # past the bound at take time (never trained)
    waited_s: float  # trainer idle time inside take()
    # Dynamic sampling, since the previous take: flat groups completed (some may be in ``groups`` as fill),
    # groups with variance completed, the flat groups' rewards (for metrics over everything generated).
    flat_completed: int = 0
    varied_completed: int = 0
    filled: int = 0
    flat_rewards: list[float] = field(default_factory=list)

    def sample_lags(self) -> list[int]:
        return [self.step - v for g in self.groups for v in g.response_oldest_versions]


class BufferClosed(RuntimeError):
    """take() was interrupted because the buffer was closed (shutdown or a generator failure)."""


class RolloutBuffer:
    """Pending and finished prompt groups; admission control and mini-batch selection."""

    def __init__(self, mini_batch_groups: int, max_staleness: int, over_staleness: OverStaleness, capacity: int,
                 filter_flat: bool = False, max_filtered: int = 0, on_exhausted: str = "fill"):
        if mini_batch_groups < 1:
            raise ValueError(f"mini_batch_groups must be >= 1; got {mini_batch_groups}")
        if capacity < mini_batch_groups:
            raise ValueError(f"capacity {capacity} must hold at least one mini-batch ({mini_batch_groups} groups)")
        if over_staleness not in ("drop", "throttle"):
            raise ValueError(f"over_staleness: expected 'drop' or 'throttle'; got {over_staleness!r}")
        if on_exhausted not in ("fill", "error"):
            raise ValueError(f"on_exhausted: expected 'fill' or 'error'; got {on_exhausted!r}")
        self.mini_batch_groups = mini_batch_groups
        self.max_staleness = max_staleness
        self.over_staleness = over_staleness
        self.capacity = capacity
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # ticket -> admission version
        self._finished: list[FinishedGroup] = []
        self._next_ticket = 0
        self._trainer_step = 0  # the step the trainer takes next
        self._closed: Optional[str] = None
        self.dropped_total = 0
        self.filter_flat = filter_flat
        self.max_filtered = max_filtered
        self.on_exhausted = on_exhausted
        self._flat: deque[FinishedGroup] = deque(maxlen=mini_batch_groups)  # the newest flat groups, for fill
        self._flat_since_take = 0
        self._varied_since_take = 0
        self._flat_rewards: list[float] = []  # of the flat groups completed since the previous take
        self.filtered_total = 0

    # ----------------------------------------------------------------------------- generator side
    def deadline(self, version: int) -> int:
        return version + self.max_staleness

    def _slots_until(self, deadline: int, step: int) -> int:
        """Groups the trainer can still take at steps ``step`` .. ``deadline``."""
        return self.mini_batch_groups * max(0, deadline - step + 1)

    def _can_admit_locked(self, version: int) -> bool:
        if self._closed is not None or len(self._finished) >= self.capacity:
            return False
        if self.over_staleness == "drop":
            return True
        # Every unconsumed group is due by the newest deadline: all of them, plus this one, must fit.
        unconsumed = len(self._pending) + len(self._finished)
        return unconsumed + 1 <= self._slots_until(self.deadline(version), self._trainer_step)

    def try_admit(self, version: int) -> Optional[int]:
        """A ticket for a new prompt group generated from ``version``, or None if it must wait."""
        with self._cond:
            if not self._can_admit_locked(version):
                return None
            ticket = self._next_ticket
            self._next_ticket += 1
            self._pending[ticket] = version
            return ticket

    def complete(self, ticket: int, oldest_version: int, newest_version: int,
                 response_oldest_versions: list[int], payload: Any, flat: bool = False,
                 rewards: Sequence[float] = ()) -> None:
        """A finished group; ``flat``: its ``rewards`` have zero variance (filtered with ``filter_flat``; only
        the newest flat groups are kept whole, the others' rewards only, for the metrics)."""
        with self._cond:
            admitted = self._pending.pop(ticket)
            if oldest_version < admitted:
                raise ValueError(f"group {ticket}: oldest version {oldest_version} is older than its admission "
                                 f"version {admitted}")
            group = FinishedGroup(ticket, oldest_version, newest_version, list(response_oldest_versions), payload)
            if self.filter_flat and flat:
                self._flat.append(group)
                self._flat_since_take += 1
                self._flat_rewards.extend(float(r) for r in rewards)
                self.filtered_total += 1
            else:
                self._finished.append(group)
                self._varied_since_take += int(self.filter_flat)
            self._cond.notify_all()

    def cancel(self, ticket: int) -> None:
        """A pending group that will never complete (generation failed or the run is ending)."""
        with self._cond:
            self._pending.pop(ticket, None)
            self._cond.notify_all()

    def close(self, reason: str = "closed") -> None:
        """Wake and fail every waiting take(); admit nothing more."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    # ------------------------------------------------------------------------------- trainer side
    def _order(self) -> list[FinishedGroup]:
        return sorted(self._finished, key=lambda g: (g.oldest_version, g.completed_at, g.ticket))

    def _feasible_after(self, chosen: set[int], step: int) -> bool:
        """Throttle: after taking ``chosen`` at ``step``, can every other group still make its deadline?"""
        due = Counter(self.deadline(v) for v in self._pending.values())
        due.update(self.deadline(g.oldest_version) for g in self._finished if g.ticket not in chosen)
        running = 0
        for d in sorted(due):
            running += due[d]
            if running > self._slots_until(d, step + 1):
                return False
        return True

    def _fill_locked(self, step: int, ordered: list[FinishedGroup]) -> Optional[list[FinishedGroup]]:
        """Dynamic sampling past its budget: ``ordered`` completed with the newest flat groups within the
        staleness bound (fill), None while too few exist; raises with ``on_exhausted: error``."""
        if not self.filter_flat or self._flat_since_take < self.max_filtered:
            return None
        if self.on_exhausted == "error":
            raise DynamicSamplingExhaustedError(
                f"dynamic sampling (rollout.dynamic_sampling): {len(ordered)} of the {self.mini_batch_groups} "
                f"prompt groups a mini-batch needs had reward variance after {self._flat_since_take} groups that "
                "scored the same on every response: the prompts are too easy or too hard for the policy; raise "
                "max_extra_rounds or set on_exhausted: fill")
        fresh = [g for g in self._flat if step - g.oldest_version <= self.max_staleness]
        missing = self.mini_batch_groups - len(ordered)
        if len(fresh) < missing:
            return None
        return ordered + fresh[len(fresh) - missing:]

    def _select_locked(self, step: int) -> Optional[tuple[list[FinishedGroup], list[FinishedGroup]]]:
        stale = [g for g in self._finished if step - g.oldest_version > self.max_staleness]
        if stale:
            self._finished = [g for g in self._finished if step - g.oldest_version <= self.max_staleness]
            self.dropped_total += len(stale)
        ordered = self._order()
        if len(ordered) < self.mini_batch_groups:
            filled = self._fill_locked(step, ordered)
            if filled is None:
                return (None if not stale else ([], stale))
            ordered = filled
        chosen = ordered[:self.mini_batch_groups]
        if self.over_staleness == "throttle" and not self._feasible_after({g.ticket for g in chosen}, step):
            return (None if not stale else ([], stale))
        return chosen, stale

    def take(self, step: int, timeout_s: Optional[float] = None,
             should_stop: Optional[Callable[[], Optional[str]]] = None) -> TakeResult:
        """Block until a mini-batch for trainer step ``step`` is available and return it.

        Raises :class:`BufferClosed` when the buffer is closed, ``should_stop()`` returns a reason
        (checked every 0.1 s) or ``timeout_s`` passes.
        """
        start = time.monotonic()
        dropped: list[FinishedGroup] = []
        with self._cond:
            self._trainer_step = step
            self._cond.notify_all()  # a smaller step can free admission slots
            while True:
                if self._closed is not None:
                    raise BufferClosed(self._closed)
                picked = self._select_locked(step)
                if picked is not None:
                    groups, stale = picked
                    dropped.extend(stale)
                    if groups:
                        taken = {g.ticket for g in groups}
                        filled = sum(1 for g in self._flat if g.ticket in taken)
                        self._finished = [g for g in self._finished if g.ticket not in taken]
                        self._flat = deque((g for g in self._flat if g.ticket not in taken),
                                           maxlen=self.mini_batch_groups)
                        result = TakeResult(step, groups, dropped, time.monotonic() - start,
                                            flat_completed=self._flat_since_take,
                                            varied_completed=self._varied_since_take, filled=filled,
                                            flat_rewards=self._flat_rewards)
                        self._flat_since_take = self._varied_since_take = 0
                        self._flat_rewards = []
                        self._trainer_step = step + 1  # admission now counts the slots after this step
                        self._cond.notify_all()
                        return result
                reason = should_stop() if should_stop is not None else None
                if reason:
                    raise BufferClosed(reason)
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise BufferClosed(f"no mini-batch for step {step} within {timeout_s:.0f}s "
                                       f"({len(self._finished)} finished, {len(self._pending)} pending groups)")
                self._cond.wait(timeout=0.1)

    # --------------------------------------------------------------------------------- state
    def snapshot(self) -> dict[str, float]:
        with self._cond:
            out = {"async/buffer_groups": float(len(self._finished)),
                   "async/pending_groups": float(len(self._pending)),
                   "async/dropped_stale_groups_total": float(self.dropped_total)}
            if self.filter_flat:
                out["dynsamp/filtered_groups_total"] = float(self.filtered_total)
            return out

    def finished_groups(self) -> list[FinishedGroup]:
        """The finished groups waiting now (for checkpoints), oldest first."""
        with self._cond:
            return self._order()

    def restore(self, groups: list[FinishedGroup]) -> None:
        """Put finished groups back (resuming from a checkpoint); new tickets follow theirs."""
        with self._cond:
            self._finished.extend(groups)
            self._next_ticket = max([self._next_ticket] + [g.ticket + 1 for g in groups])
            self._cond.notify_all()
