"""Peak memory of token log-probs + a policy-gradient-style loss, forward and backward.

Compares the chunked kernel (megatron_vespo.train.logprobs.vocab_parallel_logprobs) with the naive
``torch.log_softmax(logits.float(), -1).gather(...)`` at Qwen3's vocabulary (151936) and prints the
peaks side by side with their ratio.

Each variant runs in a fresh subprocess. On CPU the peak is the process's peak resident set size
(``getrusage``; PyTorch's CPU allocator returns large blocks to the OS at once, so it tracks tensor
memory), on CUDA it is ``torch.cuda.max_memory_allocated``. Two numbers per variant:
  * total:   peak minus the process before the logits exist (logits + everything the op needs),
  * working: peak minus the process holding the logits (what the log-prob op itself costs).

    python benchmarks/bench_logprobs_memory.py [--tokens 2048] [--vocab 151936] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, dtype_name: str, chunk: int, n_tokens: int, vocab: int, device: str) -> dict:
    """Runs in the child process: one forward + backward, returns memory and a checksum."""
    import torch

    from megatron_vespo.train.logprobs import vocab_parallel_logprobs

    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"

    def logprobs(logits, labels):
        if variant == "naive":
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
        return vocab_parallel_logprobs(logits, labels, chunk_tokens=chunk)[0]

    def step(logits, labels, advantages):
        loss = -(logprobs(logits, labels) * advantages).sum() / labels.numel()
        loss.backward()
        return loss.detach()

    # warm-up at a small size (kernels, thread pools) so the baseline already includes them
    small = torch.randn(8, 64, device=device, dtype=dtype, requires_grad=True)
    step(small, torch.randint(0, 64, (8,), device=device), torch.randn(8, device=device))
    del small

    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    advantages = torch.randn(n_tokens, device=device, generator=gen)
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_peak()
    logits = torch.empty(n_tokens, vocab, device=device, dtype=dtype).normal_(generator=gen).mul_(2.0)
    logits.requires_grad_()
    if cuda:
        torch.cuda.synchronize()
        holding = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        holding = _rss_now()

    start = time.perf_counter()
    loss = step(logits, labels, advantages)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak()
    return dict(total=peak - before, working=peak - holding, logits_bytes=logits.numel() * logits.element_size(),
                seconds=seconds, loss=float(loss), grad_sum_abs=float(logits.grad.float().abs().sum()))


def spawn(args: argparse.Namespace, variant: str, dtype: str, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, dtype, str(chunk), "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant}/{dtype}/{chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunks", default="4096,256", help="chunk_tokens values to try for the chunked kernel")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "DTYPE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, dtype, chunk = args.child
        print(json.dumps(run_variant(variant, dtype, int(chunk), args.tokens, args.vocab, args.device)))
        return

    print(f"token log-probs + loss, forward+backward: N={args.tokens} tokens, V={args.vocab}, device={args.device}")
    print(f"{'dtype':<9} {'variant':<16} {'logits MiB':>10} {'total MiB':>10} {'x naive':>8} "
          f"{'working MiB':>12} {'x naive':>8} {'seconds':>8}  loss / sum|grad|")
    for dtype in args.dtypes.split(","):
        naive = spawn(args, "naive", dtype, 0)
        rows = [("naive", naive)] + [(f"chunked c={c}", spawn(args, "chunked", dtype, int(c)))
                                     for c in args.chunks.split(",")]
        for name, r in rows:
            print(f"{dtype:<9} {name:<16} {r['logits_bytes'] / MiB:>10.0f} {r['total'] / MiB:>10.0f} "
                  f"{r['total'] / naive['total']:>8.2f} {r['working'] / MiB:>12.0f} "
                  f"{r['working'] / naive['working']:>8.2f} {r['seconds']:>8.2f}  "
                  f"{r['loss']:.6f} / {r['grad_sum_abs']:.4f}")


if __name__ == "__main__":
    main()
