"""Sequence packing: plan invariants, DP balance, THD layout and the next-token off-by-one."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.train.logprobs import vocab_parallel_logprobs
from megatron_vespo.train.packing import build_thd_micro_batch, iter_rank_micro_batches, pack_sequences
from megatron_vespo.train.sample import TrainSample


def check_plan_invariants(plan, lengths, budget, dp_size, allow_oversized=False):
    placed = sorted(i for rank in plan.micro_batches for mb in rank for i in mb)
    assert placed == list(range(len(lengths))), "every sequence exactly once"
    assert plan.dp_size == dp_size
    assert {len(rank) for rank in plan.micro_batches} == {plan.num_micro_batches}, "equal micro-batch counts"
    for rank in plan.micro_batches:
        for mb in rank:
            tokens = sum(lengths[i] for i in mb)
            assert tokens <= budget or (allow_oversized and len(mb) == 1), (mb, tokens)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=0, max_size=60),
       budget=st.integers(300, 1000), dp_size=st.integers(1, 5))
def test_plan_invariants_hold_for_any_input(lengths, budget, dp_size):
    plan = pack_sequences(lengths, budget, dp_size)
    check_plan_invariants(plan, lengths, budget, dp_size)
    assert plan == pack_sequences(list(lengths), budget, dp_size), "deterministic"
    # no more micro-batches than first-fit-decreasing needs on the busiest rank: never gratuitously many
    assert plan.num_micro_batches <= max(1, -(-sum(lengths) // budget) * 2, len(lengths) // dp_size + 1)
    # empty micro-batches only where a rank has fewer sequences than micro-batches
    for rank in plan.micro_batches:
        n_seqs = sum(len(mb) for mb in rank)
        assert sum(1 for mb in rank if not mb) == max(0, plan.num_micro_batches - n_seqs)


def long_tailed_lengths(n: int, seed: int, cap: int = 16384) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(16, int(rng.lognormvariate(7.5, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_tailed_lengths_are_balanced_across_dp_ranks(seed):
    lengths = long_tailed_lengths(1024, seed)
    plan = pack_sequences(lengths, token_budget=16384, dp_size=8)
    check_plan_invariants(plan, lengths, 16384, 8)
    assert plan.load_imbalance() <= 1.05
    # the naive split (contiguous blocks of 128 sequences) is visibly worse on the same data
    blocks = [sum(lengths[r * 128:(r + 1) * 128]) for r in range(8)]
    assert max(blocks) / (sum(blocks) / 8) > plan.load_imbalance()
    # micro-batches are well filled: the count is within one of the lower bound on the busiest rank
    assert plan.num_micro_batches <= -(-max(plan.rank_tokens()) // 16384) + 1


def test_micro_batch_counts_are_equalised_by_splitting_not_by_empty_batches():
    # rank loads are equal (200 each) but rank 0 needs 2 micro-batches and rank 1 packs into 1
    lengths = [150, 50, 100, 100]
    plan = pack_sequences(lengths, token_budget=180, dp_size=2)
    check_plan_invariants(plan, lengths, 180, 2)
    assert plan.num_micro_batches == 2
    assert all(mb for rank in plan.micro_batches for mb in rank)
    assert plan.rank_tokens() == [200, 200]


def test_fewer_sequences_than_micro_batches_gives_empty_padding_only_batches():
    # rank 0 gets two sequences of 60 (two micro-batches); rank 1 has one sequence for two micro-batches
    plan = pack_sequences([60, 60, 60], token_budget=100, dp_size=2)
    check_plan_invariants(plan, [60, 60, 60], 100, 2)
    assert plan.micro_batches == (((0,), (2,)), ((1,), ()))
    batch = build_thd_micro_batch([], pad_to_multiple=4, optional_fields=("old_logp",))
    assert batch["num_tokens"] == 4 and batch["num_sequences"] == 0 and batch["loss_mask"].sum() == 0
    assert batch["cu_seqlens"].tolist() == [0, 4] and batch["seq_index"].tolist() == [0, 0, 0, 0]
    assert batch["advantage"].shape == (0,)
    assert batch["old_logp"].tolist() == [0, 0, 0, 0] and batch["rollout_logp"].tolist() == [0, 0, 0, 0]


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=0, max_size=40),
       budget=st.integers(300, 800), dp_size=st.integers(1, 3), multiple=st.integers(1, 4))
def test_micro_batch_count_is_rounded_up_to_the_requested_multiple(lengths, budget, dp_size, multiple):
    # The interleaved (virtual pipeline) schedule needs a multiple of its micro-batch group (PP).
    plain = pack_sequences(lengths, budget, dp_size)
    plan = pack_sequences(lengths, budget, dp_size, count_multiple=multiple)
    check_plan_invariants(plan, lengths, budget, dp_size)
    assert plan.num_micro_batches % multiple == 0
    assert plain.num_micro_batches <= plan.num_micro_batches < plain.num_micro_batches + multiple


def test_odd_micro_batch_count_is_split_to_an_even_one():
    # five micro-batches of one sequence each under the budget -> six, the longest split in two
    lengths = [50, 50, 50, 50, 30, 20]
    assert pack_sequences(lengths, token_budget=50).num_micro_batches == 5
    plan = pack_sequences(lengths, token_budget=50, count_multiple=2)
    check_plan_invariants(plan, lengths, 50, 1)
    assert plan.num_micro_batches == 6 and all(plan.micro_batches[0])
    with pytest.raises(ValueError, match="count_multiple must be >= 1"):
        pack_sequences(lengths, token_budget=50, count_multiple=0)


def test_too_long_sequence_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"sequence 2 has 501 tokens.*token_budget 500"):
        pack_sequences([10, 20, 501, 30], token_budget=500, dp_size=2)


def test_oversized_sequence_gets_its_own_micro_batch_when_allowed():
    lengths = [10, 20, 501, 30, 480]
    plan = pack_sequences(lengths, token_budget=500, dp_size=2, allow_oversized=True)
    check_plan_invariants(plan, lengths, 500, 2, allow_oversized=True)
    assert any(mb == (2,) for rank in plan.micro_batches for mb in rank)


@pytest.mark.parametrize("bad, message", [([5, 0], "sequence 1: length must be a positive int"),
                                          ([5, 2.5], "sequence 1: length"),
                                          ([5, True], "sequence 1: length")])
def test_bad_lengths(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_sequences(bad, token_budget=10, dp_size=1)


def hand_sequences():
    return [
        TrainSample(prompt_ids=[11, 12, 13], response_ids=[21, 22], rollout_logp=[-0.5, -0.25], advantage=1.5),
        TrainSample(prompt_ids=[31], response_ids=[41, 42, 43], rollout_logp=[-1.0, -2.0, -3.0], advantage=-0.5),
    ]


def test_thd_layout_and_off_by_one_on_a_hand_example():
    batch = build_thd_micro_batch(hand_sequences(), pad_to_multiple=4, pad_token_id=99)
    # positions:            0   1   2   3   4 | 5   6   7   8 | pad
    assert batch["input_ids"].tolist() == [11, 12, 13, 21, 22, 31, 41, 42, 43, 99, 99, 99]
    assert batch["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    # the logits at position k predict the token at k + 1 of the same sequence
    assert batch["labels"].tolist() == [12, 13, 21, 22, 0, 41, 42, 43, 0, 0, 0, 0]
    # response token y_j is scored at position P - 1 + j: 21 at 2, 22 at 3; 41 at 5, 42 at 6, 43 at 7
    assert batch["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["rollout_logp"].tolist() == [0, 0, -0.5, -0.25, 0, -1, -2, -3, 0, 0, 0, 0]
    assert batch["seq_index"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 12]
    assert batch["max_seqlen"] == 5
    assert (batch["num_sequences"], batch["num_tokens"], batch["num_padding"]) == (2, 12, 3)
    assert batch["advantage"].tolist() == [1.5, -0.5]
    assert batch["loss_mask"].dtype == torch.float32 and batch["input_ids"].dtype == torch.int64
    assert "old_logp" not in batch

    unpadded = build_thd_micro_batch(hand_sequences())
    assert unpadded["cu_seqlens"].tolist() == [0, 5, 9] and unpadded["num_padding"] == 0


def test_response_mask_drops_tokens_from_the_loss():
    seqs = hand_sequences()
    seqs[1].response_mask = [1, 0, 1]
    batch = build_thd_micro_batch(seqs)
    assert batch["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 0]


def test_old_logprobs_are_aligned_like_rollout_logprobs():
    seqs = hand_sequences()
    seqs[0].old_logp, seqs[1].old_logp = [-0.1, -0.2], [-0.3, -0.4, -0.5]
    batch = build_thd_micro_batch(seqs, pad_to_multiple=4)
    assert batch["old_logp"].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, -0.3, -0.4, -0.5, 0, 0, 0, 0])


def test_packed_logprobs_equal_per_sequence_logprobs():
    """End to end with the log-prob kernel: a position-aware toy model scored packed vs one at a time."""
    vocab, gen = 23, torch.Generator().manual_seed(0)
    token_table, position_table = torch.randn(vocab, vocab, generator=gen), torch.randn(64, vocab, generator=gen)

    def toy_logits(input_ids, position_ids):  # depends on the token and its position in its sequence
        return token_table[input_ids] + position_table[position_ids]

    seqs = []
    for s in range(5):
        p, r = 1 + s % 3, 2 + (3 * s) % 5
        ids = torch.randint(0, vocab, (p + r,), generator=gen)
        seqs.append(TrainSample(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logp=torch.zeros(r),
                                advantage=float(s)))

    batch = build_thd_micro_batch(seqs, pad_to_multiple=8)
    logp, _ = vocab_parallel_logprobs(toy_logits(batch["input_ids"], batch["position_ids"]), batch["labels"],
                                      chunk_tokens=5)
    per_seq = torch.zeros(len(seqs) + 1).index_add_(0, batch["seq_index"], logp * batch["loss_mask"])[:-1]

    for s, seq in enumerate(seqs):
        tokens = torch.cat([seq.prompt_ids, seq.response_ids])
        log_probs = torch.log_softmax(toy_logits(tokens, torch.arange(len(tokens))), dim=-1)
        p = len(seq.prompt_ids)
        expected = sum(log_probs[p + j - 1, tokens[p + j]] for j in range(len(seq.response_ids)))
        torch.testing.assert_close(per_seq[s], expected, rtol=1e-6, atol=1e-5)


def test_iter_rank_micro_batches_covers_the_plan():
    seqs = hand_sequences() * 3
    plan = pack_sequences([s.num_tokens for s in seqs], token_budget=10, dp_size=2)
    seen = []
    for rank in range(2):
        batches = list(iter_rank_micro_batches(plan, seqs, rank, pad_to_multiple=2))
        assert len(batches) == plan.num_micro_batches
        for batch, indices in zip(batches, plan.micro_batches[rank]):
            assert batch["sample_index"].tolist() == list(indices)
            assert batch["num_tokens"] % 2 == 0
            assert batch["advantage"].tolist() == [seqs[i].advantage for i in indices]
            seen += list(indices)
    assert sorted(seen) == list(range(len(seqs)))
    with pytest.raises(ValueError, match="sequence 0 has 5 tokens, the plan says 6"):
        bad = pack_sequences([6] + [s.num_tokens for s in seqs[1:]], token_budget=10, dp_size=1)
        list(iter_rank_micro_batches(bad, seqs, 0))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: setattr(s, "prompt_ids", []), "sequence 1: empty prompt_ids"),
    (lambda s: setattr(s, "rollout_logp", [0.1]), r"sequence 1: rollout_logp has shape \(1,\), response_ids has 3"),
    (lambda s: setattr(s, "response_mask", [1, 1]), "sequence 1: response_mask has shape"),
    (lambda s: setattr(s, "advantage", torch.ones(3)), "sequence 1: advantage must be a scalar"),
    (lambda s: setattr(s, "advantage", "high"), "sequence 1: advantage must be a number"),
    (lambda s: setattr(s, "response_ids", [0.5, 1.5, 2.5]), "sequence 1: response_ids must be a 1-D list/tensor of ints"),
])
def test_bad_sequences_are_reported_by_index(mutate, message):
    seqs = hand_sequences()
    mutate(seqs[1])
    with pytest.raises(ValueError, match=message):
        build_thd_micro_batch(seqs)


def test_old_logprobs_on_some_samples_only_is_an_error_naming_the_sample():
    seqs = hand_sequences()
    seqs[0].old_logp = [-0.1, -0.2]
    with pytest.raises(ValueError, match="sequence 1: old_logp is missing"):
        build_thd_micro_batch(seqs)
