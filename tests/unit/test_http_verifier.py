"""The remote verifier (reward.verifier: http) and the reference verifier server.

In-process servers (a thread each) stand for misbehaving verifiers: failing then recovering, refusing,
slow, dead. The reference server runs as a process of its own, as users run it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.rewards import ScoreRequest, get_verifier, score_all
from megatron_vespo.rewards.http import HttpVerifier, HttpVerifierSettings
from rollout_sglang.net import find_free_port, http_json

REPO = Path(__file__).resolve().parents[2]


def req(response_ids=(3, 2, 1), truth=(3, 2, 1)) -> ScoreRequest:
    return ScoreRequest(response_ids=list(response_ids), response_text=None, ground_truth=list(truth), prompt_ids=[1, 2])


def settings(url: str, **kw) -> HttpVerifierSettings:
    base = dict(url=url, timeout_s=1.0, retries=2, backoff_s=0.01, max_concurrency=4, deadline_s=5.0)
    return HttpVerifierSettings(**{**base, **kw})


@contextmanager
def fake_verifier(respond: Callable[[dict, int], tuple[int, dict]]) -> Iterator[dict]:
    """A verifier server in a thread: ``respond(body, call_index) -> (status, payload)``; yields its state."""
    state = {"calls": 0, "in_flight": 0, "max_in_flight": 0, "bodies": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                index = state["calls"]
                state["calls"] += 1
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
                state["bodies"].append(body)
            try:
                status, payload = respond(body, index)
            finally:
                with lock:
                    state["in_flight"] -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # a client that timed out closed the connection: expected here
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/score"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_posts_prompt_response_and_ground_truth_and_reads_the_score(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a loopback verifier is reached without the proxy
    with fake_verifier(lambda body, i: (200, {"score": 0.25 * len(body["response_ids"])})) as srv:
        scores, stats = score_all(HttpVerifier(settings(srv["url"])), [req([1]), req([1, 2, 3])], timeout_s=5)
    assert scores == [0.25, 0.75] and stats.errors == stats.timeouts == 0
    shortest = min(srv["bodies"], key=lambda b: len(b["response_ids"]))
    assert shortest == {"prompt_ids": [1, 2], "response_ids": [1], "response_text": None, "ground_truth": [3, 2, 1]}


def test_5xx_is_retried_with_backoff_until_it_succeeds():
    with fake_verifier(lambda body, i: (503, {"error": "busy"}) if i < 2 else (200, {"score": 1.0})) as srv:
        verifier = HttpVerifier(settings(srv["url"], retries=2, backoff_s=0.1))
        start = time.monotonic()
        scores, stats = score_all(verifier, [req()], timeout_s=5)
    assert scores == [1.0] and stats.errors == 0 and srv["calls"] == 3
    assert time.monotonic() - start >= 0.1 + 0.2  # waited backoff_s, then twice as long


def test_repeated_failures_give_one_line_naming_the_url_and_the_last_error():
    with fake_verifier(lambda body, i: (500, {"error": f"internal\nfailure {i}"})) as srv:
        scores, stats = score_all(HttpVerifier(settings(srv["url"], retries=1)), [req()], timeout_s=5)
    assert scores == [0.0] and stats.errors == 1 and srv["calls"] == 2
    assert "\n" not in stats.first_error
    assert srv["url"] in stats.first_error and "2 attempt(s) failed" in stats.first_error
    assert "last error: HTTP 500" in stats.first_error and "failure 1" in stats.first_error


def test_4xx_is_not_retried_and_a_bad_answer_is_an_error():
    with fake_verifier(lambda body, i: (400, {"error": "no such ground truth"})) as srv:
        _, stats = score_all(HttpVerifier(settings(srv["url"])), [req()], timeout_s=5)
    assert srv["calls"] == 1 and "refused the request (HTTP 400" in stats.first_error
    with fake_verifier(lambda body, i: (200, {"score": "high"})) as srv:
        _, stats = score_all(HttpVerifier(settings(srv["url"])), [req()], timeout_s=5)
    assert stats.errors == 1 and "no finite number 'score'" in stats.first_error


def test_dead_server_fails_fast_after_the_first_response_used_its_retries():
    url = f"http://127.0.0.1:{find_free_port()}/score"  # nothing listens there
    verifier = HttpVerifier(settings(url, retries=3, backoff_s=0.2, max_concurrency=1))
    start = time.monotonic()
    scores, stats = score_all(verifier, [req() for _ in range(5)], timeout_s=5)
    elapsed = time.monotonic() - start
    assert scores == [0.0] * 5 and stats.errors == 5
    assert url in stats.first_error and "ConnectionRefusedError" in stats.first_error
    # The first response retried (0.2 + 0.4 + 0.8 s of backoff), the other four one attempt each.
    assert verifier.requests_sent == 4 + 4
    assert verifier.metrics() == {"reward/remote_requests_total": 8.0, "reward/remote_retries_total": 3.0,
                                  "reward/remote_failed_total": 5.0}
    assert 1.4 <= elapsed < 4.0


def test_concurrency_limit_holds_across_scorers():
    def slow(body, i):
        time.sleep(0.15)
        return 200, {"score": 1.0}

    with fake_verifier(slow) as srv:
        verifier = HttpVerifier(settings(srv["url"], max_concurrency=2))
        # Two batches scored at once (as asynchronous groups are): the limit is the verifier's, not a batch's.
        results = []
        threads = [threading.Thread(target=lambda: results.append(score_all(verifier, [req()] * 4, timeout_s=5)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [s for s, _ in results] == [[1.0] * 4] * 2
    assert srv["max_in_flight"] == 2


def test_attempts_fit_the_reward_timeout_and_report_the_http_timeout():
    def hang(body, i):
        time.sleep(3)
        return 200, {"score": 1.0}

    with fake_verifier(hang) as srv:
        verifier = HttpVerifier(settings(srv["url"], timeout_s=0.3, retries=5, backoff_s=0.05, deadline_s=1.0))
        start = time.monotonic()
        scores, stats = score_all(verifier, [req()], timeout_s=1.0)
        assert time.monotonic() - start < 1.5
    assert scores == [0.0] and stats.errors == 1 and stats.timeouts == 0
    assert "timed out" in stats.first_error and srv["url"] in stats.first_error


def test_config_fields_are_validated_by_name():
    base = REPO / "configs/quickstart.yaml"
    with pytest.raises(ConfigError, match=r"^reward\.http\.url: is required with verifier: http"):
        load_run_config(base, ["reward.verifier=http"])
    with pytest.raises(ConfigError, match=r"^reward\.http\.url: must be an http:// or https:// URL"):
        load_run_config(base, ["reward.verifier=http", "reward.http.url=localhost:8020"])
    with pytest.raises(ConfigError, match=r"^reward\.http\.timeout_s: must be <= reward\.timeout_s=2"):
        load_run_config(base, ["reward.verifier=http", "reward.http.url=http://h/score", "reward.timeout_s=2",
                               "reward.http.timeout_s=3"])
    with pytest.raises(ConfigError, match=r"^reward\.http\.retries: must be >= 0"):
        load_run_config(base, ["reward.http.retries=-1"])
    cfg = load_run_config(base, ["reward.verifier=http", "reward.http.url=http://127.0.0.1:1/score"])
    verifier = get_verifier("http", cfg.reward)
    assert isinstance(verifier, HttpVerifier) and verifier is get_verifier("http", cfg.reward)  # one per process
    assert verifier.settings.deadline_s == cfg.reward.timeout_s


@contextmanager
def reference_server(*extra: str, parent_pid: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    cmd = [sys.executable, "-m", "megatron_vespo.rewards.server", "--port", "0",
           "--parent-pid", str(parent_pid or os.getpid()), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + proc.stdout.read()
        yield proc, line.split()[2]
    finally:
        proc.kill()
        proc.wait()


def test_reference_server_wraps_the_builtin_verifier():
    with reference_server("--verifier", "synthetic") as (_, base):
        cfg = load_run_config(REPO / "configs/quickstart.yaml", ["reward.verifier=http", f"reward.http.url={base}/score"])
        requests = [req([3, 2, 1]), req([3, 2, 9]), req([]), req([1], truth=[])]
        scores, stats = score_all(get_verifier("http", cfg.reward), requests, timeout_s=5)
        local, _ = score_all(get_verifier("synthetic"), requests[:3], timeout_s=5)
        assert scores[:3] == local and stats.errors == 1  # an empty ground truth: the wrapped verifier raises
        assert "refused the request (HTTP 422" in stats.first_error and "non-empty list" in stats.first_error
        assert http_json("POST", f"{base}/score", {"response_ids": "x"})[0] == 400
        status, counts = http_json("GET", f"{base}/stats")
        assert status == 200 and counts == {"scored": 3, "verifier_error": 1, "bad_request": 1}


def test_reference_server_dies_with_its_parent():
    # A parent process that starts the server, reports its pid, then waits to be killed.
    parent_code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'megatron_vespo.rewards.server', '--port', '0',\n"
        "                      '--parent-pid', str(__import__('os').getpid())], stdout=subprocess.PIPE, text=True)\n"
        "print(p.pid, p.stdout.readline().split()[2], flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        pid_text, base = parent.stdout.readline().split()
        server_pid = int(pid_text)
        assert http_json("GET", f"{base}/health")[0] == 200
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:  # a zombie is dead too (its reaper may be slow)
                if psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        else:
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail("the verifier server outlived its parent")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
