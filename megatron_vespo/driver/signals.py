"""SIGTERM ends a run the way an error does: its cleanup runs.

Python's default for SIGTERM kills the process at once, skipping every ``finally``: the background
generator, the metrics sinks and the fleet were never stopped (the fleet's processes still die with
the trainer, through their parent-death signal, but without a clean stop). Schedulers (Slurm,
Kubernetes) and torchrun stop a job with SIGTERM, so it raises :class:`Terminated` in the main
thread instead, and the run shuts down as after any failure, with exit status 128 + 15.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        print("[shutdown] SIGTERM: stopping the run", flush=True)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
