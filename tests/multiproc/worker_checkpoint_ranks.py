"""torchrun worker (2 processes): what every rank of a checkpoint save or load must agree on.

1. A write failing on one rank fails on every rank: rank 1 writes its RNG file into a directory that
   does not exist (as with a full or missing disk on one node); both ranks must raise the same
   CheckpointError naming rank 1, and then still meet at a barrier (nobody is left waiting).
2. The SHA-256 of a checkpoint's files, computed and checked by all ranks: rank 0 writes five files
   into ``--out/ckpt``; every rank hashes its share (file i on rank i % 2) and gets every entry; then
   a byte of a file that rank 1 checks is flipped and both ranks check again: both must raise the
   same CheckpointCorruptError naming that file (the verdict is agreed on, so no rank resumes while
   another falls back).

Writes ``<out>/rank_<r>.json`` with both parts' results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.hf_io import CheckpointError
from megatron_vespo.checkpoint.training import (
    CheckpointCorruptError, TrainingCheckpointer, capture_rng_state, file_entry, on_every_rank,
)
from megatron_vespo.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def failing_write(out: Path, rank: int) -> dict:
    report: dict = {"ok_result": on_every_rank(lambda: rank * 10, "a write that works")}
    target = out / ("missing" if rank == 1 else "") / f"rank_{rank:05d}.pt"
    try:
        on_every_rank(lambda: torch.save(capture_rng_state(), target), f"writing the RNG states to {out}")
        report["error"] = None
    except CheckpointError as exc:
        report["error"] = str(exc)
    dist.barrier()
    report["after_barrier"] = True
    return report


def spread_hashes(out: Path, rank: int) -> dict:
    ckpt = out / "ckpt"
    names = [f"dist/__{i}_0.distcp" for i in range(4)] + ["state.json"]
    if rank == 0:
        for i, name in enumerate(names):
            (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
            (ckpt / name).write_bytes(bytes([i]) * (1000 + i))
    dist.barrier()
    checkpointer = TrainingCheckpointer(load_run_config(REPO / "configs/quickstart.yaml", []), [], optimizer=None,
                                        scheduler=None)
    files = checkpointer._hash_files(ckpt, sorted(names))
    report: dict = {"files_match": files == {n: file_entry(ckpt / n) for n in names}}
    checkpointer._check_hashes(ckpt, files)  # intact: passes on every rank
    dist.barrier()
    bad = sorted(names)[1]  # hashed and checked by rank 1
    if rank == 0:
        data = bytearray((ckpt / bad).read_bytes())
        data[500] ^= 0xFF
        (ckpt / bad).write_bytes(bytes(data))
    dist.barrier()
    try:
        checkpointer._check_hashes(ckpt, files)
        report["error"] = None
    except CheckpointCorruptError as exc:
        report["error"] = str(exc)
    report["bad"] = str(ckpt / bad)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out)
    report = {"failing_write": failing_write(out, rank), "hashes": spread_hashes(out, rank)}
    (out / f"rank_{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
