"""Token log-probs (and optional entropy) from vocab-parallel logits, computed in chunks of tokens.

With tensor parallelism the output layer gives each TP rank a contiguous shard of the vocabulary:
``logits [N, V/TP]``. The log-prob of a label is ``x[label] - logsumexp(x)`` over the *full*
vocabulary, so the row max (MAX) and the sum of exponentials (SUM) are all-reduced over the TP group,
and the label's logit is taken on the rank that owns it and all-reduced (SUM).

Memory: a naive ``log_softmax(logits).gather(labels)`` keeps an ``[N, V]`` log-softmax for backward
and its backward allocates two more ``[N, V]`` tensors. Here the forward works on one
``[chunk_tokens, V/TP]`` fp32 buffer at a time and saves only the input logits (no copy) and ``[N]``
statistics; the backward recomputes the softmax chunk by chunk directly into the gradient tensor.
Peak memory of forward + backward is about the logits plus their gradient (plus one chunk buffer for
bf16/fp16 logits or when the entropy is differentiated). The backward needs no communication: once
the global max and sum are known, ``d logp / d x_j = onehot_j - p_j`` is local to the shard.

All arithmetic is fp32 per chunk, whatever the logits' dtype; the returned log-probs and entropies
are fp32 and the gradient has the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_logprobs", "vocab_range"]


def vocab_range(rank: int, world_size: int, vocab_local: int) -> tuple[int, int]:
    """Global ids ``[start, end)`` of the vocabulary shard held by TP rank ``rank``.

    Megatron splits the (padded) vocabulary into ``world_size`` contiguous shards of ``vocab_local``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the tensor-parallel group of size {world_size}")
    if vocab_local < 1:
        raise ValueError(f"vocab_local must be >= 1, got {vocab_local}")
    return rank * vocab_local, (rank + 1) * vocab_local


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)


class _ChunkedVocabParallelLogProbs(torch.autograd.Function):
    """Forward: log p(label) and optionally entropy; backward recomputes the softmax per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,          # [N, V_local], contiguous
        labels: torch.Tensor,          # [N] global ids
        vocab_start: int,
        n_valid: int,                  # leading local columns that are real vocabulary entries
        tp_group: dist.ProcessGroup | None,
        chunk_tokens: int,
        temperature: float,
        compute_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        logp = torch.empty(n_tokens, **f32)
        lse = torch.empty(n_tokens, **f32)
        entropy = torch.empty(n_tokens if compute_entropy else 0, **f32)
        owner_count = torch.empty(n_tokens, **f32)

        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < n_valid)
        local_label = torch.where(owned, local_label, torch.zeros_like(local_label))

        # One fp32 work buffer reused by every chunk: the only [chunk, V_local] temporary
        # (plus one more for the entropy's x*log x term).
        buffer = torch.empty(min(chunk_tokens, n_tokens), n_valid, **f32)
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            x = buffer[: end - start]
            x.copy_(logits[start:end, :n_valid])
            if temperature != 1.0:
                x.div_(temperature)

            row_max = x.amax(dim=-1) if n_valid > 0 else torch.full((end - start,), -torch.inf, **f32)
            _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)

            is_owned = owned[start:end]
            label_logit = x.gather(1, local_label[start:end, None]).squeeze(1) if n_valid > 0 else row_max
            label_logit = torch.where(is_owned, label_logit, torch.zeros_like(label_logit))

            x.sub_(row_max[:, None]).exp_()  # x now holds exp(x - max)
            columns = [x.sum(dim=-1), label_logit, is_owned.float()]
            if compute_entropy:
                # sum_j e_j * (x_j - max) = sum_j e_j * log e_j; xlogy keeps e_j == 0 at exactly 0
                columns.append(torch.xlogy(x, x).sum(dim=-1))
            stats = torch.stack(columns, dim=1)
            _all_reduce(stats, dist.ReduceOp.SUM, tp_group)

            sum_exp = stats[:, 0]
            log_sum_exp = sum_exp.log()
            lse[start:end] = row_max + log_sum_exp
            # (x_label - max) - log S: the rounding order of torch.log_softmax
            logp[start:end] = (stats[:, 1] - row_max) - log_sum_exp
            owner_count[start:end] = stats[:, 2]
            if compute_entropy:
                # H = -sum p log p = log S - sum_j e_j (x_j - max) / S
                entropy[start:end] = log_sum_exp - stats[:, 3] / sum_exp
        del buffer

        bad = (owner_count != 1).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(labels[i])} is owned by {int(owner_count[i])} tensor-parallel vocabulary "
                f"shards (expected exactly 1): the label is outside the vocabulary, or vocab_start/vocab_size "
                f"are inconsistent across ranks ({bad.shape[0]} bad token(s) in all)")

        ctx.save_for_backward(logits, local_label, owned, lse, entropy)
        ctx.n_valid = n_valid
        ctx.chunk_tokens = chunk_tokens
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):  # type: ignore[override]
        logits, local_label, owned, lse, entropy = ctx.saved_tensors
        if entropy.numel() == 0:
            grad_entropy = None
        no_input_grads = (None,) * 7
        if grad_logp is None and grad_entropy is None:
            return (None, *no_input_grads)

        n_tokens = logits.shape[0]
        n_valid, chunk_tokens, temperature = ctx.n_valid, ctx.chunk_tokens, ctx.temperature
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if n_valid < logits.shape[1]:
            grad[:, n_valid:].zero_()  # padded vocabulary columns take no part in the softmax
        if n_valid == 0:
            grad.zero_()
            return (grad, *no_input_grads)

        # fp32 logits: recompute straight into the gradient (no extra buffer); otherwise via fp32.
        write_in_place = grad.dtype == torch.float32
        buffer = None if write_in_place else torch.empty(
            min(chunk_tokens, n_tokens), n_valid, dtype=torch.float32, device=logits.device)
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            x = grad[start:end, :n_valid] if write_in_place else buffer[: end - start]
            x.copy_(logits[start:end, :n_valid])
            if temperature != 1.0:
                x.div_(temperature)
            x.sub_(lse[start:end, None])  # log p

            entropy_term = None
            if grad_entropy is not None:
                # dH/dx_j = -p_j (log p_j + H)
                entropy_term = x + entropy[start:end, None]
                x.exp_()
                entropy_term.mul_(x).mul_(-grad_entropy[start:end, None])
            else:
                x.exp_()  # p

            if grad_logp is not None:
                # d log p(label) / dx_j = onehot_j - p_j; the one-hot only on the owning shard
                g = grad_logp[start:end]
                x.mul_(-g[:, None])
                x.scatter_add_(1, local_label[start:end, None],
                               torch.where(owned[start:end], g, torch.zeros_like(g))[:, None])
                if entropy_term is not None:
                    x.add_(entropy_term)
            else:
                x.copy_(entropy_term)
            if temperature != 1.0:
                x.div_(temperature)  # chain rule through logits / T
            if not write_in_place:
                grad[start:end, :n_valid].copy_(x)
        return (grad, *no_input_grads)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_tokens: int = 4096,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``labels`` under ``softmax(logits / temperature)`` over the full vocabulary.

    Args:
        logits: ``[..., V_local]`` this rank's vocabulary shard (the whole vocabulary without TP).
        labels: ``[...]`` global token ids (int64), same leading shape as ``logits``.
        tp_group: tensor-parallel group the vocabulary is split over; ``None`` means no TP.
        vocab_start: global id of this shard's first column; default ``tp_rank * V_local``.
        chunk_tokens: tokens processed per chunk (bounds the ``[chunk, V_local]`` fp32 temporaries).
        temperature: divide the logits by it first (SGLang returns ``log_softmax(logits / T)``).
        compute_entropy: also return the entropy of ``softmax(logits / T)`` per token (differentiable).
        vocab_size: true global vocabulary size when the logits carry padding columns (Megatron pads
            the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``); columns at global
            ids ``>= vocab_size`` are left out of the softmax and get zero gradient.

    Returns:
        ``(logp, entropy)``: fp32 tensors of shape ``labels.shape``; ``entropy`` is ``None`` unless
        ``compute_entropy``. Differentiable w.r.t. ``logits``; with TP, every rank gets the same values
        and the gradient of its own shard. Every TP rank must call this with the same labels.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits shape without its vocabulary "
                         f"dimension; logits shape is {tuple(logits.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    vocab_local = logits.shape[-1]
    if tp_group is None:
        tp_rank, tp_world = 0, 1
    else:
        tp_rank, tp_world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        if tp_world == 1:
            tp_group = None  # nothing to reduce
    if vocab_start is None:
        vocab_start = vocab_range(tp_rank, tp_world, vocab_local)[0]
    if vocab_size is None:
        n_valid = vocab_local
    else:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        n_valid = max(0, min(vocab_local, vocab_size - vocab_start))

    flat_logits = logits.reshape(-1, vocab_local)
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() == 0:
        empty = flat_logits.new_zeros(labels.shape, dtype=torch.float32) + flat_logits.sum() * 0
        return empty, (empty.clone() if compute_entropy else None)

    logp, entropy = _ChunkedVocabParallelLogProbs.apply(
        flat_logits, flat_labels, vocab_start, n_valid, tp_group, chunk_tokens, float(temperature),
        compute_entropy)
    logp = logp.reshape(labels.shape)
    return logp, (entropy.reshape(labels.shape) if compute_entropy else None)
