"""Megatron-Core workaround: pipeline point-to-point exchanges when the previous and next stage are one peer.

Upstream behaviour (megatron-core 0.16.1 through 0.19.x, unchanged on Megatron-LM's main branch):
``P2PCommunicator`` posts one batch of ``isend``/``irecv`` per exchange, always in the order
``send_prev, recv_prev, send_next, recv_next`` (``_batched_p2p_ops``; the shape exchange of
``variable_seq_lengths``, ``P2PCommunicator._communicate_shapes``, builds its own batch in the same
order). Point-to-point messages between one pair of ranks are matched in the order they were
posted (gloo: same peer and tag, and every Megatron message has tag 0; NCCL: same peer inside a
group call). With two pipeline ranks the previous and the next stage are the same process, so an
exchange that sends both ways (the interleaved schedule's steady state,
``send_forward_backward_recv_forward_backward``) sends the *gradient* first and the *activation*
second, while the peer receives into its activation buffer first and its gradient buffer second:
the two are swapped. With equal shapes this trains silently wrong; with packed micro-batches of
different lengths the swapped shapes crash the next forward. Only the interleaved (virtual
pipeline) schedule posts both directions at once; the plain 1F1B schedule and forward-only passes
never do, which is why PP=2 without virtual stages and forward-only log-probs are exact.

Megatron-LM's own argument parser refuses this case ("pipeline-model-parallel size should be
greater than 2 ... to avoid having multiple p2p sends and recvs between same 2 ranks per
communication batch") unless ``overlap_p2p_comm`` is on; Megatron-Core, the library used here,
checks nothing.

The workaround keeps every message and only fixes the posting order when previous and next rank
coincide: sends go ``next`` then ``prev`` and receives ``prev`` then ``next``. The peer's first send
(its ``next``: an activation) then lands in this rank's first receive (``prev``: the activation
buffer), its second (a gradient) in the gradient buffer -- on both backends, since both match in
posting order. With distinct neighbours (PP > 2) the original functions run unchanged.

:func:`apply_pipeline_p2p_fix` is idempotent and applied on every platform (it is not a CPU
compatibility patch) by :func:`megatron_vespo.platform.apply`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

_MARK = "_megatron_vespo_pp2_fix"


def _ordered_ops(
    send_prev: Optional[torch.Tensor],
    recv_prev: Optional[torch.Tensor],
    send_next: Optional[torch.Tensor],
    recv_next: Optional[torch.Tensor],
    peer: int,
    group: Any,
) -> list[dist.P2POp]:
    """The ops of one exchange with a single peer, in an order both sides pair up correctly:
    the activation (``send_next`` here, ``recv_prev`` there) before the gradient."""
    ops = []
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next, peer, group))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev, peer, group))
    if recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, recv_prev, peer, group))
    if recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, recv_next, peer, group))
    return ops


def _fixed_batched_p2p_ops(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def batched_p2p_ops(*, tensor_send_prev: Optional[torch.Tensor], tensor_recv_prev: Optional[torch.Tensor],
                        tensor_send_next: Optional[torch.Tensor], tensor_recv_next: Optional[torch.Tensor],
                        group: Any, prev_pipeline_rank: int, next_pipeline_rank: int) -> list:
        if prev_pipeline_rank != next_pipeline_rank:
            return original(tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                            tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
                            group=group, prev_pipeline_rank=prev_pipeline_rank,
                            next_pipeline_rank=next_pipeline_rank)
        ops = _ordered_ops(tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                           next_pipeline_rank, group)
        return dist.batch_isend_irecv(ops) if ops else []

    setattr(batched_p2p_ops, _MARK, True)
    return batched_p2p_ops


def _fixed_communicate_shapes(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def communicate_shapes(self: Any, tensor_send_next: Optional[torch.Tensor],
                           tensor_send_prev: Optional[torch.Tensor], recv_prev: bool,
                           recv_next: bool) -> tuple[list[int], list[int]]:
        if self.prev_rank != self.next_rank or self.config.use_ring_exchange_p2p:
            return original(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
        # Same tensors as upstream (int64 [3] shapes on the current device), ordered for one peer.
        device = torch.cuda.current_device()

        def shape_of(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else torch.tensor(tensor.size(), device=device, dtype=torch.int64)

        recv_prev_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_prev else None
        recv_next_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_next else None
        ops = _ordered_ops(shape_of(tensor_send_prev), recv_prev_shape, shape_of(tensor_send_next),
                           recv_next_shape, self.next_rank, self.pp_group)
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        torch.cuda.synchronize()  # as upstream: guards batch_isend_irecv's stream use on the GPU
        return (recv_prev_shape.tolist() if recv_prev_shape is not None else [0, 0, 0],
                recv_next_shape.tolist() if recv_next_shape is not None else [0, 0, 0])

    setattr(communicate_shapes, _MARK, True)
    return communicate_shapes


def apply_pipeline_p2p_fix() -> bool:
    """Install the single-peer ordering into Megatron-Core's p2p module (idempotent).

    Returns True when it was installed by this call, False when it already was.
    """
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    if getattr(p2p._batched_p2p_ops, _MARK, False):
        return False
    p2p._batched_p2p_ops = _fixed_batched_p2p_ops(p2p._batched_p2p_ops)
    cls = p2p.P2PCommunicator
    cls._communicate_shapes = _fixed_communicate_shapes(cls._communicate_shapes)
    return True


def pipeline_p2p_fix_applied() -> bool:
    """Whether :func:`apply_pipeline_p2p_fix` is in effect in this process."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    return bool(getattr(p2p._batched_p2p_ops, _MARK, False)
                and getattr(p2p.P2PCommunicator._communicate_shapes, _MARK, False))
