"""A real SGLang engine launched by a Ray actor in a one-GPU placement-group bundle: the actor gives
the engine exactly the GPU Ray assigned (CUDA_VISIBLE_DEVICES from ray.get_gpu_ids()), the router
reaches it at the address the actor reported, and supervision restarts it after its process dies."""
from __future__ import annotations

import time

import pytest
import torch

from rollout_sglang.config import FleetConfig
from rollout_sglang.fleet import Fleet
from typed_config import build

from .conftest import sglang_python
from .sglang_helpers import (
    BF16_MEAN_LOGPROB_TOL,
    hf_state,
    mean_logprob_error,
    prompts,
    reference_model,
    rollout,
    tiny_engine_server,
    write_tiny_qwen3_moe,
)

pytestmark = pytest.mark.gpu
ray = pytest.importorskip("ray")


def test_sglang_engine_as_ray_actor(tmp_path):
    model_dir = write_tiny_qwen3_moe(tmp_path / "model")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        server = tiny_engine_server(model_dir, sglang_python(), num_cpus=1)  # num_gpus: null -> tp = 1
        cfg = build(FleetConfig, {"servers": [server], "placement": {"launcher": "ray"}, "health_interval_s": 2.0,
                                  "health_failures_to_restart": 2, "log_dir": str(tmp_path / "logs")})
        with Fleet(cfg) as fleet:
            engine = fleet.servers[0]
            assert fleet.launcher.bundles == [{"CPU": 1.0, "GPU": 1.0}] and len(engine.proc.gpu_ids) == 1
            reference = reference_model(model_dir, hf_state(model_dir))
            groups = rollout(fleet.router_url, prompts(4, seed=1))
            assert mean_logprob_error(reference, groups) < BF16_MEAN_LOGPROB_TOL

            restarts = engine.restarts
            engine.proc.kill()  # through the actor, on the engine's node
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not (engine.restarts > restarts and engine.state == "healthy"):
                time.sleep(1.0)
            assert engine.state == "healthy" and engine.restarts == restarts + 1, engine.events
            groups = rollout(fleet.router_url, prompts(4, seed=2))
            assert all(s.weight_version == "default" for g in groups for s in g)
            assert mean_logprob_error(reference, groups) < BF16_MEAN_LOGPROB_TOL
    finally:
        ray.shutdown()
        torch.cuda.empty_cache()
