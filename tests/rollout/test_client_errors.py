"""The async client against a deliberately misbehaving HTTP server: garbage, HTTP errors, timeouts."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web

from rollout_sglang.client import RetryPolicy, SGLangClient
from rollout_sglang.errors import ResponseFormatError, ServerHTTPError, ServerUnavailableError
from rollout_sglang.net import find_free_port

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def good_item(ids=(5, 6), finish=None):
    return {"text": "", "output_ids": list(ids), "meta_info": {
        "id": "x", "finish_reason": finish or {"type": "length", "length": len(ids)},
        "prompt_tokens": 2, "completion_tokens": len(ids), "weight_version": "7", "e2e_latency": 0.1,
        "output_token_logprobs": [[-0.5, t, None] for t in ids]}}


class Misbehaving:
    """An HTTP server that answers each request with the next scripted reply for its path."""

    def __init__(self):
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.script: dict[str, list] = {}
        self.received: list[tuple[str, dict]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        self.received.append((request.path, body))
        replies = self.script.get(request.path, [])
        reply = replies.pop(0) if len(replies) > 1 else (replies[0] if replies else (200, {}))
        status, payload = reply[0], reply[1]
        if len(reply) > 2:
            await asyncio.sleep(reply[2])
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        return web.json_response(payload, status=status)

    def close(self):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def bad_server():
    server = Misbehaving()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def reset(bad_server):
    bad_server.script.clear()
    bad_server.received.clear()


def generate(url, n=1, **kw):
    async def go():
        async with SGLangClient(url, retry=kw.pop("retry", FAST_RETRY), **kw) as c:
            return await c.generate([1, 2], {"max_new_tokens": 2}, n=n, rid="req-1")
    return asyncio.run(go())


def test_good_response_parses(bad_server):
    bad_server.script["/generate"] = [(200, good_item((7,), {"type": "stop", "matched": 7}))]
    (sample,) = generate(bad_server.url)
    assert sample.output_ids == [7] and sample.rid == "req-1"
    assert sample.finish_reason.type == "stop" and sample.finish_reason.matched == 7
    assert sample.weight_version == "7" and sample.output_logprobs == [-0.5]


@pytest.mark.parametrize("per_sample", [False, True], ids=["n_request", "request_per_sample"])
def test_samples_are_named_as_sglang_names_them(bad_server, per_sample):
    """SGLang names the samples of an n-request rid_0 .. rid_{n-1} (an abort must name those). Against
    servers that sample every copy of a request with its one seed, each sample is its own request."""
    bad_server.script["/generate"] = [(200, [good_item()] * 3)] if not per_sample else [(200, good_item())]

    async def go():
        async with SGLangClient(bad_server.url, retry=FAST_RETRY, one_request_per_sample=per_sample) as c:
            return await c.generate([1, 2], {"max_new_tokens": 2}, n=3, rid="req-1")

    samples = asyncio.run(go())
    assert [s.rid for s in samples] == ["req-1_0", "req-1_1", "req-1_2"]
    bodies = sorted((b for p, b in bad_server.received if p == "/generate"), key=lambda b: b["rid"])
    if per_sample:
        assert [b["rid"] for b in bodies] == ["req-1_0", "req-1_1", "req-1_2"]
        assert len({b["sampling_params"]["sampling_seed"] for b in bodies}) == 3
        assert all(b["sampling_params"]["n"] == 1 for b in bodies)
    else:
        assert [(b["rid"], b["sampling_params"]["n"]) for b in bodies] == [("req-1", 3)]


def test_abort_finish_reason_keeps_partial_output(bad_server):
    bad_server.script["/generate"] = [(200, good_item((9,), {"type": "abort", "message": "Abort requested"}))]
    (sample,) = generate(bad_server.url)
    assert sample.aborted and sample.output_ids == [9] and sample.finish_reason.message == "Abort requested"


@pytest.mark.parametrize("payload, field", [
    ("this is not json", "<body>"),
    ({"text": ""}, "meta_info"),
    ({**good_item(), "meta_info": {**good_item()["meta_info"], "output_token_logprobs": None}}, "meta_info.output_token_logprobs"),
    ({**good_item(), "meta_info": {**good_item()["meta_info"], "output_token_logprobs": [[0.7, 5, None], [-1, 6, None]]}},
     "meta_info.output_token_logprobs[0][0]"),
    ({**good_item(), "meta_info": {**good_item()["meta_info"], "finish_reason": {"type": "exploded"}}}, "meta_info.finish_reason.type"),
    ({**good_item(), "output_ids": [5, 99]}, "output_ids"),
    ({**good_item(), "meta_info": {**good_item()["meta_info"], "completion_tokens": 3}}, "meta_info.completion_tokens"),
    ([good_item(), good_item()], "<body>"),  # two results for one sample
])
def test_garbage_raises_naming_server_and_field(bad_server, payload, field):
    bad_server.script["/generate"] = [(200, payload)]
    with pytest.raises(ResponseFormatError) as info:
        generate(bad_server.url)
    assert info.value.field == field and bad_server.url in str(info.value)


def test_5xx_is_retried_with_fresh_rid_and_same_seed(bad_server):
    bad_server.script["/generate"] = [(500, "boom"), (502, "bad gateway"), (200, good_item())]
    (sample,) = generate(bad_server.url)
    assert sample.rid == "req-1" and sample.output_ids == [5, 6]
    bodies = [b for p, b in bad_server.received if p == "/generate"]
    assert [b["rid"] for b in bodies] == ["req-1", "req-1.retry1", "req-1.retry2"]
    assert len({b["sampling_params"]["sampling_seed"] for b in bodies}) == 1


def test_4xx_is_not_retried(bad_server):
    bad_server.script["/generate"] = [(400, {"message": "input_ids: required"})]
    with pytest.raises(ServerHTTPError) as info:
        generate(bad_server.url)
    assert info.value.status == 400 and "input_ids" in str(info.value)
    assert len(bad_server.received) == 1


def test_persistent_5xx_gives_up_after_max_attempts(bad_server):
    bad_server.script["/generate"] = [(503, "no workers")]
    with pytest.raises(ServerUnavailableError, match="4 attempt"):
        generate(bad_server.url)
    assert len(bad_server.received) == 4


def test_timeouts_are_retried_then_fail_within_total_timeout(bad_server):
    bad_server.script["/generate"] = [(200, good_item(), 2.0)]
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="TimeoutError"):
        generate(bad_server.url, request_timeout_s=0.3, total_timeout_s=1.0,
                 retry=RetryPolicy(max_attempts=10, initial_backoff_s=0.01))
    assert time.monotonic() - start < 2.0
    assert len(bad_server.received) >= 2


def test_slow_first_attempt_then_success(bad_server):
    bad_server.script["/generate"] = [(200, good_item((1,)), 1.5), (200, good_item((2,)))]
    (sample,) = generate(bad_server.url, request_timeout_s=0.5)
    assert sample.output_ids == [2]  # only the attempt that answered is used: no duplicate


def test_connection_refused(bad_server):
    with pytest.raises(ServerUnavailableError, match="ClientConnectorError|Connect"):
        generate(f"http://127.0.0.1:{find_free_port()}", total_timeout_s=2.0)


def test_reads_and_aborts(bad_server):
    bad_server.script["/model_info"] = [(200, {"model_path": "m", "weight_version": "12"}), (200, {"model_path": "m"})]

    async def go():
        async with SGLangClient(bad_server.url, retry=FAST_RETRY) as c:
            assert await c.weight_version() == "12"  # SGLang 0.5.23: /model_info, no /get_weight_version
            with pytest.raises(ResponseFormatError, match="weight_version"):
                await c.weight_version()
            await c.abort("r1_0")
            await c.abort()

    asyncio.run(go())
    assert [b for p, b in bad_server.received if p == "/abort_request"] == [{"rid": "r1_0"}, {"abort_all": True}]


# ---- a server that does not report its routed-experts shape (SGLang's /get_model_info) -------------


def pool_generate(url: str, shape):
    from rollout_sglang.worker_pool import WorkerPool

    async def go():
        async with WorkerPool(url, request_timeout_s=5, retry=FAST_RETRY, routed_experts_shape=shape) as pool:
            return await pool.generate([1, 2], {"max_new_tokens": 2}, return_routed_experts=True, rid="r")
    return asyncio.run(go())


def test_worker_pool_reads_partial_routed_experts_with_the_models_shape(bad_server):
    """An aborted response carries fewer rows than prompt + output - 1 (here 2 of 3). Without a shape
    they cannot be split into layers x top-k; with the trainer's (4 MoE layers, top-2) they can."""
    import base64

    import numpy as np

    rows = (np.arange(2 * 4 * 2, dtype=np.int32) % 8).reshape(2, 4, 2)
    item = good_item((5, 6), {"type": "abort", "message": "Abort requested"})
    item["meta_info"]["routed_experts"] = base64.b64encode(rows.tobytes()).decode()
    bad_server.script["/model_info"] = [(200, {"model_path": "m", "is_generation": True, "weight_version": "7"})]
    bad_server.script["/generate"] = [(200, item)]
    (sample,) = pool_generate(bad_server.url, (4, 2))
    assert sample.aborted and np.array_equal(sample.routed_experts, rows)
    with pytest.raises(ResponseFormatError, match="routed_experts"):
        pool_generate(bad_server.url, None)


def test_worker_pool_refuses_a_server_routing_another_model(bad_server):
    from rollout_sglang.errors import RolloutError

    bad_server.script["/model_info"] = [(200, {"model_path": "m", "routed_experts_shape": [3, 2]})]
    with pytest.raises(RolloutError, match="routes 3 MoE layers x top-2; the trainer's model has 4 x top-2"):
        pool_generate(bad_server.url, (4, 2))
