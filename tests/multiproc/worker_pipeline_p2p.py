"""torchrun worker (2 ranks): Megatron's two-way pipeline exchange between two stages delivers the
activation to the activation buffer and the gradient to the gradient buffer, with their shapes.

With two pipeline ranks the previous and next stage are the same peer. Each rank sends an
activation (to "next") and a gradient (to "prev") of different lengths at once, the call the
interleaved schedule makes in its steady state, and reports what arrives (the peer's activation
from "prev" and its gradient from "next" is correct): once with Megatron-Core as shipped, then three
times with the project's workaround (:mod:`megatron_vespo.platform.pipeline_p2p`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vespo.platform.cpu import apply_cpu_patches
from megatron_vespo.platform.pipeline_p2p import apply_pipeline_p2p_fix, pipeline_p2p_fix_applied

HIDDEN = 4


def payload(kind: str, rank: int, step: int) -> torch.Tensor:
    """A tensor that says what it is: activations and gradients of different lengths per rank and step."""
    length = (3 if kind == "act" else 5) + 2 * rank + step
    value = (100 if kind == "act" else 200) + 10 * rank + step
    return torch.full((length, 1, HIDDEN), float(value))


def exchange(comm, rank: int, peer: int, step: int) -> str:
    """One two-way exchange; 'correct', 'swapped' (activation and gradient exchanged) or 'wrong'."""
    activation, grad = comm.send_forward_backward_recv_forward_backward(
        payload("act", rank, step), payload("grad", rank, step), recv_prev=True, recv_next=True,
        tensor_shape=[64, 1, HIDDEN])  # ignored with variable_seq_lengths: shapes are exchanged first
    want_act, want_grad = payload("act", peer, step), payload("grad", peer, step)
    same = lambda a, b: a.shape == b.shape and torch.equal(a, b)  # noqa: E731
    print(f"rank {rank} step {step}: activation {tuple(activation.shape)} {activation.flatten()[0].item():g}, "
          f"gradient {tuple(grad.shape)} {grad.flatten()[0].item():g}", flush=True)
    if same(activation, want_act) and same(grad, want_grad):
        return "correct"
    if same(activation, want_grad) and same(grad, want_act):
        return "swapped"
    return "wrong"


def main() -> None:
    dist.init_process_group("gloo")
    apply_cpu_patches()  # the CPU patches only (platform.apply would also install the fix under test)
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    config = ModelParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                                 variable_seq_lengths=True, pipeline_dtype=torch.float32)
    comm = P2PCommunicator(pp_group=dist.new_group([0, 1]), config=config)
    assert comm.prev_rank == comm.next_rank == peer
    assert not pipeline_p2p_fix_applied()
    # Megatron-Core as shipped (the result is reported, the test decides what it expects).
    print(f"rank {rank} upstream: {exchange(comm, rank, peer, 0)}", flush=True)
    apply_pipeline_p2p_fix()
    assert pipeline_p2p_fix_applied() and not apply_pipeline_p2p_fix()  # idempotent
    for step in range(1, 4):
        print(f"rank {rank} fixed step {step}: {exchange(comm, rank, peer, step)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
