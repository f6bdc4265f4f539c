"""``python -m rollout_sglang.die_with_parent PARENT_PID CMD ...``: run CMD so that it dies with its parent.

It sets Linux's parent-death signal (``PR_SET_PDEATHSIG``: SIGKILL when the thread that forked it
exits, e.g. because its process was killed), checks that the parent is still there, and execs CMD
(the setting survives ``execve``). Done in a process of its own rather than in a ``preexec_fn``:
between fork and exec in a multi-threaded parent (the trainer) only async-signal-safe calls are
safe, and loading libc through ctypes there crashed restarted servers (SIGSEGV).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
