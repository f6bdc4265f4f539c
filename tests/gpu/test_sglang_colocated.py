"""The colocated cycle on one GPU: a trainer process (this one) and one real SGLang engine launched with
``--enable-memory-saver`` time-share the device, in the order of rollout.fleet.placement.colocate:

generate -> /release_memory_occupation (weights, KV cache, CUDA graphs) -> the trainer phase takes the
freed memory -> the trainer offloads (its new weights to host memory, the GPU emptied) ->
/resume_memory_occupation of the weights -> CUDA-IPC weight update -> resume of the KV cache and CUDA
graphs -> generate.

Checked: the device's free memory (torch.cuda.mem_get_info, every process's allocations) rises on
release by most of the engine's static memory and falls again on resume; the trainer phase holds a
block larger than what was free before the release (it fits only because the engine let go); after
the resume and update the engine serves the new weights (echoed version, log-probs that follow the new
weights, not the old). The trainer's state is a block of that size here; its real offload is the
runtime's (issue 17), tested on CPU. Skips, with the reason, without CUDA, SGLang or torch_memory_saver.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import iter_buckets
from rollout_sglang.weight_sync.ipc import IPCWeightSync
from typed_config import build

from .conftest import sglang_python
from .sglang_helpers import (
    SGLANG_TEST_ARGS,
    assert_follows_weights,
    engine_gpu,
    hf_state,
    perturbed,
    physical_gpu,
    prompts,
    reference_model,
    rollout,
    tiny_engine_server,
    write_tiny_qwen3_moe,
)

pytestmark = pytest.mark.gpu

# SGLang 0.5.23's memory tags (sglang/srt/constants.py GPU_MEMORY_TYPE_*), the ``tags`` field of its
# ReleaseMemoryOccupationReqInput / ResumeMemoryOccupationReqInput.
WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
# Large enough that the engine's static memory dominates the device, so the trainer block below cannot
# fit unless the engine has released it.
MEM_FRACTION_STATIC = 0.6


def _memory_saver_skip_reason() -> str:
    probe = subprocess.run([sglang_python(), "-c", "import torch_memory_saver"], capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"torch_memory_saver is not importable by {sglang_python()} (SGLang's --enable-memory-saver needs "
                f"it): {probe.stderr.strip()[-200:]}")
    return ""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe") / "model")


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    reason = _memory_saver_skip_reason()
    if reason:
        pytest.skip(reason)
    server = tiny_engine_server(model_dir, sglang_python(), mem_fraction_static=MEM_FRACTION_STATIC,
                                extra_args=[*SGLANG_TEST_ARGS, "--enable-memory-saver"],
                                env={"CUDA_VISIBLE_DEVICES": physical_gpu(engine_gpu())})
    # SGLang's /health generates a token, which a released engine must not run: neither the supervisor nor
    # the router probes it during the test (the release/resume calls are made by hand here).
    cfg = build(FleetConfig, {"servers": [server], "supervise": False, "router": {"health_check_interval_s": 3600},
                              "log_dir": str(tmp_path_factory.mktemp("sglang_logs"))})
    with Fleet(cfg) as f:
        yield f


def free_bytes() -> int:
    """Free memory of the engine's device, as the driver counts it (every process's allocations)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # this process's cached blocks would otherwise look used
    return torch.cuda.mem_get_info(engine_gpu())[0]


def occupation(fleet, action: str, tags: list[str]) -> None:
    status, body = http_json("POST", f"{fleet.servers[0].url}/{action}_memory_occupation", {"tags": tags},
                             timeout_s=300)
    assert status == 200, (action, tags, status, body)


def test_colocated_cycle_releases_memory_and_serves_new_weights_after_resume(fleet, model_dir):
    torch.cuda.set_device(engine_gpu())  # the trainer shares the engine's GPU
    state = hf_state(model_dir)
    old_model = reference_model(model_dir, state)
    groups = rollout(fleet.router_url, prompts(8, seed=1))
    assert all(s.weight_version == "default" for g in groups for s in g)
    total = torch.cuda.mem_get_info(engine_gpu())[1]
    expected = 0.5 * MEM_FRACTION_STATIC * total  # most of weights + KV (mem_fraction_static x free at start)

    # Engines release; the trainer phase takes the memory.
    before = free_bytes()
    occupation(fleet, "release", [WEIGHTS, KV_CACHE, CUDA_GRAPH])
    released = free_bytes()
    assert released - before > expected, f"release freed {(released - before) / 2**30:.1f} GiB of {total / 2**30:.0f}"
    trainer_bytes = int(0.9 * released)
    assert trainer_bytes > before  # this could not have been allocated next to the generating engine
    trainer_state = torch.ones(trainer_bytes, dtype=torch.uint8, device="cuda")  # written: really resident
    new_state = perturbed(state, seed=41)  # the optimizer steps' result, handed over in host memory
    assert int(trainer_state[-1]) == 1
    del trainer_state  # the trainer offloads
    assert free_bytes() > trainer_bytes

    # Weights come back, the new ones are published over CUDA IPC, then the KV cache and graphs.
    occupation(fleet, "resume", [WEIGHTS])
    cfg = build(WeightSyncConfig, {"transport": "ipc", "bucket_bytes": 256 << 10})
    shared = IPCWeightSync(fleet, cfg).push(iter_buckets(new_state.items(), cfg.bucket_bytes), version="1")
    assert shared == sum(t.numel() * t.element_size() for t in new_state.values())
    occupation(fleet, "resume", [KV_CACHE, CUDA_GRAPH])
    resumed = free_bytes()
    assert released - resumed > expected, f"resume took {(released - resumed) / 2**30:.1f} GiB back"

    (version,) = fleet.weight_versions()
    assert version == "1"
    new_model = reference_model(model_dir, new_state)
    assert_follows_weights(rollout(fleet.router_url, prompts(8, seed=2)), "1", new_model, old_model)
