"""Run a grid of ``megatron-vespo train`` subprocesses, ``jobs`` at a time, each with an optional timeout.

Run ``NAME`` is ``python -m megatron_vespo.cli train RUN_YAML OVERRIDES... run.output_dir=OUT/NAME``
(the same interpreter as this process), its stdout and stderr in ``OUT/NAME.log``. Every child starts
in its own session with Linux's parent-death signal (:func:`rollout_sglang.launch.popen_owned`): Ctrl-C
reaches only this process, which then stops the runs it started, and if this process is killed outright
the kernel kills them (each run's rollout fleet dies with its run the same way). The signal is tied to
the thread that started the child, so call :func:`run_grid` from a thread that lives as long as the
process (the main thread).

A run that fails (non-zero exit status, or killed at its timeout) is reported with the tail of its
log and the grid goes on; the caller decides what a failure means for the whole grid.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from megatron_vespo.logging_utils import METRICS_FILE
from rollout_sglang.launch import open_server_log, popen_owned, read_log_tail

LOG_TAIL_CHARS = 3000


@dataclass(frozen=True)
class GridRun:
    """One training run of a grid: a file-safe ``name`` (its output directory and log) and its overrides."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass
class RunOutcome:
    name: str
    output_dir: Path
    log: Path
    returncode: Optional[int]  # None: stopped at its timeout
    wall_s: float
    error: str = ""  # why it failed, "" if it did not
    log_tail: str = ""  # the end of its log when it failed

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE


def train_command(run_yaml: str | Path, overrides: Sequence[str]) -> list[str]:
    """``megatron-vespo train`` through this interpreter (no reliance on the entry point being on PATH)."""
    return [sys.executable, "-m", "megatron_vespo.cli", "train", str(run_yaml), *overrides]


def start_train(run_yaml: str | Path, overrides: Sequence[str], log: Path,
                env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Start one training run logging to ``log`` (appended, after a header naming the command); it dies
    with this process. ``env`` is added to this process's environment."""
    cmd = train_command(run_yaml, overrides)
    handle = open_server_log(log, cmd)
    try:
        return popen_owned(cmd, handle, {**os.environ, **(env or {})}, die_with_parent=True)
    finally:
        handle.close()


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every run at once (each stops its fleet), SIGKILL those still there after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_grid(run_yaml: str | Path, runs: Sequence[GridRun], out: Path, *, jobs: int = 1,
             timeout_s: Optional[float] = None, env: Optional[Mapping[str, str]] = None, tag: str = "grid",
             report: Callable[[str], None] = lambda line: print(line, flush=True),
             poll_s: float = 0.5) -> list[RunOutcome]:
    """Every run of ``runs`` (in order, ``jobs`` at a time), each stopped after ``timeout_s`` seconds if
    given; one progress line per start and finish through ``report``. Returns the outcomes in the order
    of ``runs``; the runs still going when this returns early (an exception, Ctrl-C) are stopped."""
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1; got {jobs}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"grid run names must be unique; got {names}")
    out.mkdir(parents=True, exist_ok=True)
    pending = list(runs)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    outcomes: dict[str, RunOutcome] = {}
    total = len(runs)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                overrides = [*run.overrides, f"run.output_dir={out / run.name}"]
                running[run.name] = (start_train(run_yaml, overrides, out / f"{run.name}.log", env), time.monotonic())
                report(f"[{tag}] started {run.name} ({total - len(pending)}/{total}; {len(running)} running)")
            for name, (proc, t0) in list(running.items()):
                code, timed_out = proc.poll(), False
                if code is None:
                    if timeout_s is None or time.monotonic() - t0 <= timeout_s:
                        continue
                    _stop_all([proc])
                    code, timed_out = None, True
                del running[name]
                error = f"stopped at its timeout of {timeout_s:g} s" if timed_out else \
                    f"exit status {code}" if code else ""
                outcome = RunOutcome(name, out / name, out / f"{name}.log", code, time.monotonic() - t0, error)
                outcomes[name] = outcome
                failed = sum(not o.ok for o in outcomes.values())
                counts = f"{len(outcomes)}/{total} finished, {failed} failed"
                if outcome.ok:
                    report(f"[{tag}] finished {name} in {outcome.wall_s:.0f} s ({counts})")
                else:
                    outcome.log_tail = read_log_tail(outcome.log, LOG_TAIL_CHARS)
                    report(f"[{tag}] FAILED {name} after {outcome.wall_s:.0f} s: {error} ({counts}); "
                           f"the end of {outcome.log}:\n{_indented(outcome.log_tail)}")
            if running:
                time.sleep(poll_s)
    finally:  # never leave a run behind
        _stop_all([proc for proc, _ in running.values()])
    return [outcomes[name] for name in names]
