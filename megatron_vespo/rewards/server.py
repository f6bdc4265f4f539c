"""Reference remote verifier: ``python -m megatron_vespo.rewards.server --verifier synthetic [--port P]``.

A small HTTP server (standard library, one thread per connection) that answers the requests of the
``http`` verifier (``rewards/http.py``) with a built-in verifier (``synthetic``, ``math``):

- ``POST /score`` with ``{"prompt_ids", "response_ids", "response_text", "ground_truth"}`` ->
  ``{"score": float}``; 400 for a body that is not such an object, 413 for one over ``--max-body-bytes``,
  422 when the verifier raises or returns a non-finite value, 504 past ``--timeout-s``;
- ``GET /health`` -> ``{"ok": true}``; ``GET /stats`` -> counts of requests answered, by outcome.

It binds the loopback interface unless ``--host`` says otherwise (it has no authentication). It
prints one line ``listening on http://HOST:PORT`` once it accepts connections (``--port 0``: the OS
picks a free port and the line says which). With ``--parent-pid PID`` it dies with that process:
Linux's parent-death signal, plus a watchdog that exits once the parent is gone (which also covers
a parent that died before the signal was armed).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from megatron_vespo.rewards.registry import ScoreRequest, Verifier, get_verifier, score_all

PR_SET_PDEATHSIG = 1


class VerifierServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung verifier call must not keep the process alive at exit
    # socketserver's default backlog of 5 refuses connections when a trainer sends its max_concurrency
    # requests at once (seen as retried connection errors); the kernel caps it at somaxconn anyway.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], verifier: Verifier, timeout_s: float, max_body_bytes: int):
        super().__init__(address, _Handler)
        self.verifier = verifier
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.counts: Counter = Counter()
        self.counts_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout) closed the connection before the answer: counted, no traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            self.count("client_gone")
            return
        super().handle_error(request, client_address)

    def count(self, outcome: str) -> None:
        with self.counts_lock:
            self.counts[outcome] += 1


def parse_request(body: Any) -> ScoreRequest:
    """A :class:`ScoreRequest` from a decoded body; ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    ids = {}
    for key in ("prompt_ids", "response_ids"):
        value = body.get(key)
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError(f"{key!r} must be a list of integers")
        ids[key] = value
    text = body.get("response_text")
    if text is not None and not isinstance(text, str):
        raise ValueError("'response_text' must be a string or null")
    if "ground_truth" not in body:
        raise ValueError("'ground_truth' is missing")
    return ScoreRequest(response_ids=ids["response_ids"], response_text=text, ground_truth=body["ground_truth"],
                        prompt_ids=ids["prompt_ids"])


class _Handler(BaseHTTPRequestHandler):
    server: VerifierServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- one line per request is noise
        pass

    def _answer(self, status: int, payload: dict, outcome: str) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.count(outcome)

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if self.path == "/health":
            self._answer(200, {"ok": True}, "health")
        elif self.path == "/stats":
            with self.server.counts_lock:
                counts = dict(self.server.counts)
            self._answer(200, counts, "stats")
        else:
            self._answer(404, {"error": f"no route {self.path}"}, "not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._answer(404, {"error": f"no route {self.path}"}, "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, {"error": "Content-Length required"}, "bad_request")
            return
        if length > self.server.max_body_bytes:
            self.close_connection = True  # the body is not read
            self._answer(413, {"error": f"body of {length} bytes exceeds {self.server.max_body_bytes}"}, "bad_request")
            return
        try:
            request = parse_request(json.loads(self.rfile.read(length)))
        except ValueError as exc:
            self._answer(400, {"error": str(exc)}, "bad_request")
            return
        # score_all bounds the call and turns exceptions / non-finite values into counted errors.
        scores, stats = score_all(self.server.verifier, [request], self.server.timeout_s, max_workers=1)
        if stats.timeouts:
            self._answer(504, {"error": f"verifier took longer than {self.server.timeout_s:g} s"}, "timeout")
        elif stats.errors:
            self._answer(422, {"error": stats.first_error}, "verifier_error")
        else:
            self._answer(200, {"score": scores[0]}, "scored")


def die_with_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` is gone: the parent-death signal (Linux) and a watchdog thread."""
    direct = os.getppid() == parent_pid
    if direct and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while True:
            if direct and os.getppid() != parent_pid:  # re-parented: the parent died (its pid may be a zombie)
                os._exit(0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # exists, owned by someone else
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_vespo.rewards.server", description=__doc__.split("\n")[0])
    parser.add_argument("--verifier", default="synthetic", help="built-in verifier to serve (synthetic, math)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8020, help="0: any free port (printed)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="bound on one verifier call")
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.verifier == "http":
        parser.error("--verifier: 'http' would call itself; serve a built-in verifier")
    try:
        verifier = get_verifier(args.verifier)
    except KeyError as exc:
        parser.error(f"--verifier: {exc.args[0].split(': ', 1)[-1]}")
    server = VerifierServer((args.host, args.port), verifier, args.timeout_s, args.max_body_bytes)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port} (verifier {args.verifier}; POST /score)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
