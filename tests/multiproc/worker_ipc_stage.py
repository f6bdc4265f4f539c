"""torchrun worker (2 ranks, gloo, CPU): the stage-collective IPC sender's flow without CUDA.

Both ranks form one "stage"; rank 0 is its source. "GPUs" are names (rank r holds "GPU-r"); serialising
a payload is replaced by a string naming the rank that made it and the sum of its buffer, and posting by
a recorder on rank 0. Engines: A (TP 2 on GPU-0, GPU-1), B (TP 1 on GPU-7, which no trainer rank holds),
C (TP 2, both ranks on GPU-1). Two buckets, the first with a bf16 tensor between fp32 ones (three
buffers); then a push whose second post fails.
Rank 0 writes what was posted to ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.distributed as dist

from rollout_sglang.config import WeightSyncConfig
from rollout_sglang.contracts import PushPlan, PushTarget
from rollout_sglang.weight_sync.ipc import IPCSender, StageComm

TARGETS = (PushTarget(0, "http://a", tp=2, gpus=("GPU-0", "GPU-1")), PushTarget(1, "http://b", tp=1, gpus=("GPU-7",)),
           PushTarget(2, "http://c", tp=2, gpus=("GPU-1", "GPU-1")))


def buckets(rank: int) -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    full = [[("a", torch.randn(4, 3, generator=g)), ("b", torch.randn(5, generator=g).to(torch.bfloat16)),
             ("c", torch.randn(2, 2, generator=g))],
            [("d", torch.randn(6, generator=g))]]
    return full if rank == 0 else [[] for _ in full]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1], backend="gloo")
    posted: list = []
    fail_on = {"call": None}

    def post(target, route, body, timeout_s):
        posted.append({"target": target.index, "entries": body["serialized_named_tensors"],
                       "version": body.get("weight_version"), "path": route.path})
        if fail_on["call"] is not None and len(posted) == fail_on["call"]:
            return 400, {"success": False, "message": "refused"}
        return 200, {"success": True}

    def serialize(payload) -> str:
        flat = payload["flattened_tensor"]
        return f"{rank}:{float(flat.double().sum()):.6f}:{','.join(m.name for m in payload['metadata'])}"

    sender = IPCSender(WeightSyncConfig(transport="ipc", bucket_bytes=1 << 20),
                       StageComm(tensors=group, objects=group, leader=0, rank=rank),
                       device=torch.device("cpu"), gpu=f"GPU-{rank}", serialize=serialize, post_fn=post)
    results = {}
    for name, fail in (("ok", None), ("failing", 2)):
        posted.clear()
        fail_on["call"] = fail
        sender.begin(PushPlan(version=f"v-{name}", targets=TARGETS), stage=0)
        errors = []
        bs = buckets(rank)
        for k, bucket in enumerate(bs):
            try:
                sender.send(bucket, last=k == len(bs) - 1)
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc))
        results[name] = {"posted": list(posted), "errors": errors, "receipt": sender.end()}
    if rank == 0:
        sums = []  # one buffer per run of one dtype (a flattened bucket holds one dtype)
        for bucket in buckets(0):
            for _, run in itertools.groupby(bucket, key=lambda item: item[1].dtype):
                sums.append(f"{float(torch.cat([t.reshape(-1) for _, t in run]).double().sum()):.6f}")
        results["expected_sums"] = sums
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
