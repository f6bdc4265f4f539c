"""Every call the project makes to an SGLang server, checked against SGLang's own HTTP server:

- each route of ``engine_api`` is registered in SGLang's FastAPI app with that method;
- each body the project sends (built by ``engine_api``'s builders, the only way the client, the fleet
  and the weight-sync transports build them) is accepted by SGLang's app (its validation and
  /generate's contract check run for real) and converts strictly into the request class that route
  parses it into (no field SGLang would silently ignore);
- SGLang names the samples of an ``n > 1`` request as ``engine_api.sample_rids`` says (an abort must
  name those);
- no route the project calls is missing, and no module sends a path that is not in ``engine_api``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rollout_sglang import engine_api as api

REPO = Path(__file__).resolve().parents[2]

# One realistic body per route, from the builders (GET routes and /flush_cache take none).
BODIES = {
    api.GENERATE: api.generate_body([1, 2, 3], {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                                "stop_token_ids": [2], "sampling_seed": 12345},
                                    rid="s0-step3-7_1", return_logprob=True, return_routed_experts=True),
    api.ABORT_REQUEST: api.abort_body("s0-step3-7_1"),
    api.PAUSE_GENERATION: api.pause_body("retract"),
    api.CONTINUE_GENERATION: api.continue_body(),
    api.BEGIN_WEIGHT_UPDATE: api.begin_weight_update_body(),
    api.END_WEIGHT_UPDATE: api.end_weight_update_body(),
    api.UPDATE_WEIGHTS_FROM_DISK: api.disk_update_body("/ckpt/v3", "3"),
    api.INIT_WEIGHTS_UPDATE_GROUP: api.init_group_body(master_address="10.0.0.1", master_port=29600, rank_offset=1,
                                                       world_size=9, group_name="vespo_weight_sync_ab12", backend="nccl"),
    api.UPDATE_WEIGHTS_FROM_DISTRIBUTED: api.distributed_update_body(
        names=["model.norm.weight", "lm_head.weight"], dtypes=["bfloat16", "bfloat16"], shapes=[[2048], [151936, 2048]],
        group_name="vespo_weight_sync_ab12", weight_version="3", flattened=True),
    api.UPDATE_WEIGHTS_FROM_TENSOR: api.tensor_update_body(["gASVAAAAAAAAAACULg==", "gASVAAAAAAAAAACULg=="],
                                                           flattened=True, weight_version="3"),
    api.DESTROY_WEIGHTS_UPDATE_GROUP: api.destroy_group_body("vespo_weight_sync_ab12"),
    api.GET_WEIGHTS_BY_NAME: api.get_weights_body("model.layers.0.mlp.experts.3.up_proj.weight", truncate_size=8),
    api.RELEASE_MEMORY_OCCUPATION: api.memory_occupation_body(api.MEMORY_TAGS),
    api.RESUME_MEMORY_OCCUPATION: api.memory_occupation_body([api.MEMORY_WEIGHTS]),
}
MORE_BODIES = [  # the other shapes a builder produces
    (api.GENERATE, api.generate_body([5], {"max_new_tokens": 1, "sampling_seed": 1}, rid="eval-0-set-3",
                                     return_logprob=False)),
    (api.ABORT_REQUEST, api.abort_body()),
    (api.PAUSE_GENERATION, api.pause_body("in_place")),
    (api.PAUSE_GENERATION, api.pause_body("abort")),
    (api.UPDATE_WEIGHTS_FROM_DISTRIBUTED, api.distributed_update_body(
        names=["a"], dtypes=["float32"], shapes=[[4]], group_name="g", flattened=False)),
    (api.UPDATE_WEIGHTS_FROM_TENSOR, api.tensor_update_body(["gASVAAAAAAAAAACULg=="], flattened=False)),
    (api.RESUME_MEMORY_OCCUPATION, api.memory_occupation_body([api.MEMORY_KV_CACHE, api.MEMORY_CUDA_GRAPH])),
]


@pytest.fixture(scope="module")
def routes(sglang):
    return {r["path"]: r for r in sglang.ask("routes")["routes"]}


@pytest.mark.parametrize("route", api.ROUTES, ids=lambda r: r.path)
def test_every_route_is_registered_with_its_method(routes, route):
    assert route.path in routes, f"{route.path} is not a route of SGLang {api.TESTED_SGLANG}"
    assert route.method in routes[route.path]["methods"], routes[route.path]


def test_the_routes_the_old_dialect_used_are_gone_or_deprecated(routes):
    assert "/get_weight_version" not in routes  # the version is /model_info's weight_version


@pytest.mark.parametrize("route, body", list(BODIES.items()) + MORE_BODIES,
                         ids=[r.path for r in BODIES] + [r.path + "-" + str(i) for i, (r, _) in enumerate(MORE_BODIES)])
def test_every_body_is_accepted_by_sglang(sglang, routes, route, body):
    answer = sglang.ask("post", method=route.method, path=route.path, body=body)
    assert not answer["refused"], answer
    body_class = routes[route.path]["body_class"]
    assert body_class is not None, f"{route.path}: SGLang parses no body there"
    built = sglang.ask("construct", **{"class": body_class, "body": body})
    assert built["ok"], built["error"]


@pytest.mark.parametrize("route", [api.HEALTH, api.MODEL_INFO, api.SERVER_INFO, api.FLUSH_CACHE], ids=lambda r: r.path)
def test_bodiless_calls_reach_their_handler(sglang, route):
    assert not sglang.ask("post", method=route.method, path=route.path)["refused"]


def test_a_bad_body_is_refused(sglang):
    """The checks above can fail: bodies SGLang would refuse or silently misread are caught."""
    bad_rid = {**BODIES[api.GENERATE], "rid": 5}
    assert sglang.ask("post", method="POST", path="/generate", body=bad_rid)["refused"]
    typo = {**BODIES[api.UPDATE_WEIGHTS_FROM_DISK], "flush_cahce": False}
    assert not sglang.ask("construct", **{"class": "UpdateWeightFromDiskReqInput", "body": typo})["ok"]
    assert sglang.ask("post", method="GET", path="/get_weight_version")["refused"]


def test_the_memory_tags_are_sglangs(sglang):
    """The regions the fleet releases and resumes are SGLang's names, in its order (GPU_MEMORY_ALL_TYPES)."""
    assert list(api.MEMORY_TAGS) == sglang.ask("memory_tags")["all"]
    built = sglang.ask("construct", **{"class": "ReleaseMemoryOccupationReqInput",
                                       "body": api.memory_occupation_body([api.MEMORY_WEIGHTS])})
    assert built["ok"] and built["tags"] == ["weights"]
    with pytest.raises(ValueError, match="kv_cahce"):
        api.memory_occupation_body(["kv_cahce"])


def test_generate_body_is_one_sample_named_by_its_rid(sglang):
    built = sglang.ask("construct", **{"class": "GenerateReqInput", "body": BODIES[api.GENERATE]})
    assert built["n"] == 1 and built["rid"] == "s0-step3-7_1"


def test_sglang_names_the_samples_of_an_n_request_as_sample_rids_says(sglang):
    body = api.generate_body([1, 2], {"max_new_tokens": 4, "n": 3}, rid="r7", return_logprob=True)
    built = sglang.ask("construct", **{"class": "GenerateReqInput", "body": body})
    assert built["n"] == 3 and built["rid"] == api.sample_rids("r7", 3) == ["r7_0", "r7_1", "r7_2"]


def _route_literals(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"/[a-z_]+", node.value)]


def test_no_module_sends_a_path_of_its_own():
    """engine_api is the only place SGLang routes are written (the CPU stand-in serves them, the router's
    own API is sglang-router's)."""
    exempt = {"engine_api.py", "router.py", "worker_pool.py"}
    found = {str(p.relative_to(REPO)): _route_literals(p) for p in (REPO / "rollout_sglang").rglob("*.py")
             if p.name not in exempt and "cpu_server" not in p.parts}
    assert {k: v for k, v in found.items() if v} == {}
    served = set(_route_literals(REPO / "rollout_sglang/cpu_server/app.py"))
    # The CPU stand-in serves every route the project calls, except CUDA IPC updates.
    assert {r.path for r in api.ROUTES} - served == {api.UPDATE_WEIGHTS_FROM_TENSOR.path}
