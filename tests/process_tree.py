"""A command started for a test together with every process it starts, so none outlives the test.

The fleet's servers and router run in sessions of their own (a signal to the trainer's group does
not reach them), so a process-group kill is not enough: the tree is read while the command runs and
every process seen in it is killed at the end, whatever happened.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import psutil


class ProcessTree:
    """``cmd`` in a new session, logging to ``log``; use as a context manager (kills the tree on exit)."""

    def __init__(self, cmd: list[str], log: Path, cwd: Optional[Path] = None, env: Optional[dict] = None):
        self.log = log
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def __enter__(self) -> "ProcessTree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def poll(self) -> Optional[int]:
        """The exit status (None while running); records the processes in the tree."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return self.proc.poll()

    def descendants(self, match: str = "") -> list[psutil.Process]:
        """Running descendants whose command line contains ``match``."""
        self.poll()
        found = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and match in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        return found

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``condition`` until true; fails (with the log's tail) on timeout or if the command exits."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.poll() is None, f"exited ({self.proc.returncode}) while waiting for {what}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{self.tail()}"
            time.sleep(0.1)

    def wait(self, timeout_s: float) -> int:
        """The exit status; on timeout the tree is killed and the test fails."""
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"did not finish in {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        self.poll()
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the command's group and every process seen in its tree."""
        self.poll()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
