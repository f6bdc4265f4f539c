"""The flat token representation every policy loss reads, and its per-sequence (segment) sums.

One micro-batch is a flat run of N tokens (what a packed THD batch gives; a padded [B, T] batch is
flattened together with its mask). ``seq_index`` names the sequence of each token, so per-sequence
quantities are segment sums. A sequence never spans two micro-batches, but with context parallelism
it spans CP ranks: every segment sum goes through a ``seq_sum_reduce`` hook that the trainer sets to
an all-reduce over the CP group (identity otherwise).

Robustness: :func:`screen` marks a sequence "bad" when any of its valid tokens has a non-finite
log-prob (current, behaviour, rollout or reference) or entropy, or its advantage is non-finite. Bad
sequences are removed with ``torch.where`` *before* any arithmetic, so no NaN/inf ever enters the
autograd graph (where ``0 * nan = nan`` would poison the backward pass); they contribute exactly zero
loss and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_vespo.metrics import MetricBag

SeqSumReduce = Callable[[Tensor], Tensor]
"""Hook applied to per-sequence partial sums (last dimension = num_seqs; a [k, num_seqs] stack when
several sums are reduced at once). It must return the elementwise sum over the CP ranks; the
tensors it receives never require grad."""


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class PolicyBatch:
    """One micro-batch of response tokens, flat over tokens."""

    logp: Tensor  # [N] log π_θ per token (requires grad in training)
    behavior_logp: Tensor  # [N] ratio denominator: μ from the rollout engine (default) or π_old
    mask: Tensor  # [N] bool or 0/1: tokens that count (response tokens)
    seq_index: Tensor  # [N] int64 in [0, num_seqs): sequence of each token
    advantages: Tensor  # [num_seqs] one per sequence
    num_seqs: int
    rollout_logp: Optional[Tensor] = None  # [N] μ when behavior_logp is π_old (TIS/MIS, gap metric)
    ref_logp: Optional[Tensor] = None  # [N] log π_ref of the frozen reference model (loss.kl)
    entropy: Optional[Tensor] = None  # [N] entropy of π_θ per token (requires grad for the entropy bonus)

    def validate(self) -> None:
        """Checks shapes and dtypes (and the seq_index range for host tensors: free of device syncs)."""
        if self.logp.dim() != 1:
            raise ValueError(f"PolicyBatch.logp must be flat [N]; got shape {tuple(self.logp.shape)}")
        n = self.logp.shape[0]
        named = {"behavior_logp": self.behavior_logp, "mask": self.mask, "seq_index": self.seq_index}
        for name in ("rollout_logp", "ref_logp", "entropy"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        for name, t in named.items():
            if tuple(t.shape) != (n,):
                raise ValueError(f"PolicyBatch.{name} must have shape [{n}] like logp; got {tuple(t.shape)}")
        if self.seq_index.dtype.is_floating_point or self.seq_index.dtype == torch.bool:
            raise ValueError(f"PolicyBatch.seq_index must be an integer tensor; got {self.seq_index.dtype}")
        if not isinstance(self.num_seqs, int) or self.num_seqs < 0:
            raise ValueError(f"PolicyBatch.num_seqs must be a non-negative int; got {self.num_seqs!r}")
        if tuple(self.advantages.shape) != (self.num_seqs,):
            raise ValueError(f"PolicyBatch.advantages must have shape [num_seqs={self.num_seqs}]; "
                             f"got {tuple(self.advantages.shape)}")
        if self.seq_index.device.type == "cpu" and n:
            lo, hi = int(self.seq_index.min()), int(self.seq_index.max())
            if lo < 0 or hi >= self.num_seqs:
                raise ValueError(f"PolicyBatch.seq_index must lie in [0, num_seqs={self.num_seqs}); "
                                 f"got values in [{lo}, {hi}]")

    @property
    def valid(self) -> Tensor:
        """The mask as bool."""
        return self.mask if self.mask.dtype == torch.bool else self.mask != 0


@dataclass
class Normalizer:
    """Counts over the WHOLE mini-batch (all micro-batches, all data-parallel ranks), fixed before the
    step so that the loss and gradient do not depend on how the mini-batch is split."""

    total_tokens: float  # valid (mask) tokens
    total_seqs: float  # sequences with >= 1 valid token
    norm_constant: Optional[float] = None  # divisor of seq-mean-token-sum-norm

    def validate(self) -> None:
        if self.total_tokens < 0 or self.total_seqs < 0:
            raise ValueError(f"Normalizer counts must be >= 0; got total_tokens={self.total_tokens}, "
                             f"total_seqs={self.total_seqs}")
        if self.norm_constant is not None and not self.norm_constant > 0:
            raise ValueError(f"Normalizer.norm_constant must be > 0; got {self.norm_constant}")


@dataclass
class LossOutput:
    loss: Tensor  # scalar: this micro-batch's share; the sum over micro-batches and DP ranks is the mini-batch loss
    metrics: MetricBag = field(default_factory=MetricBag)


def segment_sum(values: Tensor, seq_index: Tensor, num_seqs: int,
                seq_sum_reduce: Optional[SeqSumReduce] = None) -> Tensor:
    """Per-sequence sums of token ``values`` ([N] -> [num_seqs], or [k, N] -> [k, num_seqs]),
    reduced over context-parallel ranks by ``seq_sum_reduce``. Detached: only counts and
    stop-gradient quantities are summed per sequence."""
    values = values.detach()
    out = values.new_zeros(*values.shape[:-1], num_seqs)
    out.index_add_(-1, seq_index, values)
    return (seq_sum_reduce or _identity)(out)


def count_valid(mask: Tensor, seq_index: Tensor) -> tuple[int, int]:
    """(valid tokens, sequences with >= 1 valid token) of one micro-batch (not CP-sharded)."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    return int(valid.sum()), int(torch.unique(seq_index[valid]).numel())


def normalizer_from_masks(
    masks_and_seq_indices: Iterable[Union[PolicyBatch, tuple[Tensor, Tensor]]],
    norm_constant: Optional[float] = None,
    all_reduce_group: Optional[dist.ProcessGroup] = None,
) -> Normalizer:
    """The :class:`Normalizer` of a mini-batch from each micro-batch's ``(mask, seq_index)`` (or its
    PolicyBatch), summed over micro-batches and, when ``all_reduce_group`` is given (the
    data-parallel group), over its ranks. Pass whole (not CP-sharded) micro-batches, else sequences
    split across CP ranks are counted once per rank."""
    tokens, seqs = 0, 0
    for item in masks_and_seq_indices:
        mask, seq_index = (item.mask, item.seq_index) if isinstance(item, PolicyBatch) else item
        t, s = count_valid(mask, seq_index)
        tokens += t
        seqs += s
    if all_reduce_group is not None and dist.is_initialized() and dist.get_world_size(all_reduce_group) > 1:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(all_reduce_group) == "nccl" else torch.device("cpu"))
        counts = torch.tensor([tokens, seqs], dtype=torch.float64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=all_reduce_group)
        tokens, seqs = (int(v) for v in counts.tolist())
    out = Normalizer(total_tokens=float(tokens), total_seqs=float(seqs), norm_constant=norm_constant)
    out.validate()
    return out


@dataclass
class ScreenedBatch:
    """A PolicyBatch after the validity screen: the inputs every loss reads.

    Token tensors are in ``dtype`` (at least float32) and are 0 wherever ``active`` is false, so
    their values there are harmless; ``logp`` keeps the graph to ``PolicyBatch.logp`` for active
    tokens only."""

    source: PolicyBatch
    dtype: torch.dtype
    logp: Tensor  # [N] ℓ (grad flows for active tokens)
    behavior_logp: Tensor  # [N] b, detached
    rollout_logp: Optional[Tensor]  # [N] μ, detached (None when not given)
    ref_logp: Optional[Tensor]  # [N] log π_ref, detached (None when not given)
    entropy: Optional[Tensor]  # [N] token entropy (grad flows for active tokens; None when not given)
    valid: Tensor  # [N] bool: the mask as given
    active: Tensor  # [N] bool: valid token of a good sequence
    seq_tokens: Tensor  # [num_seqs] valid tokens T_i (all CP ranks), bad sequences included
    seq_bad: Tensor  # [num_seqs] bool: has a non-finite input
    seq_active: Tensor  # [num_seqs] bool: T_i > 0 and not bad
    seq_share: Tensor  # [num_seqs] this rank's fraction of T_i (1 without CP): weighs sequence metrics
    advantages: Tensor  # [num_seqs] (0 for bad sequences)
    seq_sum_reduce: SeqSumReduce

    @property
    def seq_index(self) -> Tensor:
        return self.source.seq_index

    @property
    def num_seqs(self) -> int:
        return self.source.num_seqs

    @property
    def token_advantages(self) -> Tensor:
        return self.advantages[self.seq_index]

    def seq_sum(self, values: Tensor) -> Tensor:
        """Segment sum (over CP ranks) of token values; see :func:`segment_sum`."""
        return segment_sum(values, self.seq_index, self.num_seqs, self.seq_sum_reduce)


def screen(batch: PolicyBatch, seq_sum_reduce: Optional[SeqSumReduce] = None) -> ScreenedBatch:
    """Validates ``batch``, finds bad sequences and zeroes every input outside the active tokens."""
    batch.validate()
    reduce = seq_sum_reduce or _identity
    dtype = torch.promote_types(batch.logp.dtype, torch.float32)
    valid = batch.valid
    finite = torch.isfinite(batch.logp.detach()) & torch.isfinite(batch.behavior_logp)
    for optional in (batch.rollout_logp, batch.ref_logp, batch.entropy):
        if optional is not None:
            finite &= torch.isfinite(optional.detach())
    local = segment_sum(torch.stack([valid.to(dtype), (valid & ~finite).to(dtype)]), batch.seq_index, batch.num_seqs)
    local_tokens = local[0].clone()  # the hook may all-reduce in place
    counts = reduce(local)
    seq_tokens, seq_nonfinite = counts[0], counts[1]
    seq_bad = (seq_nonfinite > 0) | (~torch.isfinite(batch.advantages) & (seq_tokens > 0))
    active = valid & ~seq_bad[batch.seq_index]
    zero = torch.zeros((), dtype=dtype, device=batch.logp.device)

    def clean(t: Tensor) -> Tensor:
        return torch.where(active, t.to(dtype), zero)

    return ScreenedBatch(
        source=batch,
        dtype=dtype,
        logp=clean(batch.logp),
        behavior_logp=clean(batch.behavior_logp.detach()),
        rollout_logp=None if batch.rollout_logp is None else clean(batch.rollout_logp.detach()),
        ref_logp=None if batch.ref_logp is None else clean(batch.ref_logp.detach()),
        entropy=None if batch.entropy is None else clean(batch.entropy),
        valid=valid,
        active=active,
        seq_tokens=seq_tokens,
        seq_bad=seq_bad,
        seq_active=(seq_tokens > 0) & ~seq_bad,
        seq_share=local_tokens / seq_tokens.clamp_min(1.0),
        # Non-finite advantages of token-less sequences are zeroed too (their masked tokens exist).
        advantages=torch.where(seq_bad | ~torch.isfinite(batch.advantages), zero,
                               batch.advantages.detach().to(dtype)),
        seq_sum_reduce=reduce,
    )
