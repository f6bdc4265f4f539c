"""Colocated engines on CPU: SGLang's /release_memory_occupation and /resume_memory_occupation on the CPU
rollout server, driven through the fleet as the colocated cycle drives it.

A dense model of ~42 MB of fp32 weights makes the drop unambiguous: the server process's resident memory
(/proc VmRSS) falls by most of it on a weights release and comes back on the resume; generation is refused
while anything is released and until a weight update has loaded the resumed weights; after the update the
server answers a seeded request exactly as before the release.
"""
from __future__ import annotations

import pytest
import torch

from rollout_sglang import engine_api as api
from rollout_sglang.config import FleetConfig, PlacementConfig, ServerConfig, WeightSyncConfig
from rollout_sglang.errors import RolloutError
from rollout_sglang.fleet import Fleet
from rollout_sglang.net import http_json
from rollout_sglang.weight_sync import DiskWeightSync, iter_buckets

from .helpers import hf_state

MB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=128, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    path = tmp_path_factory.mktemp("big_dense") / "model"
    Qwen3ForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    cfg = FleetConfig(servers=[ServerConfig(kind="cpu", model_path=str(model_dir))], supervise=False,
                      placement=PlacementConfig(colocate=True), log_dir=str(tmp_path_factory.mktemp("fleet_logs")))
    with Fleet(cfg) as f:
        yield f


def generate(url: str) -> tuple[int, object]:
    body = api.generate_body([1, 2, 3], {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 7}, rid="probe",
                             return_logprob=True)
    return http_json("POST", url + api.GENERATE.path, body, timeout_s=60)


def info(url: str) -> dict:
    return http_json("GET", url + api.SERVER_INFO.path)[1]


def test_release_frees_the_weights_and_resume_with_an_update_restores_service(fleet, model_dir, tmp_path):
    server = fleet.servers[0]
    url = server.url
    model_bytes = sum(t.numel() * t.element_size() for t in hf_state(model_dir).values())
    assert model_bytes > 40 * MB
    status, before = generate(url)
    assert status == 200
    served = fleet.resident_memory()[0]

    assert fleet.release_memory_occupation(api.MEMORY_TAGS) == [server]
    released = fleet.resident_memory()[0]
    assert served - released > 0.8 * model_bytes, (served / MB, released / MB)
    assert server.paused and server.released == set(api.MEMORY_TAGS)
    assert info(url)["memory_released"] == list(api.MEMORY_TAGS)
    status, refused = generate(url)
    assert status == 400 and "memory released (kv_cache, weights, cuda_graph)" in refused["error"]["message"]
    # What SGLang's scheduler would die of is a clear 400 here.
    status, again = http_json("POST", url + api.RELEASE_MEMORY_OCCUPATION.path, {"tags": ["weights"]})
    assert status == 400 and "'weights' is already released" in again["error"]["message"]
    status, bogus = http_json("POST", url + api.RESUME_MEMORY_OCCUPATION.path, {"tags": ["kv_cahce"]})
    assert status == 400 and "unknown memory region 'kv_cahce'" in bogus["error"]["message"]

    assert fleet.resume_memory_occupation([api.MEMORY_WEIGHTS]) == [server]
    resumed = fleet.resident_memory()[0]
    assert resumed - released > 0.8 * model_bytes, (released / MB, resumed / MB)
    assert fleet.resume_memory_occupation([api.MEMORY_WEIGHTS]) == []  # nothing released there any more
    status, again = http_json("POST", url + api.RESUME_MEMORY_OCCUPATION.path, {"tags": ["weights"]})
    assert status == 400 and "'weights' is not released" in again["error"]["message"]

    # The update path of the colocated cycle: the fleet's own weight sync, which pauses, reloads and continues,
    # but a server whose KV cache is still released stays paused.
    sync = DiskWeightSync(fleet, WeightSyncConfig(transport="disk", disk_dir=str(tmp_path / "w")),
                          config_dir=str(model_dir))
    sync.push(iter_buckets(hf_state(model_dir).items(), 16 * MB), "1")
    assert server.paused and info(url)["paused"] is True
    status, refused = generate(url)
    assert status == 400 and "memory released (kv_cache, cuda_graph)" in refused["error"]["message"]

    assert fleet.resume_memory_occupation([api.MEMORY_KV_CACHE, api.MEMORY_CUDA_GRAPH]) == [server]
    assert server.paused  # resuming gives memory back; generation continues when the caller says so
    fleet.continue_generation()
    assert not server.paused and info(url)["memory_released"] == []
    status, after = generate(url)
    assert status == 200 and after["meta_info"]["weight_version"] == "1"
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


def test_resumed_weights_serve_only_once_an_update_loaded_them(fleet, model_dir):
    server = fleet.servers[0]
    fleet.release_memory_occupation([api.MEMORY_WEIGHTS])
    fleet.resume_memory_occupation([api.MEMORY_WEIGHTS])
    fleet.continue_generation()
    status, refused = generate(server.url)
    assert status == 400 and "no weight update has loaded them" in refused["error"]["message"]
    status, data = fleet.call(server, api.UPDATE_WEIGHTS_FROM_DISK, api.disk_update_body(str(model_dir), "2"))
    assert status == 200 and data["success"], data
    status, served = generate(server.url)
    assert status == 200 and served["meta_info"]["weight_version"] == "2"


def test_a_refused_release_names_the_server(fleet):
    server = fleet.servers[0]
    fleet.release_memory_occupation([api.MEMORY_CUDA_GRAPH])
    server.released.clear()  # the fleet's record disagrees with the server: the server refuses, the fleet says so
    with pytest.raises(RolloutError, match=r"server 0 .*/release_memory_occupation: HTTP 400.*already released"):
        fleet.release_memory_occupation([api.MEMORY_CUDA_GRAPH])
    server.released.add(api.MEMORY_CUDA_GRAPH)
    fleet.resume_memory_occupation([api.MEMORY_CUDA_GRAPH])
    fleet.continue_generation()
    assert generate(server.url)[0] == 200
