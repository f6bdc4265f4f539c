"""torchrun worker: peak extra memory of every rank while the weights are published, on a model many
times larger than a bucket.

For each layout of ``--layouts``: build a Qwen3-MoE policy of ``--hidden``/``--layers``/``--experts``
(random weights), then, with the peak resident set size reset just before (Linux: ``clear_refs``
"5" resets ``VmHWM``),

1. ``export_hf_dir``: every stage writes its shards of an HF directory (what CPU servers boot from);
2. ``publish`` over the broadcast transport to one CPU server booted from that directory;

and record ``VmHWM - VmRSS(before)`` on every rank: the memory the push added at its worst moment. A
gather to one process would add the whole model there; the streaming publisher adds about one bucket.

Rank 0 writes ``{layout: {"model_bytes", "bucket_bytes", "export": [growth per rank], "publish": [...],
"seconds": ...}}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.hf_io import CONFIG_FILE, hf_config_from_model
from megatron_vespo.config import load_model_config
from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RunConfig
from megatron_vespo.distributed import destroy_distributed, init_distributed
from megatron_vespo.driver.publisher import WeightPublisher
from megatron_vespo.models.trainable import build_model_chunks
from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync import DistributedWeightSync
from typed_config import build

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {
    "pp2": dict(pipeline=2),
    "tp2_ep2": dict(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True),
    "tp2_sp": dict(tensor=2, expert_tensor=2, sequence_parallel=True),
    "ep2": dict(expert=2),
}


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process, KiB."""
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", status).group(1)), int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def measured(fn) -> tuple[object, int]:
    """``fn()`` and the most memory it added at any moment (bytes), on this rank."""
    gc.collect()
    dist.barrier()
    reset_peak()
    before, _ = rss_kib()
    result = fn()
    _, peak = rss_kib()
    dist.barrier()
    return result, (peak - before) * 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="pp2,tp2_ep2")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--bucket-bytes", type=int, default=4 << 20)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    workdir = Path(args.workdir)
    tiny = load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml")
    model_cfg = dataclasses.replace(tiny, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                    num_experts=args.experts, moe_intermediate_size=args.hidden,
                                    intermediate_size=2 * args.hidden, vocab_size=args.vocab,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4)
    ws_cfg = WeightSyncConfig(transport="distributed", bucket_bytes=args.bucket_bytes)
    results: dict = {}
    fleet = sync = None
    for name in args.layouts.split(","):
        from megatron.core import parallel_state

        parallel = ParallelConfig(**LAYOUTS[name])
        cfg = RunConfig(model=model_cfg, parallel=parallel, precision=PrecisionConfig(params_dtype="fp32"))
        init_distributed(parallel, seed=3, model=model_cfg, precision=cfg.precision)
        t0 = time.monotonic()
        chunks = build_model_chunks(cfg)
        exporter = HFWeightExporter(chunks, model_cfg, bucket_bytes=args.bucket_bytes)
        publisher = WeightPublisher(exporter, ws_cfg)
        model_bytes = exporter.hf_bytes() if exporter.is_leader else 0  # each stage once
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, model_bytes)

        def write_config(directory: Path) -> None:
            hf = hf_config_from_model(model_cfg, exporter.hf_dtype, extra={"eos_token_id": None})
            (directory / CONFIG_FILE).write_text(json.dumps(hf) + "\n")

        directory = workdir / f"hf_{name}"
        _, export_growth = measured(lambda: publisher.export_hf_dir(directory, write_config))
        if dist.get_rank() == 0:
            if fleet is None:  # one server for every layout (same model shapes), booted from the first export
                fleet = Fleet(build(FleetConfig, {"servers": [{"kind": "cpu", "model_path": str(directory),
                                                               "startup_timeout_s": 300}],
                                                  "log_dir": str(workdir / "fleet_logs")})).start()
                sync = DistributedWeightSync(fleet, ws_cfg)
            publisher.connect(fleet, sync)
        dist.barrier()
        stats, publish_growth = measured(lambda: publisher.publish(f"{name}-1"))
        growth = [None] * dist.get_world_size()
        dist.all_gather_object(growth, (export_growth, publish_growth))
        # A tensor larger than bucket_bytes travels alone: the largest bucket any stage moves.
        element = torch.empty((), dtype=exporter.hf_dtype).element_size()
        largest = max(sum(unit.numel for unit, _ in bucket) * element for bucket in exporter.buckets_plan)
        largest_all = [None] * dist.get_world_size()
        dist.all_gather_object(largest_all, largest)
        results[name] = {"model_bytes": sum(sizes), "bucket_bytes": args.bucket_bytes, "pushed_bytes": stats.bytes,
                         "largest_bucket": max(largest_all),
                         "export": [g[0] for g in growth], "publish": [g[1] for g in growth],
                         "publish_s": stats.seconds, "seconds": time.monotonic() - t0}
        publisher.close()
        del chunks, exporter, publisher
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
        sync.close()
        fleet.stop()
    destroy_distributed()


if __name__ == "__main__":
    main()
