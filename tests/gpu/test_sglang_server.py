"""One real SGLang engine (launched from the fleet config, behind the real sglang-router) on a tiny
random Qwen3-MoE written at test time: generation with log-probs, then every weight transport —
disk, NCCL broadcast and CUDA IPC — each checked by the echoed weight version and by log-probs that
follow the new weights (teacher-forced HF recomputation) rather than the old ones.

The engine runs on the last visible GPU. CUDA IPC shares memory of that same GPU (colocated); the
NCCL transport needs a second GPU for the trainer side, because NCCL refuses two ranks on one device.
Tests run in file order and build on each other's weights, as a training run would.
"""
from __future__ import annotations

import pytest
import torch

from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync, iter_buckets
from rollout_sglang.weight_sync.ipc import IPCWeightSync
from typed_config import build

from .conftest import sglang_python
from .sglang_helpers import (
    BF16_MEAN_LOGPROB_TOL,
    assert_follows_weights,
    engine_gpu,
    hf_state,
    mean_logprob_error,
    perturbed,
    physical_gpu,
    prompts,
    reference_model,
    rollout,
    tiny_engine_server,
    write_tiny_qwen3_moe,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe") / "model")


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    server = tiny_engine_server(model_dir, sglang_python(), env={"CUDA_VISIBLE_DEVICES": physical_gpu(engine_gpu())})
    cfg = build(FleetConfig, {"servers": [server], "health_interval_s": 2.0,
                              "log_dir": str(tmp_path_factory.mktemp("sglang_logs"))})
    with Fleet(cfg) as f:
        yield f


@pytest.fixture(scope="module")
def weights(model_dir):
    """What the engine holds now: {"state": HF tensors, "model": fp32 HF reference with them}."""
    state = hf_state(model_dir)
    return {"state": state, "model": reference_model(model_dir, state)}


def advance(weights, model_dir, seed: int) -> tuple[dict, object]:
    """New weights to push; returns (new state, previous reference model) and makes them current."""
    old_model = weights["model"]
    new_state = perturbed(weights["state"], seed=seed)
    weights.update(state=new_state, model=reference_model(model_dir, new_state))
    return new_state, old_model


def server_version(fleet) -> str:
    (version,) = fleet.weight_versions()  # /model_info, as the publisher reads it
    return version


def test_generate_with_logprobs_through_the_router(fleet, weights):
    info = http_json("GET", fleet.servers[0].url + "/server_info", timeout_s=30)[1]
    assert "CPU rollout server" not in str(info.get("engine", ""))  # a real SGLang engine
    batch = prompts(8, seed=1)
    groups = rollout(fleet.router_url, batch, n=2, max_new_tokens=6, temperature=0.8)
    assert len(groups) == len(batch)
    for prompt, group in zip(batch, groups):
        assert len(group) == 2
        for s in group:
            assert s.prompt_ids == prompt and len(s.output_ids) == 6 and s.finish_reason.type == "length"
            assert len(s.output_logprobs) == 6 and s.weight_version == "default"
    assert mean_logprob_error(weights["model"], groups, temperature=0.8) < BF16_MEAN_LOGPROB_TOL


def test_disk_weight_sync(fleet, weights, model_dir, tmp_path):
    new_state, old_model = advance(weights, model_dir, seed=11)
    sync = DiskWeightSync(fleet, build(WeightSyncConfig, {"transport": "disk", "disk_dir": str(tmp_path)}),
                          config_dir=str(model_dir))
    sync.push([list(new_state.items())], version="1")
    assert server_version(fleet) == "1"
    assert_follows_weights(rollout(fleet.router_url, prompts(8, seed=2)), "1", weights["model"], old_model)


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened_bucket", "per_tensor"])
def test_cuda_ipc_weight_sync(fleet, weights, model_dir, flattened):
    version = "2f" if flattened else "2t"
    new_state, old_model = advance(weights, model_dir, seed=21 if flattened else 22)
    torch.cuda.set_device(engine_gpu())  # colocated: the trainer's tensors live on the engine's GPU
    cfg = build(WeightSyncConfig, {"transport": "ipc", "ipc_flattened_bucket": flattened,
                                   "bucket_bytes": 256 << 10})  # several buckets for this model
    # CPU tensors, as the trainer's export hands them over: the transport puts them on its GPU.
    shared = IPCWeightSync(fleet, cfg).push(iter_buckets(new_state.items(), cfg.bucket_bytes), version=version)
    assert shared == sum(t.numel() * t.element_size() for t in new_state.values())
    assert server_version(fleet) == version
    assert_follows_weights(rollout(fleet.router_url, prompts(8, seed=3)), version, weights["model"], old_model)


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened_bucket", "per_tensor"])
def test_nccl_weight_sync(fleet, weights, model_dir, flattened):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL weight sync needs 2 GPUs: the trainer rank and the engine cannot share one device")
    version = "3f" if flattened else "3t"
    new_state, old_model = advance(weights, model_dir, seed=31 if flattened else 32)
    torch.cuda.set_device(0)  # the trainer's rank 0; the engine is on the last GPU
    cfg = build(WeightSyncConfig, {"transport": "distributed", "backend": "nccl", "flattened_bucket": flattened,
                                   "bucket_bytes": 256 << 10})
    sync = DistributedWeightSync(fleet, cfg)
    try:  # CPU tensors, as the trainer's export hands them over: NCCL needs them on the GPU (the transport's job)
        sent = sync.push(iter_buckets(new_state.items(), cfg.bucket_bytes), version=version)
    finally:
        sync.close()
    assert sent == sum(t.numel() * t.element_size() for t in new_state.values())
    assert server_version(fleet) == version
    assert_follows_weights(rollout(fleet.router_url, prompts(8, seed=4)), version, weights["model"], old_model)
