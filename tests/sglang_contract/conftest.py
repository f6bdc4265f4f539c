"""The contract suite's SGLang side: one long-lived process running SGLang's own code from the overlay
(``scripts/sglang_overlay.sh``), asked questions by the tests (see ``sglang_side.py``)."""
from __future__ import annotations

import base64
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from rollout_sglang.engine_api import TESTED_SGLANG

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / f".sglang-{TESTED_SGLANG}"
STARTUP_TIMEOUT_S = 300  # importing SGLang takes ~20 s on 2 cores; 3x headroom and more under load
ANSWER_TIMEOUT_S = 120


class SGLangSide:
    """Sends one JSON question, reads one JSON answer; raises when SGLang's side raised."""

    def __init__(self, proc: subprocess.Popen, version: str):
        self.proc = proc
        self.version = version
        self._lock = threading.Lock()

    def ask(self, op: str, **question) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **question}) + "\n")
            self.proc.stdin.flush()
            line = _read_line(self.proc, ANSWER_TIMEOUT_S)
        answer = json.loads(line)
        if "exception" in answer:
            raise AssertionError(f"SGLang's side raised {answer['exception']}\n{answer['traceback']}")
        return answer


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box or not box[0]:
        raise AssertionError(f"SGLang's side gave no answer within {timeout_s:.0f}s (exit code {proc.poll()})")
    return box[0]


@pytest.fixture(scope="session")
def sglang(tmp_path_factory):
    if not (OVERLAY / ".installed").is_file():
        pytest.skip(f"SGLang {TESTED_SGLANG}'s code is not installed in {OVERLAY.name}: `bash scripts/sglang_overlay.sh` "
                    f"could not install it (no network to PyPI?); see {OVERLAY.name}.log")
    log = tmp_path_factory.mktemp("sglang_side") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OVERLAY), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SGLANG_SIDE_AUTHKEY": multiprocessing.current_process().authkey.hex()}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sglang_side.py"))], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
    try:
        try:
            ready = json.loads(_read_line(proc, STARTUP_TIMEOUT_S))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its stderr:\n{log.read_text()[-3000:]}") from None
        assert ready["version"] == TESTED_SGLANG, ready
        yield SGLangSide(proc, ready["version"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tensor_in(spec: dict) -> torch.Tensor:
    """A tensor the SGLang side sent back (raw bytes, dtype, shape)."""
    dtype = getattr(torch, spec["dtype"])
    raw = bytearray(base64.b64decode(spec["b64"]))
    if not raw:
        return torch.empty(spec["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(spec["shape"])
