"""DAPO's dynamic sampling: which groups are flat, the sync loop's generation rounds (sizes, cap, fill,
error, metrics) against hand-computed values, and the async buffer's filter (fill, error, lags, staleness)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.config.schema import AdvantageConfig, DynamicSamplingConfig, OverlongConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.driver.dynamic_sampling import collect_groups, merge_reward_stats, next_round_size
from megatron_vespo.driver.rollout import RolloutGroup, build_rollout_batch
from megatron_vespo.driver.rollout_buffer import BufferClosed, RolloutBuffer
from megatron_vespo.driver.run_health import CannotLearnError, DynamicSamplingExhaustedError
from megatron_vespo.rollout_function import RolloutResult
from rollout_sglang.types import FinishReason, Sample

REPO = Path(__file__).resolve().parents[2]


def response(tokens: int = 3, finish: str = "stop") -> RolloutResult:
    return RolloutResult.from_sample(Sample(
        rid="r", prompt_ids=[1, 2], output_ids=[5] * tokens, output_logprobs=[-0.5] * tokens,
        finish_reason=FinishReason(finish), weight_version="0", prompt_tokens=2, completion_tokens=tokens))


def group(index: int, n: int = 2, lengths=None, finishes=None) -> RolloutGroup:
    lengths = lengths or [3] * n
    finishes = finishes or ["stop"] * n
    return RolloutGroup(PromptRow(index=index, prompt_ids=[1, 2], ground_truth=[3]),
                        [response(t, f) for t, f in zip(lengths, finishes)])


def test_flat_groups_are_those_whose_advantages_are_all_zero():
    groups = [group(0), group(1), group(2, n=2, finishes=["stop", "abort"]), group(3, lengths=[3, 8])]
    rewards = [1.0, 1.0,  # all correct: flat
               0.0, 1.0,  # mixed
               1.0, 0.0,  # the 0 is aborted, so one complete response: flat
               1.0, 1.0]  # equal scores, but the overlong penalty (length 8 of 8, buffer 4) separates them
    plain = build_rollout_batch(groups, rewards, AdvantageConfig())
    assert plain.flat == [True, False, True, True]
    shaped = build_rollout_batch(groups, rewards, AdvantageConfig(), OverlongConfig(buffer_len=4), max_response_len=8)
    assert shaped.flat == [True, False, True, False]


@pytest.mark.parametrize("need,kept,generated,expected", [
    (8, 0, 8, 8),  # nothing kept yet: a whole batch
    (8, 4, 8, 8),  # half kept, 4 missing: 4 / 0.5 = 8
    (8, 6, 8, 3),  # 2 missing at 3/4 kept: ceil(2.67) = 3
    (8, 1, 16, 8),  # 7 missing at 1/16: 112, capped at a batch
    (8, 7, 8, 2),  # 1 missing at 7/8: ceil(1.14) = 2
])
def test_next_round_size(need, kept, generated, expected):
    assert next_round_size(need, kept, generated) == expected


class FakeFleet:
    """Each draw returns the next groups of a fixed script of flat (F) / varied (V) groups, as rewards."""

    def __init__(self, script: str):
        self.script = list(script)
        self.draws: list[tuple[int, int]] = []
        self.next_index = 0

    def draw(self, prompts: int, extra_round: int):
        self.draws.append((prompts, extra_round))
        groups, rewards = [], []
        for _ in range(prompts):
            kind = self.script.pop(0)
            groups.append(group(self.next_index))
            rewards += [1.0, 1.0] if kind == "F" else [0.0, 1.0]
            self.next_index += 1
        return groups, rewards, {"reward/verifier_errors": 0.0}

    @staticmethod
    def is_flat(groups, rewards):
        return build_rollout_batch(groups, rewards, AdvantageConfig()).flat


def test_rounds_until_the_batch_is_full_then_the_first_varied_groups_in_order():
    fleet = FakeFleet("FVFVFFVV" + "VVVFVV" + "FFFF")
    got = collect_groups(8, fleet.draw, fleet.is_flat, DynamicSamplingConfig(enabled=True, max_extra_rounds=4))
    # Round 0: 8 prompts, 4 varied. Round 1: 4 missing at 4/8 kept -> 8 prompts (VVVFVVFF), 5 more varied.
    assert fleet.draws == [(8, 0), (8, 1)]
    assert got.flat == [c == "F" for c in "FVFVFFVVVVVFVVFF"]
    assert got.chosen == [1, 3, 6, 7, 8, 9, 10, 12]  # the first 8 varied groups, in generation order
    m = got.metrics
    assert m["dynsamp/generated_groups"] == 16 and m["dynsamp/flat_groups"] == 7
    assert m["dynsamp/filtered_fraction"] == pytest.approx(7 / 16)
    assert m["dynsamp/extra_rounds"] == 1 and m["dynsamp/extra_groups"] == 8
    assert m["dynsamp/generation_cost"] == 2.0
    assert m["dynsamp/surplus_groups"] == 1 and m["dynsamp/filled_groups"] == 0  # group 13 was not needed


def test_no_extra_round_when_the_first_is_full():
    fleet = FakeFleet("VVVV")
    got = collect_groups(4, fleet.draw, fleet.is_flat, DynamicSamplingConfig(enabled=True))
    assert fleet.draws == [(4, 0)] and got.chosen == [0, 1, 2, 3]
    assert got.metrics["dynsamp/generation_cost"] == 1.0 and got.metrics["dynsamp/filtered_fraction"] == 0.0


def test_cap_then_fill_with_the_first_flat_groups_keeping_the_batch_size():
    fleet = FakeFleet("FFVF" + "FFFF" + "F" * 4)
    got = collect_groups(4, fleet.draw, fleet.is_flat, DynamicSamplingConfig(enabled=True, max_extra_rounds=1))
    # Round 0 keeps 1 of 4 (3 missing at 1/4: 12, capped at 4); round 1 keeps none; the cap of 1 extra round stops.
    assert fleet.draws == [(4, 0), (4, 1)]
    assert got.chosen == [0, 1, 2, 3]  # the varied group 2 plus the first three flat groups, in order
    assert got.metrics["dynsamp/filled_groups"] == 3 and got.metrics["dynsamp/surplus_groups"] == 0


def test_cap_with_error_stops_in_one_line():
    fleet = FakeFleet("FFFF" * 3)
    with pytest.raises(DynamicSamplingExhaustedError) as err:
        collect_groups(4, fleet.draw, fleet.is_flat,
                       DynamicSamplingConfig(enabled=True, max_extra_rounds=2, on_exhausted="error"))
    assert isinstance(err.value, CannotLearnError) and "\n" not in str(err.value)
    assert "0 of the 4 prompt groups" in str(err.value) and "after 2 extra generation round(s)" in str(err.value)
    assert "12 of 12 generated groups" in str(err.value)


def test_reward_stats_of_rounds_merge():
    merged = merge_reward_stats([{"reward/verifier_errors": 1.0}, {"reward/verifier_errors": 2.0,
                                                                   "reward/first_error": "a"},
                                 {"reward/first_error": "b", "reward/verifier_errors": 0.0}])
    assert merged == {"reward/verifier_errors": 3.0, "reward/first_error": "a"}


# ----------------------------------------------------------------------------------- async buffer
def done(buf: RolloutBuffer, version: int, flat: bool, rewards=(1.0, 1.0)) -> int:
    ticket = buf.try_admit(version)
    buf.complete(ticket, version, version, [version, version], f"g{ticket}", flat=flat, rewards=list(rewards))
    return ticket


def test_buffer_filters_flat_groups_and_frees_their_slots():
    buf = RolloutBuffer(2, max_staleness=4, over_staleness="drop", capacity=2, filter_flat=True, max_filtered=10)
    flats = [done(buf, 0, True) for _ in range(5)]  # flat groups never fill the capacity
    a, b = done(buf, 0, False), done(buf, 0, False)
    assert buf.try_admit(0) is None  # now the capacity (2 finished groups with variance) is reached
    res = buf.take(step=0)
    assert [g.ticket for g in res.groups] == [a, b] and res.filled == 0
    assert res.flat_completed == 5 and res.varied_completed == 2 and res.flat_rewards == [1.0] * 10
    assert buf.snapshot()["dynsamp/filtered_groups_total"] == 5
    assert flats  # (their tickets are spent)


def test_buffer_waits_within_the_budget_then_fills_with_the_newest_flat_groups():
    buf = RolloutBuffer(2, max_staleness=4, over_staleness="drop", capacity=4, filter_flat=True, max_filtered=3)
    v = done(buf, 0, False)
    done(buf, 0, True)
    done(buf, 1, True)
    with pytest.raises(Exception, match="no mini-batch"):  # 2 flat < budget 3: still waiting for variance
        buf.take(step=1, timeout_s=0.2)
    newest = done(buf, 1, True)
    res = buf.take(step=1)
    # The varied group, then the newest flat one (version 1); lags are the groups' own.
    assert [g.ticket for g in res.groups] == [v, newest] and res.filled == 1
    assert res.sample_lags() == [1, 1, 0, 0]
    assert res.flat_completed == 3


def test_buffer_fill_skips_stale_flat_groups_and_error_mode_raises():
    buf = RolloutBuffer(1, max_staleness=1, over_staleness="drop", capacity=2, filter_flat=True, max_filtered=1)
    done(buf, 0, True)
    with pytest.raises(Exception, match="no mini-batch"):  # the only flat group is 2 steps behind at step 2
        buf.take(step=2, timeout_s=0.2)
    fresh = done(buf, 2, True)
    assert [g.ticket for g in buf.take(step=2).groups] == [fresh]
    strict = RolloutBuffer(1, max_staleness=4, over_staleness="drop", capacity=2, filter_flat=True, max_filtered=2,
                           on_exhausted="error")
    done(strict, 0, True)
    done(strict, 0, True)
    with pytest.raises(DynamicSamplingExhaustedError, match="0 of the 1 prompt groups.*after 2 groups"):
        strict.take(step=0, timeout_s=5)


def test_buffer_without_filter_keeps_flat_groups_as_before():
    buf = RolloutBuffer(1, max_staleness=4, over_staleness="drop", capacity=2)
    t = done(buf, 0, True)
    assert [g.ticket for g in buf.take(step=0).groups] == [t]


@pytest.mark.parametrize("overrides,path,fragment", [
    (["rollout.dynamic_sampling.max_extra_rounds=-1"], "rollout.dynamic_sampling.max_extra_rounds", ">= 0"),
    (["rollout.dynamic_sampling.on_exhausted=skip"], "rollout.dynamic_sampling.on_exhausted", "'fill'"),
    (["rollout.dynamic_sampling.enabld=true"], "rollout.dynamic_sampling.enabld", "did you mean 'enabled'"),
])
def test_bad_dynamic_sampling_config_names_the_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/quickstart.yaml", overrides)
    assert err.value.path == path and fragment in str(err.value), str(err.value)


def test_default_is_off():
    assert not load_run_config(REPO / "configs/quickstart.yaml").rollout.dynamic_sampling.enabled


@settings(max_examples=25, deadline=None)
@given(mb=st.integers(1, 3), bound=st.integers(0, 3), push_every=st.integers(1, 3), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["drop", "throttle"]), flat_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       budget=st.integers(0, 4))
def test_simulated_run_with_filtering_keeps_the_bound_and_full_mini_batches(mb, bound, push_every, seed, mode,
                                                                           flat_p, budget):
    """The buffer's staleness simulation (test_rollout_buffer.py) with a fraction of flat groups: every
    mini-batch is full, no lag exceeds the bound, throttle drops nothing, flat groups are trained only as
    fill once the budget of flat completions is spent, and the run makes progress even if every group is flat."""
    push_every = min(push_every, bound + 1)
    rng = random.Random(seed)
    buf = RolloutBuffer(mb, bound, mode, capacity=2 * mb, filter_flat=True, max_filtered=budget * mb)
    version, step, pending, trained = 0, 0, [], 0
    for _tick in range(400):
        while len(pending) < 4 * mb:
            t = buf.try_admit(version)
            if t is None:
                break
            pending.append([t, version, rng.randint(1, 6), rng.random() < flat_p])
        for p in pending:
            p[2] -= 1
        for p in [p for p in pending if p[2] <= 0]:
            pending.remove(p)
            buf.complete(p[0], p[1], p[1], [p[1], p[1]], ("flat" if p[3] else "varied", p[0]), flat=p[3],
                         rewards=[1.0, 1.0])
        try:
            res = buf.take(step, timeout_s=0.0)
        except BufferClosed:
            continue
        assert len(res.groups) == mb and all(lag <= bound for lag in res.sample_lags())
        flat_taken = sum(1 for g in res.groups if g.payload[0] == "flat")
        assert flat_taken == res.filled
        assert flat_taken == 0 or res.flat_completed >= budget * mb
        if mode == "throttle":
            assert res.dropped == []
        step += 1
        trained += 1
        if step % push_every == 0:
            version = step
    assert trained > 5
