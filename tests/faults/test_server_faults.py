"""Faults of the CPU rollout server: one bad request or one bad update never hurts anybody else.

One test (or table) per defect of issue 14, each against the real server process (one per module):

- A: bad sampling params are a 400 naming the field (SGLang 0.5.23's rules), while a concurrent good
  request completes normally; an engine error fails only the sequence that caused it;
- B: limits: the samples of a request (n) are capped without stalling /health, prompts and budgets
  are checked against the context length as SGLang does, an oversized body is refused before it is read;
- C: a failed weight update (disk or distributed) leaves the served weights and weight_version exactly
  as they were;
- D: an aborted sample is marked as SGLang marks it, and parses as aborted.

Every wait is bounded (about 3x what it takes here on 2 busy cores) and the server's process group
is killed when the module ends, whatever happened.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import save_file

from rollout_sglang.net import find_free_port, http_json, is_healthy
from rollout_sglang.types import parse_generate_item
from tests.rollout.helpers import hf_state, perturbed, save_tiny_moe

STARTUP_TIMEOUT_S = 90.0  # ~10 s here (imports + model load); more under load
REQUEST_TIMEOUT_S = 60.0  # the longest request below takes ~2 s
CONTEXT = 512  # tiny_moe.yaml's max_position_embeddings


@contextlib.contextmanager
def cpu_server(model_dir: Path, log_path: Path, *extra_args: str) -> Iterator[str]:
    """The server in its own process group, killed (group-wide, SIGKILL after 10 s) on the way out."""
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rollout_sglang.cpu_server", "--model-path", str(model_dir),
                                 "--port", str(port), *extra_args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not is_healthy(url):
            assert proc.poll() is None, f"CPU server exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"CPU server not healthy in {STARTUP_TIMEOUT_S:.0f} s"
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("faults_model") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[str]:
    """Default limits: the defects were reproduced with them."""
    with cpu_server(model_dir, tmp_path_factory.mktemp("faults_server") / "server.log") as url:
        yield url


def post(url: str, path: str, body: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, Any]:
    return http_json("POST", url + path, body, timeout_s=timeout_s)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["r"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def joined(t: threading.Thread, result: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    t.join(timeout_s)
    assert not t.is_alive(), f"no answer within {timeout_s:.0f} s"
    if "error" in result:
        raise result["error"]
    return result["r"]


def wait_running(server: str, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while http_json("GET", server + "/get_load", timeout_s=5)[1][0]["num_running_reqs"] < count:
        assert time.monotonic() < deadline, f"{count} sequence(s) not running within {timeout_s:.0f} s"
        time.sleep(0.01)


GREEDY = {"input_ids": [3, 1, 4, 1, 5], "return_logprob": True,
          "sampling_params": {"max_new_tokens": 16, "temperature": 0.0}}


def greedy_output(server: str) -> tuple[list[int], list[float]]:
    """Token ids and log-probs of a fixed greedy request: equal floats mean equal served weights."""
    status, data = post(server, "/generate", GREEDY)
    assert status == 200, data
    return data["output_ids"], [lp for lp, _, _ in data["meta_info"]["output_token_logprobs"]]


def weight_version(server: str) -> str:
    return http_json("GET", server + "/model_info", timeout_s=10)[1]["weight_version"]


# ---- A: bad sampling params ---------------------------------------------------------------------------
def test_a_bad_request_gets_400_and_a_concurrent_good_one_completes(server):
    """The reproduction: NaN temperature used to pass validation and abort everyone's batch."""
    good = {"input_ids": [1, 2, 3], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0.8, "sampling_seed": 3}}
    t, result = in_thread(post, server, "/generate", good)
    wait_running(server, 1)
    status, data = post(server, "/generate", {"input_ids": [4, 5], "sampling_params": {"temperature": float("nan")}})
    assert status == 400 and "sampling_params.temperature" in data["message"], data
    # SGLang's verify() takes any k >= 1 (its "all" is 1 << 30): served, as the whole vocabulary.
    status, data = post(server, "/generate", {"input_ids": [4, 5], "sampling_params": {"top_k": 2 ** 63,
                                                                                        "max_new_tokens": 4}})
    assert status == 200 and data["meta_info"]["finish_reason"] == {"type": "length", "length": 4}, data
    status, data = joined(t, result)
    assert status == 200 and data["meta_info"]["finish_reason"] == {"type": "length", "length": 200}, data
    assert len(data["output_ids"]) == 200 and all(math.isfinite(lp) for lp, _, _ in data["meta_info"]["output_token_logprobs"])


@pytest.mark.parametrize("params, field", [
    ({"temperature": float("nan")}, "sampling_params.temperature"),
    ({"temperature": float("inf")}, "sampling_params.temperature"),
    ({"temperature": -0.5}, "sampling_params.temperature"),
    ({"temperature": "hot"}, "sampling_params.temperature"),
    ({"top_p": float("nan")}, "sampling_params.top_p"),
    ({"top_p": 0.0}, "sampling_params.top_p"),
    ({"top_k": 0}, "sampling_params.top_k"),
    ({"top_k": -2}, "sampling_params.top_k"),
    ({"top_k": 2.5}, "sampling_params.top_k"),
    ({"min_p": 1.5}, "sampling_params.min_p"),
    ({"frequency_penalty": float("nan")}, "sampling_params.frequency_penalty"),
    ({"repetition_penalty": 0}, "sampling_params.repetition_penalty"),
    ({"sampling_seed": 2 ** 64}, "sampling_params.sampling_seed"),
    ({"max_new_tokens": -1}, "sampling_params.max_new_tokens"),
    ({"n": 0}, "sampling_params.n"),
    ({"n": True}, "sampling_params.n"),
    ({"stop_token_ids": [1, "x"]}, "sampling_params.stop_token_ids"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_a_every_sampling_field_is_checked_at_the_boundary(server, params, field):
    status, data = post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, **params}})
    assert status == 400 and data["message"].startswith(field + ":"), data


def test_a_a_bad_row_in_a_list_of_sampling_params_is_named(server):
    body = {"input_ids": [[1, 2], [3]], "sampling_params": [{"max_new_tokens": 2}, {"top_p": float("nan")}]}
    status, data = post(server, "/generate", body)
    assert status == 400 and data["message"].startswith("sampling_params[1].top_p:"), data


def test_a_an_engine_error_fails_only_the_sequence_that_caused_it(model_dir):
    """Past the HTTP checks (a sequence submitted to the engine directly): a row whose numbers break
    sampling, and one whose prompt breaks the forward pass, fail alone, also inside a running batch."""
    from rollout_sglang.cpu_server.engine import CpuEngine, Sequence
    from rollout_sglang.cpu_server.sampling import SamplingParams

    engine = CpuEngine(str(model_dir))
    finished = threading.Semaphore(0)

    def seq(rid: str, prompt: list[int], seed: int = 1, **params) -> Sequence:
        return Sequence(rid=rid, index=0, prompt_ids=prompt, params=SamplingParams(**params), seed=seed,
                        on_done=lambda s: finished.release())

    def alone(**params) -> Sequence:
        s = seq("alone", [9, 8, 7], **params)
        engine.submit([s])
        assert finished.acquire(timeout=30)
        return s

    try:
        reference = alone(max_new_tokens=40)
        first = seq("first", [9, 8, 7], max_new_tokens=40)
        engine.submit([first])
        deadline = time.monotonic() + 30
        while len(first.output_ids) < 3:  # running: the bad ones join its batch
            assert time.monotonic() < deadline
            time.sleep(0.001)
        late = [seq("nan-temperature", [1, 2], temperature=float("nan")),
                seq("out-of-vocab", [1, 10 ** 6]),
                seq("late-good", [5, 6, 7], seed=2, max_new_tokens=10)]
        engine.submit(late)
        for _ in range(4):
            assert finished.acquire(timeout=30)
    finally:
        engine.shutdown()
    bad = {s.rid: s.finish for s in late[:2]}
    for rid, finish in bad.items():
        assert finish.type == "abort" and finish.message.startswith("engine error"), (rid, finish)
    assert first.finish.type == "length" and len(first.output_ids) == 40
    assert late[2].finish.type == "length" and len(late[2].output_ids) == 10
    # Sampling is per row: the first sequence drew exactly what it draws alone (the batch only changes
    # the arithmetic's shape, so compare ids and log-probs to fp32 noise).
    assert first.output_ids == reference.output_ids
    assert max(abs(a - b) for a, b in zip(first.logprobs, reference.logprobs)) < 1e-4


# ---- B: limits ----------------------------------------------------------------------------------------
def test_b_n_is_capped_without_stalling_health(server):
    t, result = in_thread(post, server, "/generate", {"input_ids": [1], "sampling_params": {"n": 1_000_000,
                                                                                           "max_new_tokens": 1}}, 15.0)
    start = time.monotonic()
    while t.is_alive() and time.monotonic() - start < 1.0:  # /health answers meanwhile
        assert http_json("GET", server + "/health", timeout_s=3)[0] == 200
        time.sleep(0.05)
    status, data = joined(t, result, 15.0)
    assert status == 400 and data["message"].startswith("sampling_params.n:") and "1024" in data["message"], data
    assert time.monotonic() - start < 5.0  # ~10 ms here; it used to hold the event loop ~40 s
    assert http_json("GET", server + "/health", timeout_s=3)[0] == 200
    status, data = post(server, "/generate", {"input_ids": [[1], [2]], "sampling_params": {"n": 600}})
    assert status == 400 and data["message"].startswith("input_ids:") and "--max-request-samples" in data["message"]
    assert http_json("GET", server + "/server_info", timeout_s=10)[1]["max_request_samples"] == 1024


def test_b_prompt_and_budget_are_checked_against_the_context_length(server):
    status, data = post(server, "/generate", {"input_ids": [1] * CONTEXT})
    assert status == 400 and data["message"] == (f"input_ids: The input ({CONTEXT} tokens) is longer than the model's "
                                                 f"context length ({CONTEXT} tokens)."), data
    status, data = post(server, "/generate", {"input_ids": [1] * 500, "sampling_params": {"max_new_tokens": 20}})
    assert status == 400 and data["message"].startswith(
        "sampling_params.max_new_tokens: Requested token count exceeds the model's maximum context length of 512 "
        "tokens. You requested a total of 520 tokens: 500 tokens from the input messages and 20 tokens"), data
    # The default budget (128) and a null one are clipped to the context, as SGLang's scheduler does.
    for params in ({}, {"max_new_tokens": None}):
        status, data = post(server, "/generate", {"input_ids": [1] * 500, "sampling_params": params})
        assert status == 200 and data["meta_info"]["finish_reason"] == {"type": "length", "length": 12}, data
        assert len(data["output_ids"]) == 12
    assert http_json("GET", server + "/server_info", timeout_s=10)[1]["context_length"] == CONTEXT


def test_b_an_oversized_body_is_refused_before_it_is_read(server):
    """A declared 1 GiB body: 413 at once, the server reads none of it (it used to wait for all of it)."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n")
        sock.settimeout(10)  # ~10 ms expected
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed without a response: {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            chunk = sock.recv(4096)
            assert chunk, "connection closed inside the response"
            body += chunk
    assert head.startswith(b"HTTP/1.1 413"), head
    assert "--max-body-bytes" in json.loads(body)["message"]
    assert http_json("GET", server + "/health", timeout_s=5)[0] == 200


# ---- C: weight updates are all-or-nothing -------------------------------------------------------------
def test_c_a_failed_disk_update_leaves_weights_and_version_bitwise(server, model_dir, tmp_path):
    before, version = greedy_output(server), weight_version(server)
    new = perturbed(hf_state(model_dir), seed=7)
    good = tmp_path / "good"
    good.mkdir()
    save_file(new, str(good / "a.safetensors"))
    bad = tmp_path / "bad"  # every tensor valid, then (next file) one of the wrong shape
    bad.mkdir()
    save_file(new, str(bad / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(3)}, str(bad / "b.safetensors"))
    status, data = post(server, "/update_weights_from_disk", {"model_path": str(bad), "weight_version": "v-bad"})
    assert status == 400 and data["success"] is False and "model.norm.weight" in data["message"], data
    assert weight_version(server) == version
    assert greedy_output(server) == before  # bitwise: ids and float log-probs
    # The valid part alone does change the outputs (the check above can fail), and loading the original
    # weights back gives the original outputs bitwise.
    assert post(server, "/update_weights_from_disk", {"model_path": str(good), "weight_version": "v-good"})[0] == 200
    assert weight_version(server) == "v-good" and greedy_output(server) != before
    assert post(server, "/update_weights_from_disk", {"model_path": str(model_dir), "weight_version": version})[0] == 200
    assert greedy_output(server) == before


def test_c_a_failed_distributed_update_leaves_weights_and_version_bitwise(server, model_dir):
    """The sender broadcasts a valid embedding then a wrong-shaped norm: the receiver used to write the
    embedding straight into the model."""
    import torch.distributed as dist

    from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group

    before, version = greedy_output(server), weight_version(server)
    port, name = find_free_port(), "faults_group"
    t, result = in_thread(lambda: init_custom_process_group(backend="gloo", master_address="127.0.0.1",
                                                            master_port=port, world_size=2, rank=0, group_name=name,
                                                            timeout_s=60))
    status, data = post(server, "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                                                               "rank_offset": 1, "world_size": 2, "group_name": name,
                                                               "backend": "gloo"})
    assert status == 200, data
    group = joined(t, result)
    try:
        assert post(server, "/begin_weight_update", {})[0] == 200
        try:
            embed = perturbed(hf_state(model_dir), seed=5)["model.embed_tokens.weight"]
            tensors = [("model.embed_tokens.weight", embed), ("model.norm.weight", torch.zeros(3))]
            body = {"names": [n for n, _ in tensors], "dtypes": ["float32"] * 2,
                    "shapes": [list(v.shape) for _, v in tensors], "group_name": name, "weight_version": "v-bad"}
            t, result = in_thread(post, server, "/update_weights_from_distributed", body)
            for _, value in tensors:
                dist.broadcast(value, group=group, group_src=0)
            status, data = joined(t, result)
            assert status == 400 and "model.norm.weight" in data["message"], data
            # An absurd declared shape is refused before anything is allocated or received.
            huge = {**body, "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[10 ** 12]]}
            status, data = post(server, "/update_weights_from_distributed", huge, timeout_s=10)
            assert status == 400 and "shapes:" in data["message"], data
        finally:
            assert post(server, "/end_weight_update", {})[0] == 200
        assert weight_version(server) == version
        assert greedy_output(server) == before
    finally:
        post(server, "/destroy_weights_update_group", {"group_name": name})
        destroy_custom_process_group(group)


# ---- D: aborted samples say so ------------------------------------------------------------------------
def test_d_an_aborted_sample_is_marked_as_sglang_marks_it(server):
    body = {"input_ids": [2, 7], "rid": "marked", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 200, "n": 2}}
    t, result = in_thread(post, server, "/generate", body)
    wait_running(server, 2)
    assert post(server, "/abort_request", {"rid": "marked_1"})[0] == 200
    status, data = joined(t, result)
    assert status == 200 and len(data) == 2
    kept, aborted = data
    assert kept["meta_info"]["finish_reason"] == {"type": "length", "length": 200}
    # SGLang's FINISH_ABORT.to_json(): type, message, status_code, err_type.
    assert aborted["meta_info"]["finish_reason"] == {"type": "abort", "message": "Abort requested",
                                                     "status_code": None, "err_type": None}
    assert 0 < len(aborted["output_ids"]) < 200
    samples = [parse_generate_item(item, server=server, rid="marked", prompt_ids=[2, 7], expect_logprobs=True, index=i)
               for i, item in enumerate(data)]
    assert [s.aborted for s in samples] == [False, True]  # what the trainer filters on
