"""torchrun worker (2 processes): a checkpoint write that fails on one rank fails on every rank.

Rank 1 writes its RNG file into a directory that does not exist (as with a full or missing disk on
one node); both ranks must raise the same CheckpointError naming rank 1, and then still meet at a
barrier (nobody is left waiting). Writes ``<out>/rank_<r>.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.training import capture_rng_state, on_every_rank
from megatron_vespo.checkpoint.hf_io import CheckpointError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out)
    report: dict = {"ok_result": on_every_rank(lambda: rank * 10, "a write that works")}
    target = out / ("missing" if rank == 1 else "") / f"rank_{rank:05d}.pt"
    try:
        on_every_rank(lambda: torch.save(capture_rng_state(), target), f"writing the RNG states to {out}")
        report["error"] = None
    except CheckpointError as exc:
        report["error"] = str(exc)
    dist.barrier()
    report["after_barrier"] = True
    (out / f"rank_{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
