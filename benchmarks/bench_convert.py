#!/usr/bin/env python
"""Peak memory and throughput of the HF <-> Megatron checkpoint converters on a ~1 GB model.

    python benchmarks/bench_convert.py [--scale 1.0] [--keep DIR]

Writes a random bf16 Qwen3-MoE checkpoint (wider than tiny_moe: hidden 1024, 8 layers, 32 experts;
``--scale`` multiplies the layer count), then runs in separate processes, side by side:

- ``naive load``: reading the whole HF checkpoint into memory (what any non-streaming converter
  needs at least), as the reference;
- ``hf->mcore``: ``tools/convert_hf_to_mcore.py``;
- ``mcore->hf``: ``tools/convert_mcore_to_hf.py``;
- ``imports only``: the converter's interpreter + torch baseline (``--help``).


For each it prints the peak RSS (VmHWM of that process), peak RSS / model size, the
same after subtracting the import baseline, and MB/s. Target: (peak - baseline) / model <= 0.25.
Finally the round trip is checked bitwise, tensor by tensor.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_vespo.checkpoint.hf_io import SafetensorsReader, SafetensorsWriter, hf_config_from_model  # noqa: E402
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping  # noqa: E402
from megatron_vespo.config.schema import ModelConfig  # noqa: E402


def bench_model(scale: float) -> ModelConfig:
    return ModelConfig(
        architecture="qwen3_moe", vocab_size=32000, hidden_size=1024, num_hidden_layers=max(1, round(8 * scale)),
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=2048,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=True,
    )


def write_random_hf(cfg: ModelConfig, directory: Path) -> int:
    """A random bf16 HF checkpoint of ``cfg``, written tensor by tensor in 256 MiB shards."""
    import json

    shapes = Qwen3Mapping(cfg).hf_tensors()
    writer = SafetensorsWriter(directory, {n: (torch.bfloat16, s) for n, s in shapes.items()},
                               max_shard_bytes=256 * 2**20)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(cfg, torch.bfloat16), indent=2))
    return writer.total_bytes


# The child reports its own peak RSS: VmHWM of /proc/self/status belongs to the process's own
# address space (ru_maxrss would also count this parent's memory: Linux carries it across exec).
MEASURED = """
import atexit, runpy, sys
def report():
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("PEAK_RSS_KIB", hwm, file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

NAIVE_LOAD = """
import sys
from safetensors.torch import load_file
from pathlib import Path
state = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    state.update({name: t.clone() for name, t in load_file(f).items()})  # in memory, not just mapped
"""


def run_measured(args: list[str]) -> tuple[float, int]:
    """Run the Python script ``args``; return (seconds, peak RSS in bytes of that process)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURED, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")][-1]
    return seconds, int(peak.split()[1]) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of layers (1.0: ~1 GB)")
    p.add_argument("--keep", help="work in this directory and keep the checkpoints")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, mcore, back = work / "hf", work / "mcore", work / "hf_back"
    for d in (hf, mcore, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        cfg = bench_model(args.scale)
        t = time.perf_counter()
        size = write_random_hf(cfg, hf)
        print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts, bf16: "
              f"{size / 2**20:.0f} MiB (written in {time.perf_counter() - t:.1f}s)")
        naive = work / "naive_load.py"
        naive.write_text(NAIVE_LOAD)
        runs = {
            "imports only": ["tools/convert_hf_to_mcore.py", "--help"],
            "naive load": [str(naive), str(hf)],
            "hf->mcore": ["tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--out", str(mcore)],
            "mcore->hf": ["tools/convert_mcore_to_hf.py", "--ckpt", str(mcore), "--out", str(back)],
        }
        measured = {name: run_measured(cmd) for name, cmd in runs.items()}
        baseline = measured["imports only"][1]
        startup = measured["imports only"][0]
        print(f"\n{'run':<14}{'seconds':>9}{'MiB/s':>9}{'excl. start-up':>16}{'peak RSS MiB':>14}{'peak/model':>12}"
              f"{'(peak-base)/model':>19}{'vs naive':>10}")
        for name, (seconds, peak) in measured.items():
            if name == "imports only":
                rates = f"{'-':>9}{'-':>16}"
            else:
                rates = f"{size / 2**20 / seconds:9.1f}{size / 2**20 / max(seconds - startup, 1e-3):16.1f}"
            print(f"{name:<14}{seconds:9.2f}{rates}{peak / 2**20:14.0f}{peak / size:12.3f}"
                  f"{(peak - baseline) / size:19.3f}{peak / measured['naive load'][1]:10.2f}")
        worst = max((measured[n][1] - baseline) / size for n in ("hf->mcore", "mcore->hf"))
        print(f"\nstreaming converters: (peak - import baseline) / model size = {worst:.3f} "
              f"(target <= 0.25: {'met' if worst <= 0.25 else 'NOT met'})")

        a, b = SafetensorsReader(hf), SafetensorsReader(back)
        assert set(a.names()) == set(b.names()), "round trip changed the tensor names"
        for name in a.names():
            if not torch.equal(a.read(name), b.read(name)):
                raise SystemExit(f"round trip changed {name}")
        print(f"round trip HF -> Megatron -> HF: {len(a.names())} tensors bitwise identical")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
