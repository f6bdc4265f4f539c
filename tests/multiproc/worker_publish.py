"""torchrun worker: the streaming weight publisher in several layouts, against real CPU rollout servers.

Rank 0 starts a fleet of ``--servers`` CPU rollout servers (behind sglang-router) that boot from an HF
model with *other* random weights. Then, for each layout of ``--layouts`` in turn (Megatron's parallel
state re-initialised in the same processes, the servers kept), every rank builds the tiny MoE policy
from the same canonical full weights, scaled per push so no push can pass on a previous one's
weights, and :class:`WeightPublisher` pushes them

- through the broadcast transport (one group per pipeline stage, each stage's source rank sending), and
- through the disk transport (each stage writing its own shards, one index, a rename),

and rank 0 reads every HF tensor back from every server (``/get_weights_by_name``, float32 values) and
compares it bitwise with the HF export of the same full weights. With ``--kill-layout`` (EP=2 in the
test), rank 0 then SIGKILLs a server: the fleet restarts it and it waits for weights (no copy of them
exists); ``WeightPublisher.catch_up`` re-publishes the live model to it alone, bitwise again.

With ``--vocab-size`` (e.g. 97) the policy and the servers have that vocabulary: Megatron pads it
(256 rows at TP=2), and the servers must receive the unpadded HF shapes (they reject any other).

Rank 0 writes ``{layout: {"broadcast": [mismatches], "disk": [...], ...}}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping, detect_stacked_layers
from megatron_vespo.config import load_model_config
from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RunConfig
from megatron_vespo.distributed import destroy_distributed, init_distributed
from megatron_vespo.driver.publisher import WeightPublisher
from megatron_vespo.models.full_state import load_full_state_dict
from megatron_vespo.models.trainable import build_model_chunks
from rollout_sglang import engine_api as api
from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync
from tests.model_state import gather_full_state_dict
from typed_config import build

REPO_ROOT = Path(__file__).resolve().parents[2]

LAYOUTS = {
    "tp2_sp": dict(tensor=2, expert_tensor=2, sequence_parallel=True),
    "pp2": dict(pipeline=2),
    "ep2": dict(expert=2),
    "tp2_ep2": dict(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--bucket-bytes", type=int, default=48 << 10, help="several buckets per stage")
    p.add_argument("--kill-layout", default="")
    p.add_argument("--vocab-size", type=int, default=None, help="another vocabulary than tiny_moe.yaml's")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    return p.parse_args()


def expected_hf(full: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """The HF export of the full weights, as one process would make it: unit by unit through the mapping."""
    mapping = Qwen3Mapping(model_cfg, stacked_layers=detect_stacked_layers(full))
    out = {}
    for unit in mapping.units:
        key = next(k for k in (unit.key, *unit.aliases) if k in full)
        tensor = full[key][unit.prefix] if unit.prefix else full[key]
        out.update(mapping.megatron_to_hf(unit, tensor))
    return out


def server_mismatches(fleet: Fleet, expected: dict[str, torch.Tensor], version: str) -> list[str]:
    """Every server's every tensor against ``expected``, bitwise; and its reported version."""
    bad = []
    for server in fleet.servers:
        status, info = http_json("GET", server.url + api.MODEL_INFO.path)
        if status != 200 or info.get("weight_version") != version:
            bad.append(f"server {server.index}: version {info.get('weight_version') if status == 200 else status}")
        for name, want in expected.items():
            status, values = http_json(api.GET_WEIGHTS_BY_NAME.method, server.url + api.GET_WEIGHTS_BY_NAME.path,
                                       api.get_weights_body(name, truncate_size=1 << 30), timeout_s=60)
            got = torch.tensor(values, dtype=torch.float32) if status == 200 else None
            if got is None or got.shape != want.shape or not torch.equal(got, want.float()):
                bad.append(f"server {server.index}: {name}")
    return bad


def start_fleet(workdir: Path, servers: int, vocab_size: int) -> Fleet:
    from tests.rollout.helpers import save_tiny_moe

    model_dir = save_tiny_moe(workdir / "server_model", seed=5, vocab_size=vocab_size)  # not the trainer's weights
    server = {"kind": "cpu", "model_path": str(model_dir), "startup_timeout_s": 180}
    cfg = build(FleetConfig, {"servers": [server] * servers, "health_interval_s": 0.3, "health_failures_to_restart": 2,
                              "log_dir": str(workdir / "fleet_logs")})
    return Fleet(cfg).start()


def run_layout(name: str, args, model_cfg, full, fleet, syncs, results: dict) -> None:
    from megatron.core import parallel_state

    rank = dist.get_rank()
    parallel = ParallelConfig(**LAYOUTS[name])
    cfg = RunConfig(model=model_cfg, parallel=parallel, precision=PrecisionConfig(params_dtype="fp32"))
    init_distributed(parallel, seed=7, model=model_cfg, precision=cfg.precision)
    try:
        chunks = build_model_chunks(cfg)
        exporter = HFWeightExporter(chunks, model_cfg, bucket_bytes=args.bucket_bytes)
        out: dict = {"stages": exporter.num_stages,
                     "padded_vocab": model_cfg.padded_vocab_size(parallel.tensor)}
        for transport, scale in (("distributed", 1.25), ("disk", 0.75)):
            ws_cfg = syncs[transport].cfg if rank == 0 else WeightSyncConfig(transport=transport,
                                                                               bucket_bytes=args.bucket_bytes)
            publisher = WeightPublisher(exporter, ws_cfg)
            if rank == 0:
                publisher.connect(fleet, syncs[transport])
            pushed = {k: v * scale for k, v in full.items()}
            load_full_state_dict(chunks, pushed)
            version = f"{name}-{transport}"
            stats = publisher.publish(version)
            if rank == 0:
                out[transport] = server_mismatches(fleet, expected_hf(pushed, model_cfg), version)
                out[f"{transport}_bytes"] = stats.bytes
            if name == args.kill_layout and transport == "distributed":
                out["kill"] = kill_and_catch_up(publisher, fleet, expected_hf(pushed, model_cfg) if rank == 0 else None,
                                                version)
            publisher.close()
        results[name] = out
    finally:
        parallel_state.destroy_model_parallel()


def kill_and_catch_up(publisher: WeightPublisher, fleet, expected, version: str) -> dict:
    """Rank 0 kills a server; once it is back (waiting for weights), every rank re-publishes to it."""
    report = {}
    if dist.get_rank() == 0:
        victim = fleet.servers[-1]
        restarts = victim.restarts
        os.kill(victim.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (victim.restarts > restarts and victim.state == "awaiting_weights"):
            time.sleep(0.2)
        report["waited"] = victim.state == "awaiting_weights"
        report["in_router_while_waiting"] = any(w["url"].rstrip("/") == victim.url for w in fleet.router.workers())
    dist.barrier()
    stats = publisher.catch_up()
    if dist.get_rank() == 0:
        victim = fleet.servers[-1]
        report["restored_servers"] = stats.servers if stats else 0
        report["state"] = victim.state
        report["in_router"] = any(w["url"].rstrip("/") == victim.url for w in fleet.router.workers())
        report["mismatches"] = server_mismatches(fleet, expected, version)
    return report


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    model_cfg = load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml")
    if args.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=args.vocab_size)
    layouts = args.layouts.split(",")
    # The canonical full weights every layout starts from (built once, in the first layout; fp32).
    first = ParallelConfig(**LAYOUTS[layouts[0]])
    init_distributed(first, seed=7, model=model_cfg, precision=PrecisionConfig(params_dtype="fp32"))
    from megatron.core import parallel_state

    full = gather_full_state_dict(build_model_chunks(RunConfig(model=model_cfg, parallel=first,
                                                               precision=PrecisionConfig(params_dtype="fp32"))), dst=None)
    parallel_state.destroy_model_parallel()

    fleet, syncs = None, {}
    if dist.get_rank() == 0:
        fleet = start_fleet(workdir, args.servers, model_cfg.vocab_size)
        syncs = {"distributed": DistributedWeightSync(fleet, WeightSyncConfig(transport="distributed",
                                                                              bucket_bytes=args.bucket_bytes)),
                 "disk": DiskWeightSync(fleet, WeightSyncConfig(transport="disk", disk_dir=str(workdir / "weights"),
                                                                bucket_bytes=args.bucket_bytes))}
    results: dict = {}
    try:
        for name in layouts:
            t0 = time.monotonic()
            run_layout(name, args, model_cfg, full, fleet, syncs, results)
            results[name]["seconds"] = time.monotonic() - t0
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        if fleet is not None:
            for sync in syncs.values():
                sync.close()
            fleet.stop()
        destroy_distributed()


if __name__ == "__main__":
    main()
