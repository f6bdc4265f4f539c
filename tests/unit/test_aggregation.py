"""Aggregation modes, the global normaliser, and invariance of loss and gradient to how a mini-batch is
split into micro-batches (every loss x every mode) and to context-parallel sharding of sequences."""
import random
import threading
import zlib

import pytest
import torch

from megatron_vespo.config.schema import CorrectionConfig, LossConfig
from megatron_vespo.losses import (
    AGGREGATIONS, Normalizer, PolicyBatch, available_losses, compute_policy_loss, count_valid,
    normalizer_from_masks, screen, token_weights,
)
from megatron_vespo.metrics import MetricBag

NORM_CONSTANT = 16.0


class MiniBatch:
    """A random mini-batch of sequences whose token log-probs live in one leaf tensor, so the gradient
    of any split can be compared with the unsplit one."""

    def __init__(self, seed: int, num_seqs: int = 14):
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.lengths = [rng.randint(1, 9) for _ in range(num_seqs)]
        total = sum(self.lengths)
        self.logp = (-3 * torch.rand(total, generator=g, dtype=torch.float64)).requires_grad_()
        self.behavior = self.logp.detach() + 0.4 * torch.randn(total, generator=g, dtype=torch.float64)
        self.rollout = self.behavior + 0.2 * torch.randn(total, generator=g, dtype=torch.float64)
        self.mask = torch.rand(total, generator=g) > 0.2
        self.seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(self.lengths))
        self.mask[self.seq_of_token == 3] = False  # a sequence with no valid token
        self.advantages = torch.randn(num_seqs, generator=g, dtype=torch.float64)
        self.advantages[1] = 0.0
        self.num_seqs = num_seqs

    def micro_batch(self, seqs: list[int], shuffle_seed: int = 0) -> PolicyBatch:
        """The tokens of ``seqs`` (re-indexed 0..len-1), in a shuffled token order."""
        tokens = torch.cat([(self.seq_of_token == s).nonzero().flatten() for s in seqs])
        tokens = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(shuffle_seed))]
        local = {s: i for i, s in enumerate(seqs)}
        return PolicyBatch(
            logp=self.logp[tokens], behavior_logp=self.behavior[tokens], mask=self.mask[tokens],
            seq_index=torch.tensor([local[int(s)] for s in self.seq_of_token[tokens]]),
            advantages=self.advantages[seqs], num_seqs=len(seqs), rollout_logp=self.rollout[tokens],
        )

    def split(self, k: int, seed: int) -> list[PolicyBatch]:
        """k non-empty micro-batches from a random assignment of the sequences."""
        order = list(range(self.num_seqs))
        random.Random(seed).shuffle(order)
        groups = [order[i::k] for i in range(k)]
        return [self.micro_batch(sorted(gr), shuffle_seed=seed + i) for i, gr in enumerate(groups)]


def run_split(mb: MiniBatch, micro_batches, cfg, correction=None):
    mb.logp.grad = None
    norm = normalizer_from_masks(micro_batches, norm_constant=NORM_CONSTANT)
    total = 0.0
    bag = MetricBag()
    for batch in micro_batches:
        out = compute_policy_loss(batch, norm, cfg, correction)
        out.loss.backward()  # one backward per micro-batch, as in gradient accumulation
        total += out.loss.item()
        bag.merge(out.metrics)
    return total, mb.logp.grad.clone(), bag.compute()


def assert_same_metrics(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("correction", ["none", "seq_tis", "token_mis"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_name", available_losses())
def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(loss_name, aggregation, correction):
    mb = MiniBatch(seed=zlib.crc32(f"{loss_name}/{aggregation}".encode()) % 1000)
    cfg = LossConfig(name=loss_name, aggregation=aggregation)
    corr = CorrectionConfig(mode=correction, mis_lower=0.7, mis_upper=1.4)
    ref_loss, ref_grad, ref_metrics = run_split(mb, mb.split(1, seed=0), cfg, corr)
    assert ref_grad.abs().sum() > 0
    for k in (2, 3, 7):
        loss, grad, metrics = run_split(mb, mb.split(k, seed=k), cfg, corr)
        assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14), k
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
        assert_same_metrics(metrics, ref_metrics)


def test_token_weights_of_each_mode_hand_computed():
    # seq 0: 2 valid tokens; seq 1: 3 tokens, one masked -> 2 valid; seq 2: 1 valid token.
    batch = PolicyBatch(
        logp=torch.zeros(6), behavior_logp=torch.zeros(6), mask=torch.tensor([1, 1, 1, 0, 1, 1]),
        seq_index=torch.tensor([0, 0, 1, 1, 1, 2]), advantages=torch.ones(3), num_seqs=3)
    inputs = screen(batch)
    norm = Normalizer(total_tokens=10, total_seqs=4, norm_constant=8)
    expected = {
        "token-mean": [0.1, 0.1, 0.1, 0, 0.1, 0.1],
        "seq-mean-token-mean": [1 / 8, 1 / 8, 1 / 8, 0, 1 / 8, 1 / 4],
        "seq-mean-token-sum": [0.25, 0.25, 0.25, 0, 0.25, 0.25],
        "seq-mean-token-sum-norm": [1 / 32, 1 / 32, 1 / 32, 0, 1 / 32, 1 / 32],
    }
    for mode, weights in expected.items():
        assert token_weights(inputs, norm, mode).tolist() == pytest.approx(weights), mode


def test_aggregation_errors_are_clear():
    batch = PolicyBatch(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.tensor([0, 0]), torch.ones(1), 1)
    with pytest.raises(ValueError, match="norm_constant"):
        compute_policy_loss(batch, Normalizer(2, 1), LossConfig(aggregation="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match="unknown aggregation 'sum'.*token-mean"):
        token_weights(screen(batch), Normalizer(2, 1), "sum")


def test_empty_mini_batch_gives_zero_loss_not_nan():
    batch = PolicyBatch(torch.zeros(3, requires_grad=True), torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                        torch.tensor([0, 0, 1]), torch.ones(2), 2)
    norm = normalizer_from_masks([batch])
    assert (norm.total_tokens, norm.total_seqs) == (0.0, 0.0)
    for name in available_losses():
        for mode in AGGREGATIONS:
            out = compute_policy_loss(batch, Normalizer(0, 0, norm_constant=1.0), LossConfig(name=name, aggregation=mode))
            assert out.loss.item() == 0.0


def test_normalizer_counts_valid_tokens_and_sequences_over_micro_batches():
    a = (torch.tensor([1, 1, 0, 0, 1]), torch.tensor([0, 0, 1, 1, 2]))  # seq 1 has no valid token
    b = PolicyBatch(torch.zeros(3), torch.zeros(3), torch.tensor([True, False, True]), torch.tensor([1, 0, 1]),
                    torch.zeros(2), 2)
    assert count_valid(*a) == (3, 2)
    norm = normalizer_from_masks([a, b], norm_constant=4.0)
    assert (norm.total_tokens, norm.total_seqs, norm.norm_constant) == (5.0, 3.0, 4.0)


def test_policy_batch_validation_names_the_field():
    ok = dict(logp=torch.zeros(4), behavior_logp=torch.zeros(4), mask=torch.ones(4),
              seq_index=torch.tensor([0, 0, 1, 1]), advantages=torch.zeros(2), num_seqs=2)
    PolicyBatch(**ok).validate()
    cases = [
        (dict(behavior_logp=torch.zeros(3)), "behavior_logp must have shape \\[4\\]"),
        (dict(seq_index=torch.tensor([0, 0, 1, 2])), "seq_index must lie in \\[0, num_seqs=2\\)"),
        (dict(seq_index=torch.tensor([0.0, 0, 1, 1])), "seq_index must be an integer"),
        (dict(advantages=torch.zeros(3)), "advantages must have shape \\[num_seqs=2\\]"),
        (dict(logp=torch.zeros(2, 2)), "logp must be flat"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            compute_policy_loss(PolicyBatch(**{**ok, **change}), Normalizer(4, 2), LossConfig())


class ThreadAllReduce:
    """An in-process all-reduce between threads, standing in for the CP group's all-reduce."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world
        self.shapes = []

    def hook(self, rank: int):
        def reduce(partial: torch.Tensor) -> torch.Tensor:
            assert not partial.requires_grad
            self.shapes.append(tuple(partial.shape))
            self.slots[rank] = partial.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            partial.copy_(total)  # in place, like torch.distributed.all_reduce
            return partial
        return reduce


@pytest.mark.parametrize("loss_name", available_losses())
def test_context_parallel_shards_sum_to_the_unsharded_loss(loss_name):
    mb = MiniBatch(seed=7, num_seqs=6)
    full = mb.micro_batch(list(range(6)))
    cfg = LossConfig(name=loss_name, aggregation="seq-mean-token-mean")
    corr = CorrectionConfig(mode="seq_tis")
    norm = normalizer_from_masks([full])
    ref = compute_policy_loss(full, norm, cfg, corr)
    ref.loss.backward()
    ref_grad = mb.logp.grad.clone()
    mb.logp.grad = None

    # Shard every sequence's tokens over 2 CP ranks (alternating tokens), from a fresh graph.
    full = mb.micro_batch(list(range(6)))
    shards = []
    for rank in range(2):
        sel = torch.arange(full.logp.shape[0]) % 2 == rank
        shards.append(PolicyBatch(full.logp[sel], full.behavior_logp[sel], full.mask[sel], full.seq_index[sel],
                                  full.advantages, full.num_seqs, full.rollout_logp[sel]))
    comm = ThreadAllReduce(2)
    outs, errors = [None, None], []

    def work(rank):
        try:
            outs[rank] = compute_policy_loss(shards[rank], norm, cfg, corr, seq_sum_reduce=comm.hook(rank))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            comm.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(shape[-1] == full.num_seqs for shape in comm.shapes)
    (outs[0].loss + outs[1].loss).backward()
    assert (outs[0].loss + outs[1].loss).item() == pytest.approx(ref.loss.item(), rel=1e-12)
    torch.testing.assert_close(mb.logp.grad, ref_grad, rtol=1e-12, atol=1e-15)
    # Reducing the ranks' metrics (what all_reduce over CP does) gives the unsharded metrics.
    assert_same_metrics(MetricBag.merged([outs[0].metrics, outs[1].metrics]).compute(), ref.metrics.compute())


def test_seq_sum_reduce_is_threaded_through_every_loss():
    mb = MiniBatch(seed=3, num_seqs=4)
    batch = mb.micro_batch([0, 1, 2, 3])
    for name in available_losses():
        calls = []

        def record(x, calls=calls):
            calls.append(tuple(x.shape))
            return x

        compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name=name),
                            CorrectionConfig(mode="seq_mis"), seq_sum_reduce=record)
        assert calls and all(s[-1] == 4 for s in calls)
        needs_seq_sum = name.startswith("vespo") or name == "gspo"
        # screen, correction, the sequence log-ratio diagnostic[, the loss's own log W]
        assert len(calls) == (4 if needs_seq_sum else 3), (name, calls)


def test_default_aggregation_is_seq_mean_token_mean_for_gspo_only():
    assert LossConfig(name="gspo").resolved_aggregation == "seq-mean-token-mean"
    assert all(LossConfig(name=n).resolved_aggregation == "token-mean" for n in available_losses() if n != "gspo")
