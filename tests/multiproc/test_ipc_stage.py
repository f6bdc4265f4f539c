"""The IPC transport per pipeline stage, checked on the CPU: every engine TP rank gets handles of the copy
on its own GPU (from the trainer rank there), the source rank's otherwise; one buffer per dtype; the
version on the last one only; a failed post stops the stage without leaving a rank in a collective.
(CUDA-IPC itself needs GPUs: ``tests/gpu``.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollout_sglang.config import ServerConfig
from rollout_sglang.contracts import PushTarget
from rollout_sglang.weight_sync.ipc import _owners, engine_gpus

from .torchrun import run_torchrun

WORKER = Path(__file__).with_name("worker_ipc_stage.py")


def test_engine_gpus_follow_sglang_placement():
    cfg = ServerConfig(kind="sglang", model_path="m", tp=2, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"},
                       extra_args=["--base-gpu-id", "1"])
    assert engine_gpus(cfg) == ("5", "6")
    inherited = ServerConfig(kind="sglang", model_path="m", tp=2, extra_args=["--gpu-id-step=2"])
    assert engine_gpus(inherited, trainer_visible="0,1,2,3") == ("0", "2")
    assert engine_gpus(ServerConfig(kind="sglang", model_path="m", tp=1)) == ("0",)


def test_owners_prefer_the_rank_on_the_same_gpu_else_the_source():
    targets = (PushTarget(0, "a", tp=2, gpus=("0", "1")), PushTarget(1, "b", tp=1, gpus=("9",)), PushTarget(2, "c", tp=1))
    owners = _owners(targets, {0: "0", 1: "1", 2: "1"}, leader=0)
    assert owners == {(0, 0): 0, (0, 1): 1, (1, 0): 0, (2, 0): 0}
    assert _owners(targets[:1], {3: "1", 1: "1", 0: "0"}, leader=1)[(0, 1)] == 1  # the source rank first


@pytest.mark.multiproc
def test_stage_collective_ipc_flow(tmp_path):
    out = tmp_path / "ipc.json"
    run_torchrun(WORKER, ["--out", out], nproc=2, timeout=120)
    got = json.loads(out.read_text())
    ok = got["ok"]
    assert ok["errors"] == []
    # Bucket 1 is fp32, bf16, fp32 (three buffers), bucket 2 one: 4 buffers x 3 engines.
    assert [p["target"] for p in ok["posted"]] == [0, 1, 2] * 4
    assert [p["version"] for p in ok["posted"]] == [None] * 9 + ["v-ok"] * 3
    owners = {0: ["0", "1"], 1: ["0"], 2: ["1", "1"]}  # the trainer rank whose copy each engine rank maps
    for k, p in enumerate(ok["posted"]):
        ranks = [e.split(":")[0] for e in p["entries"]]
        sums = {e.split(":")[1] for e in p["entries"]}
        assert ranks == owners[p["target"]], p
        assert sums == {got["expected_sums"][k // 3]}, (p, got["expected_sums"])  # each copy is the bucket
    assert ok["receipt"]["bytes"] == (12 + 4 + 6) * 4 + 5 * 2
    failing = got["failing"]
    assert len(failing["errors"]) == 1 and "refused" in failing["errors"][0]
    assert len(failing["posted"]) == 3  # the failed buffer's posts; nothing after it
