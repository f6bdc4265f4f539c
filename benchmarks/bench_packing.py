"""Padding and DP load balance of THD packing vs naive padded batches on long-tailed lengths.

Sequences: prompt 64-1024 tokens (uniform) + response lognormal (median ~1800, capped at 15360), so a
sequence has at most 16384 tokens, like the paper's setup. Ours: pack_sequences with a 16384-token
budget per micro-batch over 8 DP ranks, micro-batches built for real with build_thd_micro_batch
(padded to a multiple of --pad-to-multiple). Naive: contiguous blocks of sequences per DP rank,
micro-batches of a fixed number of sequences (or as many as fit the budget once padded) padded to
the longest one in the micro-batch.

    python benchmarks/bench_packing.py [--sequences 1024] [--dp 8] [--budget 16384]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_vespo.train.packing import iter_rank_micro_batches, pack_sequences, sequence_length  # noqa: E402


def make_sequences(n: int, seed: int, max_prompt: int = 1024, max_response: int = 15360) -> list[dict]:
    rng = random.Random(seed)
    sequences = []
    for i in range(n):
        prompt = rng.randint(64, max_prompt)
        response = min(max_response, max(1, int(rng.lognormvariate(7.5, 1.0))))
        sequences.append(dict(prompt_ids=torch.zeros(prompt, dtype=torch.long),
                              response_ids=torch.ones(response, dtype=torch.long),
                              rollout_logp=torch.zeros(response), advantage=float(i % 3 - 1)))
    return sequences


def naive_padded(lengths: list[int], dp: int, seqs_per_micro_batch: int) -> tuple[float, float, int]:
    """(padding fraction, DP imbalance in padded tokens, micro-batches per rank) for fixed-size batches."""
    per_rank = -(-len(lengths) // dp)
    padded_per_rank, real = [], sum(lengths)
    for r in range(dp):
        block = lengths[r * per_rank:(r + 1) * per_rank]
        batches = [block[i:i + seqs_per_micro_batch] for i in range(0, len(block), seqs_per_micro_batch)]
        padded_per_rank.append(sum(len(b) * max(b) for b in batches))
    total = sum(padded_per_rank)
    return 1 - real / total, max(padded_per_rank) / (total / dp), -(-per_rank // seqs_per_micro_batch)


def naive_padded_by_budget(lengths: list[int], dp: int, budget: int) -> tuple[float, float, int]:
    """Like naive_padded, but each micro-batch takes sequences in order while count x max fits the budget."""
    per_rank = -(-len(lengths) // dp)
    padded_per_rank, counts = [], []
    for r in range(dp):
        batches: list[list[int]] = []
        for n in lengths[r * per_rank:(r + 1) * per_rank]:
            if batches and (len(batches[-1]) + 1) * max(max(batches[-1]), n) <= budget:
                batches[-1].append(n)
            else:
                batches.append([n])
        padded_per_rank.append(sum(len(b) * max(b) for b in batches))
        counts.append(len(batches))
    total = sum(padded_per_rank)
    return 1 - sum(lengths) / total, max(padded_per_rank) / (total / dp), max(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--pad-to-multiple", type=int, default=8, help="e.g. the TP size for sequence parallelism")
    parser.add_argument("--naive-batch", type=int, default=8, help="sequences per naive padded micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sequences = make_sequences(args.sequences, args.seed)
    lengths = [sequence_length(s) for s in sequences]
    mean = sum(lengths) / len(lengths)
    print(f"{len(lengths)} sequences, {sum(lengths)} tokens: mean {mean:.0f}, median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}; DP={args.dp}, token budget {args.budget}, pad to multiple of {args.pad_to_multiple}")

    start = time.perf_counter()
    plan = pack_sequences(lengths, token_budget=args.budget, dp_size=args.dp)
    plan_seconds = time.perf_counter() - start
    start = time.perf_counter()
    processed_per_rank, padding = [], 0
    for rank in range(args.dp):
        batches = list(iter_rank_micro_batches(plan, sequences, rank, pad_to_multiple=args.pad_to_multiple))
        processed_per_rank.append(sum(b["num_tokens"] for b in batches))
        padding += sum(b["num_padding"] for b in batches)
    build_seconds = time.perf_counter() - start
    processed = sum(processed_per_rank)
    ours_padding = padding / processed
    ours_imbalance = max(processed_per_rank) / (processed / args.dp)

    naive_pad, naive_imbalance, naive_count = naive_padded(lengths, args.dp, args.naive_batch)
    block = -(-len(lengths) // args.dp)
    real_blocks = [sum(lengths[r * block:(r + 1) * block]) for r in range(args.dp)]
    naive_real_imbalance = max(real_blocks) / (sum(real_blocks) / args.dp)

    print(f"{'':<44} {'padding':>8} {'DP max/mean':>12} {'micro-batches/rank':>19}")
    print(f"{'ours (THD packing, balanced)':<44} {ours_padding:>8.2%} {ours_imbalance:>12.4f} "
          f"{plan.num_micro_batches:>19}")
    print(f"{f'naive ({args.naive_batch} seqs/micro-batch, pad to max)':<44} {naive_pad:>8.2%} "
          f"{naive_imbalance:>12.4f} {naive_count:>19}")
    budget_pad, budget_imbalance, budget_count = naive_padded_by_budget(lengths, args.dp, args.budget)
    print(f"{'naive (pad to max, count x max <= budget)':<44} {budget_pad:>8.2%} {budget_imbalance:>12.4f} "
          f"{budget_count:>16} max")
    print(f"{'naive contiguous DP split, real tokens only':<44} {'':>8} {naive_real_imbalance:>12.4f}")
    fill = sum(lengths) / (plan.num_micro_batches * args.dp * args.budget)
    print(f"ours: micro-batch fill {fill:.1%} of the budget; planning {plan_seconds * 1e3:.1f} ms, "
          f"building all THD micro-batches {build_seconds:.2f} s")
    print(f"targets: padding <= 2% -> {'met' if ours_padding <= 0.02 else 'MISSED'}; "
          f"DP max/mean <= 1.05 -> {'met' if ours_imbalance <= 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
