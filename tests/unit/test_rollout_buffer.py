"""The asynchronous mode's rollout buffer: admission, earliest-deadline-first mini-batches, the
staleness bound (drop and throttle), and blocking take()."""
from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from megatron_vespo.driver.rollout_buffer import BufferClosed, RolloutBuffer


def finish(buf: RolloutBuffer, ticket: int, version: int, n: int = 2, payload=None) -> None:
    buf.complete(ticket, version, version, [version] * n, payload if payload is not None else ticket)


def test_rejects_bad_construction():
    with pytest.raises(ValueError, match="capacity"):
        RolloutBuffer(4, 1, "drop", capacity=3)
    with pytest.raises(ValueError, match="over_staleness"):
        RolloutBuffer(1, 1, "skip", capacity=2)


def test_drop_mode_drops_and_counts_groups_past_the_bound_and_takes_oldest_first():
    buf = RolloutBuffer(2, max_staleness=1, over_staleness="drop", capacity=10)
    tickets = [buf.try_admit(0) for _ in range(3)] + [buf.try_admit(2) for _ in range(2)]
    assert None not in tickets
    for t, v in zip(tickets, [0, 0, 0, 2, 2]):
        finish(buf, t, v)
    res = buf.take(step=2)  # version 0 is 2 steps behind: past the bound of 1
    assert [g.ticket for g in res.dropped] == tickets[:3]
    assert [g.ticket for g in res.groups] == tickets[3:]
    assert res.sample_lags() == [0, 0, 0, 0]
    assert buf.snapshot()["async/dropped_stale_groups_total"] == 3


def test_mini_batch_is_earliest_deadline_first_then_completion_order():
    buf = RolloutBuffer(2, max_staleness=3, over_staleness="drop", capacity=10)
    a, b, c = buf.try_admit(1), buf.try_admit(0), buf.try_admit(1)
    finish(buf, a, 1)
    finish(buf, c, 1)
    finish(buf, b, 0)
    res = buf.take(step=1)
    assert [g.ticket for g in res.groups] == [b, a]
    assert res.sample_lags() == [1, 1, 0, 0]


def test_per_response_versions_give_per_sample_lags():
    buf = RolloutBuffer(1, max_staleness=5, over_staleness="drop", capacity=2)
    t = buf.try_admit(3)
    buf.complete(t, 3, 5, [3, 4, 5], "p")  # a partial rollout resumed twice
    res = buf.take(step=6)
    assert res.sample_lags() == [3, 2, 1] and res.groups[0].payload == "p"


def test_capacity_stops_admission_until_the_trainer_takes():
    buf = RolloutBuffer(2, max_staleness=10, over_staleness="drop", capacity=2)
    for _ in range(2):
        finish(buf, buf.try_admit(0), 0)
    assert buf.try_admit(0) is None
    buf.take(step=0)
    assert buf.try_admit(0) is not None


def test_completing_older_than_admitted_is_an_error():
    buf = RolloutBuffer(1, max_staleness=2, over_staleness="drop", capacity=2)
    t = buf.try_admit(3)
    with pytest.raises(ValueError, match="older than its admission"):
        buf.complete(t, 2, 3, [2], None)


def test_throttle_admission_counts_the_slots_before_the_deadline():
    mb, bound = 2, 1
    buf = RolloutBuffer(mb, max_staleness=bound, over_staleness="throttle", capacity=100)
    # At trainer step 0 and version 0 a group must train at step 0 or 1: two mini-batches of slots.
    tickets = [buf.try_admit(0) for _ in range(mb * (bound + 1))]
    assert None not in tickets and buf.try_admit(0) is None


def test_throttle_trainer_waits_for_a_pending_group_that_would_miss_its_deadline():
    buf = RolloutBuffer(1, max_staleness=1, over_staleness="throttle", capacity=10)
    late = buf.try_admit(0)  # due by step 1, still generating
    finish(buf, buf.try_admit(0), 0)
    res = buf.take(step=0)  # taking this one leaves one slot (step 1) for `late`: fine
    assert len(res.groups) == 1
    # A group admitted at version 1 completes first; taking it at step 1 would make `late` miss step 1.
    early = buf.try_admit(1)
    finish(buf, early, 1)
    with pytest.raises(BufferClosed, match="within"):
        buf.take(step=1, timeout_s=0.3)
    finish(buf, late, 0)
    res = buf.take(step=1)
    assert [g.ticket for g in res.groups] == [late] and res.dropped == []


def test_take_blocks_until_completion_and_reports_the_wait():
    buf = RolloutBuffer(1, max_staleness=1, over_staleness="drop", capacity=2)
    t = buf.try_admit(0)
    timer = threading.Timer(0.2, finish, args=(buf, t, 0))
    timer.start()
    res = buf.take(step=0)
    assert res.waited_s >= 0.15 and res.groups[0].ticket == t


def test_close_and_should_stop_interrupt_take():
    buf = RolloutBuffer(1, max_staleness=1, over_staleness="drop", capacity=2)
    threading.Timer(0.1, buf.close, args=("generator died",)).start()
    with pytest.raises(BufferClosed, match="generator died"):
        buf.take(step=0)
    buf2 = RolloutBuffer(1, max_staleness=1, over_staleness="drop", capacity=2)
    with pytest.raises(BufferClosed, match="stop now"):
        buf2.take(step=0, should_stop=lambda: "stop now")
    assert buf.try_admit(0) is None


@settings(max_examples=40, deadline=None)
@given(mb=st.integers(1, 3), bound=st.integers(0, 3), push_every=st.integers(1, 3),
       seed=st.integers(0, 10_000), mode=st.sampled_from(["drop", "throttle"]))
def test_simulated_run_never_trains_past_the_bound(mb, bound, push_every, seed, mode):
    """A discrete simulation of generator and trainer with random generation times: whatever the
    order of completions, no trained sample's lag exceeds the bound, and throttle drops nothing."""
    push_every = min(push_every, bound + 1)  # the config rule max_staleness >= push_every_steps - 1
    rng = random.Random(seed)
    buf = RolloutBuffer(mb, bound, mode, capacity=2 * mb)
    version, step, pending = 0, 0, []  # pending: [ticket, version, remaining ticks]
    trained = 0
    for _tick in range(400):
        while len(pending) < 4 * mb:
            t = buf.try_admit(version)
            if t is None:
                break
            pending.append([t, version, rng.randint(1, 6)])
        for p in pending:
            p[2] -= 1
        for p in [p for p in pending if p[2] <= 0]:
            pending.remove(p)
            finish(buf, p[0], p[1])
        try:
            res = buf.take(step, timeout_s=0.0)
        except BufferClosed:
            continue
        assert all(lag <= bound for lag in res.sample_lags())
        if mode == "throttle":
            assert res.dropped == []
        step += 1
        trained += 1
        if step % push_every == 0:
            version = step
    assert trained > 10  # the schedule makes progress
