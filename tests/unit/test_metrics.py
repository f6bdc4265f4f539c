"""MetricBag: each statistic kind, merging micro-batches, empty groups, and a real 2-process all_reduce."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_vespo.losses import normalizer_from_masks
from megatron_vespo.metrics import MetricBag


def test_each_kind_computes_its_statistic():
    bag = MetricBag()
    values = torch.tensor([1.0, 2.0, 4.0, 8.0])
    mask = torch.tensor([True, True, False, True])
    bag.add_mean("m", values, mask)
    bag.add_sum("s", values, mask)
    bag.add_max("hi", values, mask)
    bag.add_min("lo", values, mask)
    bag.add_std("sd", values, mask)
    out = bag.compute()
    assert out["m"] == pytest.approx(11 / 3) and out["s"] == 11.0
    assert out["hi"] == 8.0 and out["lo"] == 1.0
    assert out["sd"] == pytest.approx(float(torch.tensor([1.0, 2.0, 8.0]).std(unbiased=False)))


def test_merge_pools_micro_batches_like_one_batch():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, generator=g, dtype=torch.float64)
    whole = MetricBag()
    for add in ("add_mean", "add_std", "add_sum", "add_max", "add_min"):
        getattr(whole, add)(add, values)
    pieces = []
    for chunk in values.split([7, 20, 1, 22]):
        bag = MetricBag()
        for add in ("add_mean", "add_std", "add_sum", "add_max", "add_min"):
            getattr(bag, add)(add, chunk)
        pieces.append(bag)
    merged = MetricBag.merged(pieces).compute()
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value, rel=1e-12), key


def test_weights_and_pre_summed_means():
    bag = MetricBag()
    bag.add_mean("w", torch.tensor([1.0, 3.0]), weights=torch.tensor([0.25, 0.75]))
    bag.add_mean("w", torch.tensor([5.0]), weights=torch.tensor([1.0]))
    bag.add_mean_parts("ratio", total=6.0, count=4.0)
    bag.add_sum("count", torch.tensor([True, False, True]), weights=torch.tensor([0.5, 9.0, 0.25]))
    out = bag.compute()
    assert out["w"] == pytest.approx((0.25 + 2.25 + 5.0) / 2.0)
    assert out["ratio"] == 1.5 and out["count"] == 0.75


def test_empty_groups_are_left_out_but_sums_report_zero():
    bag = MetricBag()
    empty = torch.zeros(0)
    for add in ("add_mean", "add_std", "add_max", "add_min", "add_sum"):
        getattr(bag, add)(add, empty)
    bag.add_mean("all_masked", torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert bag.compute() == {"add_sum": 0.0}
    assert len(bag) == 6 and "all_masked" in bag  # still present, so every rank reduces the same names
    assert MetricBag().compute() == {}


def test_real_infinities_are_kept():
    bag = MetricBag()
    bag.add_max("hi", torch.tensor([1.0, math.inf]))
    bag.add_min("lo", torch.tensor([-math.inf]))
    assert bag.compute() == {"hi": math.inf, "lo": -math.inf}


def test_a_name_keeps_its_kind():
    bag = MetricBag()
    bag.add_mean("x", 1.0)
    with pytest.raises(ValueError, match="metric 'x' was added as 'mean'; cannot add it as 'max'"):
        bag.add_max("x", 2.0)
    other = MetricBag()
    other.add_sum("x", 1.0)
    with pytest.raises(ValueError, match="'mean'; cannot add it as 'sum'"):
        bag.merge(other)


def test_all_reduce_without_a_process_group_is_a_no_op():
    bag = MetricBag()
    bag.add_sum("s", 2.0)
    assert bag.all_reduce().compute() == {"s": 2.0}


def _worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bag = MetricBag()
        values = torch.arange(4, dtype=torch.float64) + 10 * rank  # rank 0: 0..3, rank 1: 10..13
        bag.add_mean("mean", values)
        bag.add_std("std", values)
        bag.add_sum("sum", values)
        bag.add_max("max", values)
        bag.add_min("min", values)
        if rank == 1:  # a metric only one rank produced: names differ, the bag must still line up
            bag.add_mean("only_rank1", torch.tensor([7.0]))
            bag.add_max("only_rank1_max", torch.tensor([-2.0]))
        bag.add_mean("empty_everywhere", torch.zeros(0))
        out = bag.all_reduce().compute()
        # Same names on both ranks on the second round: header + one reduction per op kind.
        bag2 = MetricBag()
        bag2.add_sum("a", float(rank + 1))
        bag2.add_max("b", float(rank))
        bag2.add_min("c", float(rank))
        calls2 = []
        original = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (calls2.append(t.numel()), original(t, *a, **k))[1]
        try:
            out2 = bag2.all_reduce().compute()
        finally:
            dist.all_reduce = original
        norm = normalizer_from_masks([(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))], norm_constant=2.0,
                                     all_reduce_group=dist.group.WORLD)
        results.put((rank, out, out2, calls2, (norm.total_tokens, norm.total_seqs, norm.norm_constant)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_all_reduce_over_two_gloo_processes():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, results)) for r in range(2)]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    all_values = torch.tensor([0.0, 1, 2, 3, 10, 11, 12, 13], dtype=torch.float64)
    expected = {
        "mean": float(all_values.mean()), "std": float(all_values.std(unbiased=False)),
        "sum": float(all_values.sum()), "max": 13.0, "min": 0.0, "only_rank1": 7.0, "only_rank1_max": -2.0,
    }
    for rank, out, out2, calls2, norm in sorted(got, key=lambda g: g[0]):
        assert out.keys() == expected.keys()  # "empty_everywhere" stays out
        for key, value in expected.items():
            assert out[key] == pytest.approx(value, rel=1e-12), (rank, key)
        assert out2 == {"a": 3.0, "b": 1.0, "c": 0.0}
        assert calls2 == [2, 1, 1, 1]  # name check, SUM, MAX, MIN
        assert norm == (4.0, 2.0, 2.0)
