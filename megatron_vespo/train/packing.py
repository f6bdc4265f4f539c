"""Sequence packing: assign variable-length sequences to DP ranks and THD micro-batches.

Two steps:

1. :func:`pack_sequences` plans *where* each sequence goes. Sequences are spread over the
   data-parallel ranks so that every rank gets about the same number of tokens (longest first, each to
   the least-loaded rank), then each rank's sequences are packed into micro-batches of at most
   ``token_budget`` tokens. Megatron's forward-backward schedule needs the **same number of
   micro-batches on every DP rank**: ranks that would need fewer are repacked into that common count
   (split into more, smaller micro-batches), never padded with empty ones, unless a rank holds fewer
   sequences than the count; only then does it get empty micro-batches, which
   :func:`build_thd_micro_batch` turns into a masked padding-only micro-batch. The interleaved
   (virtual pipeline) schedule also needs the count to be a multiple of its micro-batch group
   (the pipeline size by default): ``count_multiple`` rounds it up the same way. Deterministic.

2. :func:`build_thd_micro_batch` lays the samples (:class:`~megatron_vespo.train.sample.TrainSample`)
   of one micro-batch end to end (THD layout, batch size 1) with the tensors the model and the loss need.

Off-by-one convention (next-token prediction). A sequence is ``z = prompt ++ response`` of length
``L = P + R``. At packed position ``o + k`` (``o`` is the sequence's offset):
``input_ids = z[k]``, ``labels = z[k + 1]`` and the logits there predict ``z[k + 1]``. So the
log-prob of response token ``y_j = z[P + j]`` is read at position ``o + P + j - 1``; that position
carries ``loss_mask = 1`` (if ``response_mask[j]``) and ``rollout_logp = rollout_logp[j]``. The last
position of every sequence has no next token: label 0, masked. The prompt must be non-empty.

Padding (``pad_to_multiple``, e.g. TP for sequence parallelism): ``T`` is rounded up with
``pad_token_id`` tokens at the end. They are masked (``loss_mask = 0``), their ``seq_index`` is ``S``
(one past the last real sequence: a dummy slot, so segment sums over ``S + 1`` slots keep the real
ones exact) and they form their own trailing segment in ``cu_seqlens`` (length ``S + 2`` then,
``S + 1`` without padding) so attention kernels see every token and real tokens never attend to them.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_vespo.train.sample import TrainSample

__all__ = ["OPTIONAL_TOKEN_FIELDS", "PackingPlan", "pack_sequences", "build_thd_micro_batch", "carried_fields",
           "iter_rank_micro_batches"]

# Per-token TrainSample fields a micro-batch carries only when its samples have them: π_old
# (train.recompute_old_logprobs) and π_ref (loss.kl).
OPTIONAL_TOKEN_FIELDS = ("old_logp", "ref_logp")


def carried_fields(samples: Sequence[TrainSample]) -> tuple[str, ...]:
    """The optional per-token fields any of ``samples`` has (then every one must have them)."""
    return tuple(name for name in OPTIONAL_TOKEN_FIELDS if any(getattr(s, name) is not None for s in samples))


@dataclass(frozen=True)
class PackingPlan:
    """``micro_batches[dp_rank][i]`` = indices (into the input list) of micro-batch ``i`` on that rank."""

    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]
    lengths: tuple[int, ...]
    token_budget: int

    @property
    def dp_size(self) -> int:
        return len(self.micro_batches)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per DP rank (the same on every rank)."""
        return len(self.micro_batches[0])

    def micro_batch_tokens(self, dp_rank: int) -> list[int]:
        return [sum(self.lengths[i] for i in mb) for mb in self.micro_batches[dp_rank]]

    def rank_tokens(self) -> list[int]:
        return [sum(self.micro_batch_tokens(r)) for r in range(self.dp_size)]

    def load_imbalance(self) -> float:
        """max / mean tokens over DP ranks (1.0 = perfect balance)."""
        tokens = self.rank_tokens()
        mean = sum(tokens) / len(tokens)
        return max(tokens) / mean if mean > 0 else 1.0


def _check_lengths(lengths: Sequence[int], token_budget: int, dp_size: int, allow_oversized: bool) -> None:
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    for i, n in enumerate(lengths):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sequence {i}: length must be a positive int, got {n!r}")
        if n > token_budget and not allow_oversized:
            raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch token_budget {token_budget} "
                             f"(raise the budget, drop/truncate the sequence, or pass allow_oversized=True to give "
                             f"it a micro-batch of its own)")


def _longest_first(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (-lengths[i], i))


def _balance_over_ranks(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Longest-processing-time greedy: each sequence, longest first, to the least-loaded rank."""
    heap = [(0, rank) for rank in range(dp_size)]  # (tokens, rank): ties go to the lower rank
    assigned: list[list[int]] = [[] for _ in range(dp_size)]
    for i in _longest_first(range(len(lengths)), lengths):
        tokens, rank = heapq.heappop(heap)
        assigned[rank].append(i)
        heapq.heappush(heap, (tokens + lengths[i], rank))
    return assigned


def _first_fit(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the fewest micro-batches we can cheaply find; oversized ones stand alone."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in _longest_first(indices, lengths):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def _balanced_fill(indices: Sequence[int], lengths: Sequence[int], budget: int, count: int) -> list[list[int]] | None:
    """Exactly ``count`` micro-batches of even size (longest first to the lightest); None if one overflows."""
    heap = [(0, b) for b in range(count)]
    bins: list[list[int]] = [[] for _ in range(count)]
    for i in _longest_first(indices, lengths):
        load, b = heapq.heappop(heap)
        if load + lengths[i] > budget:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def _split_to_count(bins: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Split multi-sequence micro-batches (most tokens first) until there are ``count``; then add empties."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.append([])  # fewer sequences than micro-batches: an empty (padding-only) micro-batch
            continue
        b = max(splittable, key=lambda k: (sum(lengths[i] for i in bins[k]), -k))
        halves = _balanced_fill(bins[b], lengths, budget=sum(lengths[i] for i in bins[b]), count=2)
        assert halves is not None and all(halves)  # two bins with the whole load as budget always fit
        bins[b:b + 1] = halves
    return bins


def pack_sequences(
    lengths: Sequence[int],
    token_budget: int,
    dp_size: int = 1,
    allow_oversized: bool = False,
    count_multiple: int = 1,
) -> PackingPlan:
    """Plan DP ranks and micro-batches for sequences of the given token lengths.

    Guarantees: every sequence appears exactly once; every micro-batch has at most ``token_budget``
    tokens (except an oversized sequence alone in its micro-batch when ``allow_oversized``); every DP
    rank has the same number of micro-batches, a multiple of ``count_multiple``; the result depends
    only on the inputs. Within a micro-batch, sequences keep their input order; micro-batches are
    ordered by first index.
    """
    lengths = list(lengths)
    _check_lengths(lengths, token_budget, dp_size, allow_oversized)
    if count_multiple < 1:
        raise ValueError(f"count_multiple must be >= 1, got {count_multiple}")
    per_rank = _balance_over_ranks(lengths, dp_size)
    first_fit = [_first_fit(indices, lengths, token_budget) for indices in per_rank]
    count = max(1, max(len(bins) for bins in first_fit))
    count = -(-count // count_multiple) * count_multiple  # more, smaller micro-batches; never fewer

    plan = []
    for indices, ffd_bins in zip(per_rank, first_fit):
        bins = None
        if not any(lengths[i] > token_budget for i in indices):
            bins = _balanced_fill(indices, lengths, token_budget, count)  # evens out micro-batch sizes
        if bins is None or any(not b for b in bins):
            bins = _split_to_count(ffd_bins, lengths, count)
        bins = [sorted(b) for b in bins]
        bins.sort(key=lambda b: (not b, b[0] if b else 0))  # by first index, empty ones last
        plan.append(tuple(tuple(b) for b in bins))
    return PackingPlan(micro_batches=tuple(plan), lengths=tuple(lengths), token_budget=token_budget)


def _as_long(value: Any, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() != 1 or (tensor.numel() and (tensor.is_floating_point() or tensor.is_complex())):
        raise ValueError(f"sequence {index}: {name} must be a 1-D list/tensor of ints, got shape "
                         f"{tuple(tensor.shape)} dtype {tensor.dtype}")
    return tensor.long()


def _per_token(values: Any, name: str, index: int, n_resp: int) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32)
    if tensor.shape != (n_resp,):
        raise ValueError(f"sequence {index}: {name} has shape {tuple(tensor.shape)}, response_ids has {n_resp} tokens")
    return tensor


def _advantage(value: Any, index: int) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"sequence {index}: advantage must be a scalar, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sequence {index}: advantage must be a number, got {type(value).__name__}")
    return float(value)


def build_thd_micro_batch(
    samples: Sequence[TrainSample],
    pad_to_multiple: int = 1,
    pad_token_id: int = 0,
    optional_fields: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Pack samples end to end into one THD micro-batch (see the module docstring for the layout).

    ``optional_fields``: which of :data:`OPTIONAL_TOKEN_FIELDS` (π_old ``old_logp``, π_ref ``ref_logp``)
    the micro-batch carries; by default those the samples have (:func:`carried_fields`; then every
    one must). Give them explicitly for a micro-batch with no samples.

    Returns ``input_ids``, ``position_ids``, ``labels``, ``seq_index`` (int64 ``[T]``), ``loss_mask``,
    ``rollout_logp`` and the optional fields (float32 ``[T]``, aligned with ``labels``),
    ``advantage`` (``[S]``), ``cu_seqlens`` (int32), ``max_seqlen``, ``num_sequences`` (S),
    ``num_tokens`` (T, padding included) and ``num_padding``. With no samples, the micro-batch is
    ``max(pad_to_multiple, 1)`` padding tokens, all masked.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if optional_fields is None:
        optional_fields = carried_fields(samples)
    unknown = set(optional_fields) - set(OPTIONAL_TOKEN_FIELDS)
    if unknown:
        raise ValueError(f"optional_fields {sorted(unknown)} are not among {OPTIONAL_TOKEN_FIELDS}")
    token_fields = ("rollout_logp", *optional_fields)

    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "position_ids", "labels", "loss_mask",
                                                             "seq_index", *token_fields)}
    advantages: list[float] = []
    seq_lengths: list[int] = []
    for s, sample in enumerate(samples):
        prompt = _as_long(sample.prompt_ids, "prompt_ids", s)
        response = _as_long(sample.response_ids, "response_ids", s)
        n_prompt, n_resp = len(prompt), len(response)
        if n_prompt < 1:
            raise ValueError(f"sequence {s}: empty prompt_ids; the first response token is predicted from the "
                             f"last prompt token, so at least one is needed")
        resp_mask = torch.ones(n_resp) if sample.response_mask is None else _per_token(
            sample.response_mask, "response_mask", s, n_resp)
        tokens = torch.cat([prompt, response])
        length = n_prompt + n_resp

        # position k predicts tokens[k + 1]; response token j is predicted at position P - 1 + j
        labels = torch.zeros(length, dtype=torch.long)
        labels[:-1] = tokens[1:]
        loss_mask = torch.zeros(length)
        loss_mask[n_prompt - 1:length - 1] = resp_mask
        pieces["input_ids"].append(tokens)
        pieces["position_ids"].append(torch.arange(length))
        pieces["labels"].append(labels)
        pieces["loss_mask"].append(loss_mask)
        pieces["seq_index"].append(torch.full((length,), s, dtype=torch.long))
        for name in token_fields:
            values = getattr(sample, name)
            if values is None:
                raise ValueError(f"sequence {s}: {name} is missing (the other samples of the micro-batch have it)")
            aligned = torch.zeros(length)
            aligned[n_prompt - 1:length - 1] = _per_token(values, name, s, n_resp)
            pieces[name].append(aligned)
        advantages.append(_advantage(sample.advantage, s))
        seq_lengths.append(length)

    real_tokens = sum(seq_lengths)
    multiple_of = max(pad_to_multiple, 1)
    total = max(-(-real_tokens // multiple_of) * multiple_of, multiple_of if not samples else 0)
    n_pad = total - real_tokens
    if n_pad:
        pieces["input_ids"].append(torch.full((n_pad,), pad_token_id, dtype=torch.long))
        pieces["position_ids"].append(torch.arange(n_pad))
        pieces["labels"].append(torch.zeros(n_pad, dtype=torch.long))
        pieces["loss_mask"].append(torch.zeros(n_pad))
        pieces["seq_index"].append(torch.full((n_pad,), len(samples), dtype=torch.long))
        for name in token_fields:
            pieces[name].append(torch.zeros(n_pad))

    segments = seq_lengths + ([n_pad] if n_pad else [])
    batch: dict[str, Any] = {name: torch.cat(parts) for name, parts in pieces.items()}
    batch["cu_seqlens"] = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch["max_seqlen"] = max(segments)
    batch["num_sequences"] = len(samples)
    batch["num_tokens"] = total
    batch["num_padding"] = n_pad
    batch["advantage"] = torch.tensor(advantages) if advantages else torch.zeros(0)
    return batch


def iter_rank_micro_batches(
    plan: PackingPlan,
    samples: Sequence[TrainSample],
    dp_rank: int,
    **build_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """The THD micro-batches of one DP rank, each with ``sample_index [S]`` (indices into ``samples``)."""
    if len(samples) != len(plan.lengths):
        raise ValueError(f"plan was made for {len(plan.lengths)} sequences, got {len(samples)}")
    if not 0 <= dp_rank < plan.dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside the plan's {plan.dp_size} data-parallel ranks")
    # Every micro-batch (an empty one too) carries the same fields.
    build_kwargs.setdefault("optional_fields", carried_fields(samples))
    for indices in plan.micro_batches[dp_rank]:
        chosen = [samples[i] for i in indices]
        for i, sample in zip(indices, chosen):
            if sample.num_tokens != plan.lengths[i]:
                raise ValueError(f"sequence {i} has {sample.num_tokens} tokens, the plan says {plan.lengths[i]}")
        batch = build_thd_micro_batch(chosen, **build_kwargs)
        batch["sample_index"] = torch.tensor(indices, dtype=torch.long)
        yield batch
