"""Launch a script under ``torchrun`` (``python -m torch.distributed.run``) for multi-process tests.

Each call picks a free port, runs N local processes with one thread each, enforces a timeout,
and on failure raises with the tail of the combined log so the failing rank's traceback shows in
the pytest report.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


class TorchrunError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    nproc: int = 2,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    tail_lines: int = 60,
) -> str:
    """Run ``script args`` on ``nproc`` local ranks; return the combined output.

    Raises :class:`TorchrunError` (with the last ``tail_lines`` lines of output) when any rank
    fails or the run exceeds ``timeout`` seconds.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{full_env.get('PYTHONPATH', '')}"})
    full_env.update(env or {})
    # A new session so that a timeout can end torchrun *and* its worker processes together.
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise TorchrunError(f"torchrun timed out after {timeout:.0f}s: {' '.join(cmd)}\n{_tail(out, tail_lines)}") from None
    if proc.returncode != 0:
        raise TorchrunError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n{_tail(out, tail_lines)}")
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant: torchrun starts each worker in a session of
    its own (and the fleet's servers have theirs), so a group kill leaves them running, holding the output
    pipe open."""
    import psutil

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _tail(text: str, n: int) -> str:
    lines = [ln for ln in text.splitlines() if "warnings.warn(" not in ln]
    return "\n".join(lines[-n:])
