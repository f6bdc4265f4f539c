"""``megatron-vespo`` that SIGKILLs itself in the middle of the save of one training checkpoint.

Usage, from the repository root: ``python -m tests.e2e.kill_during_save <k> train <run.yaml> [a.b=value ...]``
(``-m``, like ``python -m megatron_vespo.cli``, puts the working directory on ``sys.path``).

The CLI runs unchanged, except that :func:`megatron_vespo.checkpoint.training.write_manifest` is
wrapped: when rank 0 is about to write the manifest of ``step_<k>`` (model, optimizer, RNG and
state files already in the temporary directory; no manifest, no rename, ``latest`` not moved),
the process kills itself with SIGKILL, as a crashed node would. Used by ``test_resume.py``.
"""
from __future__ import annotations

import os
import signal
import sys


def install(kill_at_step: int) -> None:
    from megatron_vespo.checkpoint import training

    write_manifest = training.write_manifest

    def write_manifest_or_die(directory, info, *args, **kwargs):
        if info.get("step") == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return write_manifest(directory, info, *args, **kwargs)

    training.write_manifest = write_manifest_or_die


def main(argv: list[str]) -> int:
    step, *cli_args = argv
    install(int(step))
    from megatron_vespo.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
