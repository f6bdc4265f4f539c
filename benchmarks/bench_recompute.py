"""Peak activation memory and step time with activation recomputation vs none, on one long sequence.

Each setting runs in a fresh process (so that one setting's allocations cannot hide another's peak):
the project builds the policy from a RunConfig with ``train.recompute`` set, runs one forward and
backward of a single packed sequence and reports the growth of the process's peak RSS over its RSS
just before the forward (glibc returns large frees to the system: ``MALLOC_MMAP_THRESHOLD_`` is set
so that every activation is its own mapping). Printed side by side with the ratio to no recompute.

    python benchmarks/bench_recompute.py [--tokens 2048] [--layers 4] [--hidden 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "none": {},
    "selective core_attn": {"granularity": "selective", "modules": ["core_attn"]},
    "selective moe": {"granularity": "selective", "modules": ["moe"]},
    "full block 2": {"granularity": "full", "method": "block", "num_layers": 2},
    "full uniform 1": {"granularity": "full", "method": "uniform", "num_layers": 1},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="length of the one packed sequence")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--setting", help=argparse.SUPPRESS)  # JSON recompute settings: run one measurement
    return p.parse_args()


def measure(args: argparse.Namespace, recompute: dict) -> dict:
    import dataclasses
    import resource
    import time

    import torch

    from megatron_vespo.config import load_model_config
    from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RecomputeConfig, RunConfig, TrainConfig
    from megatron_vespo.distributed import init_distributed
    from megatron_vespo.models.provider import build_gpt_model

    model = dataclasses.replace(
        load_model_config(ROOT / "configs/models/tiny_moe.yaml"), hidden_size=args.hidden,
        num_hidden_layers=args.layers, intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden,
        head_dim=args.hidden // 4, max_position_embeddings=max(args.tokens, 2048), vocab_size=1024)
    cfg = RunConfig(model=model, parallel=ParallelConfig(), precision=PrecisionConfig(params_dtype="fp32"),
                    train=TrainConfig(recompute=RecomputeConfig(**recompute)))
    cfg.validate("")
    init_distributed(cfg.parallel, seed=1)
    torch.manual_seed(0)
    net = build_gpt_model(cfg)
    tokens = torch.randint(0, model.vocab_size, (1, args.tokens))
    positions = torch.arange(args.tokens)[None]
    times = []
    for _ in range(2):  # the first pass warms the allocator and the kernels; the second is measured
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        t0 = time.perf_counter()
        logits = net(tokens, positions, None)
        logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t0)
        del logits
        net.zero_grad(set_to_none=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss never falls: the peak of either pass (they are the same work) over the RSS between them.
    return {"growth_mib": (peak - rss) / 1024, "step_s": times[-1]}


def main() -> None:
    args = parse_args()
    if args.setting is not None:
        print(json.dumps(measure(args, json.loads(args.setting))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = {}
    for name, setting in SETTINGS.items():
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--setting", json.dumps(setting)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"{name}: failed\n{out.stderr[-3000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name}: {rows[name]}", file=sys.stderr)
    base = rows["none"]
    print(f"\none sequence of {args.tokens} tokens, MoE with {args.layers} layers, hidden {args.hidden}, fp32, one "
          "process; peak RSS growth during the second forward + backward")
    print(f"{'recompute':<22}{'peak MiB':>10}{'/ none':>8}{'step s':>9}{'/ none':>8}")
    for name, r in rows.items():
        print(f"{name:<22}{r['growth_mib']:>10.0f}{r['growth_mib'] / base['growth_mib']:>8.2f}"
              f"{r['step_s']:>9.2f}{r['step_s'] / base['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
