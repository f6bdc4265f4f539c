"""torchrun worker: vocab-parallel log-probs over 2 gloo ranks equal the single-process reference.

Every rank builds the same full logits from a fixed seed, keeps its vocabulary shard, and checks its
log-probs, entropies and shard of the gradient against ``torch.log_softmax`` on the full logits.
Run by tests/multiproc/test_logprobs_tp.py; exits non-zero on the first mismatch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_vespo.train.logprobs import vocab_parallel_logprobs, vocab_range

TOL = dict(rtol=1e-6, atol=1e-6)


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, labels[:, None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def check_case(name: str, *, n_tokens: int, vocab_local: int, vocab_size: int, chunk: int, temperature: float,
               dtype: torch.dtype, seed: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    full = (3.0 * torch.randn(n_tokens, vocab_local * world, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab_size, (n_tokens,), generator=gen)
    w_logp, w_ent = torch.randn(n_tokens, generator=gen), torch.randn(n_tokens, generator=gen)
    labels[0], labels[1] = 0, vocab_size - 1  # both ends of the vocabulary, owned by different ranks

    start, end = vocab_range(rank, world, vocab_local)
    shard = full[:, start:end].clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(shard, labels, tp_group=dist.group.WORLD, chunk_tokens=chunk,
                                        temperature=temperature, compute_entropy=True, vocab_size=vocab_size)
    (logp * w_logp + ent * w_ent).sum().backward()

    real = full[:, :vocab_size].float().requires_grad_()
    ref_logp, ref_ent = reference(real, labels, temperature)
    (ref_logp * w_logp + ref_ent * w_ent).sum().backward()
    ref_grad = torch.zeros(n_tokens, vocab_local * world)
    ref_grad[:, :vocab_size] = real.grad

    try:
        torch.testing.assert_close(logp, ref_logp.detach(), **TOL)
        torch.testing.assert_close(ent, ref_ent.detach(), **TOL)
        grad_tol = TOL if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(shard.grad.float(), ref_grad[:, start:end], **grad_tol)
    except AssertionError as err:
        raise AssertionError(f"case {name!r}, rank {rank}: {err}") from None
    print(f"rank {rank}: case {name} OK", flush=True)


def check_bad_label_fails_on_every_rank() -> None:
    logits = torch.randn(5, 8)
    labels = torch.tensor([0, 3, 16, 9, 15])  # 2 ranks x 8 columns: id 16 is outside the vocabulary
    try:
        vocab_parallel_logprobs(logits, labels, tp_group=dist.group.WORLD)
    except ValueError as err:
        assert "labels[2] = 16" in str(err), err
        print(f"rank {dist.get_rank()}: case bad-label OK", flush=True)
        return
    raise AssertionError("an out-of-vocabulary label was accepted")


def main() -> None:
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "run with --nproc_per_node=2"
    torch.manual_seed(0)
    check_case("even-shards", n_tokens=29, vocab_local=50, vocab_size=100, chunk=7, temperature=1.0,
               dtype=torch.float32, seed=1)
    check_case("temperature-one-chunk", n_tokens=29, vocab_local=50, vocab_size=100, chunk=4096,
               temperature=0.7, dtype=torch.float32, seed=2)
    check_case("padded-vocab", n_tokens=17, vocab_local=52, vocab_size=100, chunk=5, temperature=1.0,
               dtype=torch.float32, seed=3)
    # rank 1 holds only padding columns: its shard contributes nothing but must still take part
    check_case("rank-without-vocab", n_tokens=17, vocab_local=52, vocab_size=50, chunk=4, temperature=1.0,
               dtype=torch.float32, seed=4)
    check_case("bf16", n_tokens=23, vocab_local=40, vocab_size=80, chunk=6, temperature=1.0,
               dtype=torch.bfloat16, seed=5)
    check_bad_label_fails_on_every_rank()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
