"""The CPU rollout server (not SGLang) on its own: API shapes, sampling, control endpoints, experts."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from rollout_sglang.client import SGLangClient
from rollout_sglang.cpu_server.engine import CpuEngine, Sequence
from rollout_sglang.cpu_server.sampling import SamplingParams, sample_tokens
from rollout_sglang.net import http_json
from .helpers import cpu_server, load_hf, teacher_forced_logprobs, teacher_forced_routing


@pytest.fixture(scope="module")
def server(tiny_moe_dir, tmp_path_factory):
    """Sampling as SGLang's --enable-deterministic-inference: every sample of a request uses its one seed."""
    with cpu_server(tiny_moe_dir, tmp_path_factory.mktemp("server_log") / "server.log",
                    extra_args=("--enable-deterministic-inference",)) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    return load_hf(tiny_moe_dir)


def run(coro):
    return asyncio.run(coro)


def post(url, path, body):
    return http_json("POST", url + path, body, timeout_s=60)


def test_response_shape_matches_sglang(server):
    status, data = post(server, "/generate", {"input_ids": [[1, 2, 3], [4]], "return_logprob": True,
                                               "sampling_params": {"max_new_tokens": 3, "n": 2}})
    assert status == 200 and isinstance(data, list) and len(data) == 4  # prompt-major, n per prompt
    for item in data:
        meta = item["meta_info"]
        assert set(item) >= {"text", "output_ids", "meta_info"}
        assert meta["finish_reason"] == {"type": "length", "length": 3}
        assert meta["completion_tokens"] == 3 and meta["weight_version"] == "default"
        assert [t for _, t, _ in meta["output_token_logprobs"]] == item["output_ids"]
        assert all(entry[2] is None for entry in meta["output_token_logprobs"])
    assert [d["meta_info"]["prompt_tokens"] for d in data] == [3, 3, 1, 1]
    status, single = post(server, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(single, dict) and "output_token_logprobs" not in single["meta_info"]
    info = http_json("GET", server + "/get_server_info")[1]
    assert info["engine"] == "CPU rollout server (not SGLang)"
    assert http_json("GET", server + "/get_model_info")[1]["routed_experts_shape"] == [4, 2]
    assert info["version"] == "0.5.23"  # the SGLang API it speaks
    assert http_json("GET", server + "/model_info")[1]["weight_version"] == "default"
    assert http_json("GET", server + "/get_weight_version")[0] == 404  # not in SGLang 0.5.23
    ids = [d["meta_info"]["id"] for d in data]  # SGLang's expansion of one id over 2 prompts x 2 samples
    assert len(set(ids)) == 4


def test_logprob_parity_greedy_and_seeded(server, reference):
    async def go():
        async with SGLangClient(server, one_request_per_sample=True) as c:  # the server shares a request's seed
            greedy = await c.generate([7, 8, 9], {"max_new_tokens": 8, "temperature": 0.0}, n=2)
            # The seed of each sample derives from its request id: same ids, same samples.
            a = await c.generate([7, 8, 9], {"max_new_tokens": 8, "temperature": 0.7}, n=3, rid="seeded")
            b = await c.generate([7, 8, 9], {"max_new_tokens": 8, "temperature": 0.7}, n=3, rid="seeded")
            other = await c.generate([7, 8, 9], {"max_new_tokens": 8, "temperature": 0.7}, n=3, rid="other")
            return greedy, a, b, other

    greedy, a, b, other = run(go())
    assert greedy[0].output_ids == greedy[1].output_ids
    ids = torch.tensor([[7, 8, 9]])
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    assert greedy[0].output_ids == expected
    assert [s.output_ids for s in a] == [s.output_ids for s in b]  # same seed: same samples
    assert [s.output_ids for s in a] != [s.output_ids for s in other]
    assert len({tuple(s.output_ids) for s in a}) == 3  # each sample its own request and seed
    assert [s.rid for s in a] == ["seeded_0", "seeded_1", "seeded_2"]
    for s in greedy:
        ref = teacher_forced_logprobs(reference, s.prompt_ids, s.output_ids, 1.0)
        assert np.allclose(ref, s.output_logprobs, atol=1e-4)
    for s in a:  # log_softmax(logits / T), before any filtering
        ref = teacher_forced_logprobs(reference, s.prompt_ids, s.output_ids, 0.7)
        assert np.allclose(ref, s.output_logprobs, atol=1e-4)


def test_stop_token_ids_and_no_trim(server):
    status, data = post(server, "/generate", {"input_ids": [1, 2], "return_logprob": True,
                                               "sampling_params": {"max_new_tokens": 5, "stop_token_ids": list(range(128))}})
    assert status == 200
    meta = data["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": data["output_ids"][0]}
    assert meta["completion_tokens"] == 1 and len(meta["output_token_logprobs"]) == 1


def test_routed_experts_match_hf_router(server, reference):
    async def go():
        async with SGLangClient(server, routed_experts_shape=(4, 2)) as c:
            return await c.generate([3, 1, 4, 1, 5], {"max_new_tokens": 6}, n=2, return_routed_experts=True)

    for s in run(go()):
        assert s.routed_experts.shape == (5 + 6 - 1, 4, 2)
        expected = teacher_forced_routing(reference, s.prompt_ids, s.output_ids)
        same = expected == np.sort(s.routed_experts, -1)
        assert same.mean() > 0.98


def test_abort_returns_partial_output(server):
    result = {}

    def long_request():
        result["r"] = post(server, "/generate", {"input_ids": [1], "rid": "long-one", "return_logprob": True,
                                                  "sampling_params": {"max_new_tokens": 400, "n": 2}})

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)
    assert post(server, "/flush_cache", {})[0] == 400  # busy: SGLang refuses to flush
    # As in SGLang, the samples of an n > 1 request are long-one_0 and long-one_1: the bare id aborts nothing.
    assert post(server, "/abort_request", {"rid": "long-one"})[0] == 200
    t.join(0.5)
    assert t.is_alive() and post(server, "/flush_cache", {})[0] == 400
    for rid in ("long-one_0", "long-one_1"):
        assert post(server, "/abort_request", {"rid": rid})[0] == 200
    t.join(30)
    status, data = result["r"]
    assert status == 200
    for item in data:
        assert item["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(item["output_ids"]) < 400
        assert len(item["meta_info"]["output_token_logprobs"]) == len(item["output_ids"])
    assert post(server, "/flush_cache", {})[0] == 200


def test_pause_in_place_and_continue(server):
    assert post(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(server, "/generate", {
        "input_ids": [2, 3], "sampling_params": {"max_new_tokens": 3}})))
    t.start()
    t.join(0.6)
    assert t.is_alive(), "generation ran while paused"
    assert post(server, "/continue_generation", {})[0] == 200
    t.join(30)
    assert result["r"][0] == 200 and result["r"][1]["meta_info"]["finish_reason"]["type"] == "length"


def test_pause_abort_mode_aborts_in_flight(server):
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(server, "/generate", {
        "input_ids": [2, 3], "sampling_params": {"max_new_tokens": 400}})))
    t.start()
    time.sleep(0.4)
    assert post(server, "/pause_generation", {})[0] == 200  # SGLang's default mode is "abort"
    t.join(30)
    post(server, "/continue_generation", {})
    assert result["r"][1]["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize("body, field", [
    ({}, "input_ids"),
    ({"input_ids": [1, 999]}, "input_ids"),
    ({"input_ids": [[1], "x"]}, "input_ids[1]"),
    ({"input_ids": [1], "sampling_params": {"temprature": 1.0}}, "sampling_params.temprature"),
    ({"input_ids": [1], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"input_ids": [1], "stream": True}, "stream"),
])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    status, data = post(server, "/generate", body)
    assert status == 400 and field in data["message"], data


def test_update_weights_bad_input(server, tmp_path):
    status, data = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert status == 400 and "safetensors" in data["message"]
    body = {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "nope"}
    status, data = post(server, "/update_weights_from_distributed", body)
    assert status == 400 and "between begin_weight_update() and end_weight_update()" in data["message"]
    assert post(server, "/begin_weight_update", {})[0] == 200
    try:
        assert post(server, "/begin_weight_update", {})[1]["message"].startswith("a weight-update session is already open")
        status, data = post(server, "/update_weights_from_distributed", body)
        assert status == 400 and "not initialised" in data["message"]
    finally:
        assert post(server, "/end_weight_update", {})[0] == 200
    status, data = post(server, "/end_weight_update", {})
    assert status == 400 and data["message"].startswith("no weight-update session is open")


def start_generation(server, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=post(server, "/generate", body)))
    t.start()
    return t, result


def test_requests_held_in_place_block_the_flush_and_fail_a_flushing_update(server, tiny_moe_dir):
    t, result = start_generation(server, {"input_ids": [2, 3], "sampling_params": {"max_new_tokens": 300}})
    time.sleep(0.3)
    assert post(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        assert post(server, "/flush_cache", {})[0] == 400  # the held request keeps its (old-weight) KV
        # SGLang's update flushes by default, and fails when the flush is refused (the weights did change).
        status, data = post(server, "/update_weights_from_disk", {"model_path": str(tiny_moe_dir)})
        assert status == 400 and data["message"].startswith("Weights were updated, but the cache was not flushed")
        body = {"model_path": str(tiny_moe_dir), "flush_cache": False}
        assert post(server, "/update_weights_from_disk", body)[1]["success"] is True
    finally:
        assert post(server, "/continue_generation", {})[0] == 200
    t.join(60)
    assert result["r"][1]["meta_info"]["finish_reason"]["type"] == "length"


def test_retract_pause_allows_the_flush_and_the_request_continues_exactly(server, reference):
    t, result = start_generation(server, {"input_ids": [5, 1, 4], "return_logprob": True, "return_routed_experts": True,
                                          "sampling_params": {"max_new_tokens": 60, "sampling_seed": 11}})
    time.sleep(0.2)
    assert post(server, "/pause_generation", {"mode": "retract"})[0] == 200
    try:
        assert post(server, "/flush_cache", {})[0] == 200  # the retracted request waits without KV
    finally:
        assert post(server, "/continue_generation", {})[0] == 200
    t.join(60)
    item = result["r"][1]
    ids = item["output_ids"]
    assert item["meta_info"]["finish_reason"]["type"] == "length" and len(ids) == 60
    ref = teacher_forced_logprobs(reference, [5, 1, 4], ids)
    assert np.allclose(ref, [lp for lp, _, _ in item["meta_info"]["output_token_logprobs"]], atol=1e-4)
    import base64
    rows = np.frombuffer(base64.b64decode(item["meta_info"]["routed_experts"]), dtype=np.int32)
    assert rows.size == (3 + 60 - 1) * 4 * 2  # one row per fed position: none lost or repeated by the retraction


def test_health_waits_while_generation_is_paused(server):
    assert http_json("GET", server + "/health", timeout_s=5)[0] == 200
    assert post(server, "/pause_generation", {"mode": "retract"})[0] == 200
    try:
        with pytest.raises(OSError):  # SGLang's health check generates a token, which waits for the pause to end
            http_json("GET", server + "/health", timeout_s=1.0)
    finally:
        post(server, "/continue_generation", {})
    assert http_json("GET", server + "/health", timeout_s=5)[0] == 200


def test_samples_of_one_request_share_its_seed(server):
    """SGLang's deterministic sampling: every sample of an n > 1 request uses its one sampling_seed, so a
    client that asks for n samples in one request gets n identical ones; the server says so."""
    status, data = post(server, "/generate", {"input_ids": [4, 4, 2], "rid": "twins",
                                               "sampling_params": {"max_new_tokens": 12, "n": 2, "sampling_seed": 9}})
    assert status == 200 and data[0]["output_ids"] == data[1]["output_ids"]
    assert [d["meta_info"]["id"] for d in data] == ["twins_0", "twins_1"]
    assert http_json("GET", server + "/server_info")[1]["enable_deterministic_inference"] is True

    async def go(per_sample: bool):
        async with SGLangClient(server, one_request_per_sample=per_sample) as c:
            return await c.generate([4, 4, 2], {"max_new_tokens": 12}, n=3, rid="group")

    assert len({tuple(s.output_ids) for s in run(go(False))}) == 1  # zero advantages, silently
    assert len({tuple(s.output_ids) for s in run(go(True))}) == 3


def test_sampling_filters_respect_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    topk = [sample_tokens(logits, [SamplingParams(top_k=2)], [g])[0].item() for g in gens]
    assert set(topk) == {0, 1}
    topp = [sample_tokens(logits, [SamplingParams(top_p=0.6)], [g])[0].item() for g in gens]
    assert set(topp) == {0, 1}  # 0.5 < 0.6, so the second token is needed; the third is not
    tok, lp = sample_tokens(logits, [SamplingParams(top_k=1)], [gens[0]])
    assert tok.item() == 0 and abs(lp.item() - np.log(0.5)) < 1e-6  # reported before filtering


def test_bf16_engine_generates(tiny_moe_dir):
    engine = CpuEngine(str(tiny_moe_dir), dtype="bf16")
    done = threading.Event()
    seq = Sequence(rid="r", index=0, prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=4), seed=1,
                   on_done=lambda s: done.set())
    try:
        engine.submit([seq])
        assert done.wait(30)
        assert seq.finish.type == "length" and len(seq.output_ids) == 4
        assert engine.model.dtype == torch.bfloat16 and all(lp <= 0 for lp in seq.logprobs)
    finally:
        engine.shutdown()


def test_continuous_batching_joins_and_leaves_keep_parity(tiny_moe_dir, reference):
    """Sequences admitted into a running batch (caches merged, padding trimmed) stay exact."""
    engine = CpuEngine(str(tiny_moe_dir))
    finished = []
    lock = threading.Lock()

    def seq(rid, prompt, max_new, seed):
        def done(s):
            with lock:
                finished.append(s.rid)
        return Sequence(rid=rid, index=0, prompt_ids=prompt, params=SamplingParams(max_new_tokens=max_new), seed=seed,
                        on_done=done)

    long_one = seq("long", [3, 4, 5], 40, 1)
    late = [seq("late-short", [9, 8, 7, 6, 5, 4, 3, 2, 1], 5, 2), seq("late-tiny", [11], 12, 3)]
    try:
        engine.submit([long_one])
        deadline = time.monotonic() + 30
        while len(long_one.output_ids) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.submit(late)
        while len(finished) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    assert finished.index("late-short") < finished.index("long"), "late sequences did not join the running batch"
    for s in [long_one, *late]:
        assert s.finish.type == "length"
        ref = teacher_forced_logprobs(reference, s.prompt_ids, s.output_ids)
        assert np.allclose(ref, s.logprobs, atol=1e-4), s.rid


def test_dense_tied_qwen3_engine_and_weight_update(tmp_path):
    """Dense Qwen3 with tied embeddings (tiny_dense.yaml shape): generation parity and a weight update."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .helpers import hf_state, perturbed

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, tie_word_embeddings=True, initializer_range=0.2,
                      eos_token_id=None)
    Qwen3ForCausalLM(cfg).save_pretrained(str(tmp_path / "dense"))
    reference = load_hf(tmp_path / "dense")
    engine = CpuEngine(str(tmp_path / "dense"))
    assert not engine.is_moe

    def generate() -> Sequence:
        done = threading.Event()
        seq = Sequence(rid="d", index=0, prompt_ids=[1, 2, 3, 4], params=SamplingParams(max_new_tokens=6), seed=5,
                       on_done=lambda s: done.set())
        engine.submit([seq])
        assert done.wait(30)
        return seq

    try:
        before = generate()
        assert np.allclose(teacher_forced_logprobs(reference, before.prompt_ids, before.output_ids), before.logprobs, atol=1e-4)
        new_state = perturbed(hf_state(tmp_path / "dense"), seed=3)
        engine.update_weights(new_state.items(), "v-dense")
        reference.load_state_dict({**new_state, "lm_head.weight": new_state["model.embed_tokens.weight"]})
        after = generate()
        assert after.weight_version == "v-dense"
        assert np.allclose(teacher_forced_logprobs(reference, after.prompt_ids, after.output_ids), after.logprobs, atol=1e-4)
        with pytest.raises(ValueError, match="has no fused expert parameter"):
            engine.update_weights([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(1))], None)
    finally:
        engine.shutdown()


def test_updates_receive_into_the_buffers_the_last_update_freed(tiny_moe_dir):
    """A whole parameter adopts the received tensor (no copy) and its old storage becomes the next
    receive buffer of that name; a fused expert slice is copied and its received buffer is reused.
    Served weights are never handed out as receive buffers, and the values are the update's."""
    from .helpers import hf_state, perturbed

    engine = CpuEngine(str(tiny_moe_dir))
    try:
        state = hf_state(tiny_moe_dir)
        whole, expert = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"
        served = engine.weight_destination(whole)
        fresh = engine.receive_buffer(whole, list(served.shape), served.dtype)  # nothing freed yet: a new one
        assert fresh.data_ptr() != served.data_ptr()
        first = perturbed(state, seed=1)
        received = {k: engine.receive_buffer(k, list(v.shape), v.dtype).copy_(v) for k, v in first.items()}
        engine.update_weights(received.items(), "v1")
        assert engine.weight_destination(whole).data_ptr() == received[whole].data_ptr()  # adopted, not copied
        assert torch.equal(engine.weight_destination(expert), first[expert])
        again = engine.receive_buffer(whole, list(served.shape), served.dtype)
        assert again.data_ptr() == served.data_ptr()  # the retired storage
        assert engine.receive_buffer(expert, list(first[expert].shape), torch.float32).data_ptr() == \
            received[expert].data_ptr()
        assert engine.receive_buffer(whole, list(served.shape), served.dtype).data_ptr() not in (
            served.data_ptr(), engine.weight_destination(whole).data_ptr())  # handed out once only
        second = perturbed(state, seed=2)
        engine.update_weights([(k, v.clone()) for k, v in second.items()], "v2")
        for name in (whole, expert, "model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(engine.weight_destination(name), second[name]), name
    finally:
        engine.shutdown()
