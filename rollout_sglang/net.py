"""Local networking helpers for the launcher side: free ports and a small blocking JSON HTTP call."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any, Optional

from rollout_sglang.engine_api import HEALTH


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, body: Optional[dict] = None, timeout_s: float = 10.0) -> tuple[int, Any]:
    """Blocking request; returns (status, parsed JSON or raw text). Raises OSError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, raw


def is_healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when the server's health route answers 200."""
    try:
        return http_json(HEALTH.method, base_url.rstrip("/") + HEALTH.path, timeout_s=timeout_s)[0] == 200
    except OSError:
        return False
