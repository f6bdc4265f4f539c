"""Rollout fleet benchmark, measured side by side in one run (CPU rollout servers, not SGLang).

1. Generation throughput: direct calls to one server vs the same server behind sglang-router vs
   all M servers behind the router (same prompts, same sampling).
2. Distributed weight sync (HTTP + gloo broadcast + load into the model, pause/flush/continue
   included) vs a raw gloo broadcast of the same bytes to the same number of receiver processes.
   Target: sync bandwidth >= 0.8 x raw.

    python benchmarks/bench_router.py [--servers 2] [--prompts 64] [--samples 8] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rollout_sglang.client import SGLangClient  # noqa: E402
from rollout_sglang.config import FleetConfig, WeightSyncConfig  # noqa: E402
from rollout_sglang.fleet import Fleet  # noqa: E402
from rollout_sglang.net import find_free_port  # noqa: E402
from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group  # noqa: E402
from rollout_sglang.weight_sync import DistributedWeightSync, iter_buckets  # noqa: E402
from typed_config import build  # noqa: E402


def make_model(path: Path, hidden: int, layers: int, experts: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden,
                         moe_intermediate_size=hidden, num_experts=experts, num_experts_per_tok=2,
                         norm_topk_prob=True, max_position_embeddings=1024, eos_token_id=None)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(path))
    return load_file(str(path / "model.safetensors"))


async def throughput(url: str, prompts, n: int, max_new_tokens: int) -> float:
    async with SGLangClient(url) as client:
        start = time.perf_counter()
        groups = await client.generate_batch(prompts, {"max_new_tokens": max_new_tokens}, n=n)
        elapsed = time.perf_counter() - start
    return sum(s.completion_tokens for g in groups for s in g) / elapsed


def raw_receiver(args) -> None:
    """Child process: join a group like a server does and receive the same buckets."""
    group = init_custom_process_group(backend="gloo", master_address="127.0.0.1", master_port=args.master_port,
                                      world_size=args.world, rank=args.rank, group_name="raw_bench")
    for _ in range(args.repeats):
        for size in args.sizes:
            torch.distributed.broadcast(torch.empty(size, dtype=torch.uint8), group=group, group_src=0)
    destroy_custom_process_group(group)


def raw_broadcast_seconds(sizes: list[int], receivers: int, repeats: int) -> float:
    port = find_free_port()
    world = receivers + 1
    procs = [subprocess.Popen([sys.executable, __file__, "--raw-receiver", "--master-port", str(port), "--world",
                               str(world), "--rank", str(r + 1), "--repeats", str(repeats),
                               "--sizes", *map(str, sizes)]) for r in range(receivers)]
    group = init_custom_process_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                                      world_size=world, rank=0, group_name="raw_bench")
    buffers = [torch.randint(0, 255, (s,), dtype=torch.uint8) for s in sizes]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for buf in buffers:
            torch.distributed.broadcast(buf, group=group, group_src=0)
        times.append(time.perf_counter() - start)
    for p in procs:
        p.wait(timeout=60)
    destroy_custom_process_group(group)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sync-hidden", type=int, default=512, help="hidden size of the weight-sync model")
    parser.add_argument("--sync-layers", type=int, default=4)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw-receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_receiver:
        raw_receiver(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_router_"))
    state = make_model(workdir / "model", args.sync_hidden, args.sync_layers, experts=8)
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    server = {"kind": "cpu", "model_path": str(workdir / "model"), "startup_timeout_s": 300}
    cfg = build(FleetConfig, {"servers": [server] * args.servers, "supervise": False, "log_dir": str(workdir / "logs")})
    rng = random.Random(0)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(4, 16))] for _ in range(args.prompts)]

    with Fleet(cfg) as fleet:
        s0 = fleet.servers[0]
        asyncio.run(throughput(s0.url, prompts[:4], 1, 4))  # warm-up
        direct = asyncio.run(throughput(s0.url, prompts, args.samples, args.max_new_tokens))
        others = fleet.servers[1:]
        for s in others:
            fleet.router.remove_worker(s.url)
        router_one = asyncio.run(throughput(fleet.router_url, prompts, args.samples, args.max_new_tokens))
        for s in others:
            fleet.router.add_worker(s.url)
        router_all = asyncio.run(throughput(fleet.router_url, prompts, args.samples, args.max_new_tokens))

        sync_s = {}
        for flattened in (True, False):
            sync_cfg = build(WeightSyncConfig, {"transport": "distributed", "bucket_bytes": args.bucket_mb << 20,
                                                "flattened_bucket": flattened})
            sync = DistributedWeightSync(fleet, sync_cfg)
            times = []
            for i in range(args.repeats):
                start = time.perf_counter()
                sync.push(iter_buckets(state.items(), sync_cfg.bucket_bytes), version=f"bench-{flattened}-{i}")
                times.append(time.perf_counter() - start)
            sync.close()
            sync_s[flattened] = min(times)

    shutil.rmtree(workdir, ignore_errors=True)
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_buckets(state.items(), args.bucket_mb << 20)]
    raw_s = raw_broadcast_seconds(sizes, receivers=args.servers, repeats=args.repeats)

    print(f"\nCPU rollout servers (not SGLang), {args.servers} server(s), {os.cpu_count()} CPU cores; "
          f"{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} new tokens")
    print(f"{'path':<40}{'tokens/s':>12}{'vs direct':>12}")
    print(f"{'direct -> server 0':<40}{direct:>12.0f}{1.0:>12.2f}")
    print(f"{'router -> server 0 only':<40}{router_one:>12.0f}{router_one / direct:>12.2f}")
    print(f"{f'router -> {args.servers} servers (round robin)':<40}{router_all:>12.0f}{router_all / direct:>12.2f}")
    mb = total_bytes / 1e6
    print(f"\nweight sync of {mb:.1f} MB in {len(sizes)} bucket(s) to {args.servers} server(s), best of {args.repeats}")
    print(f"{'path':<40}{'seconds':>12}{'MB/s':>12}")
    print(f"{'raw gloo broadcast (same bytes)':<40}{raw_s:>12.3f}{mb / raw_s:>12.1f}")
    for flattened, label in ((True, "push, flattened_bucket"), (False, "push, per tensor (received in place)")):
        t = sync_s[flattened]
        ratio = raw_s / t
        print(f"{label:<40}{t:>12.3f}{mb / t:>12.1f}   x{ratio:.2f} of raw "
              f"(target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})")

if __name__ == "__main__":
    main()
