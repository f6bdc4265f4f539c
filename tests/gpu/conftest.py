"""GPU-only tests: real SGLang engines (``test_sglang_*``) and the trainer's GPU-only options. Everything here
skips, with the reason, where CUDA (or SGLang, or Transformer Engine, as each test needs) is absent.

SGLang may live in another Python environment than the trainer (docs/dependencies.md: it pins its own
torch). Point ``VESPO_SGLANG_PYTHON`` at that interpreter; otherwise the current one must import it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@functools.lru_cache(maxsize=None)
def sglang_python() -> str:
    return os.environ.get("VESPO_SGLANG_PYTHON", "") or sys.executable


@functools.lru_cache(maxsize=None)
def sglang_skip_reason() -> str:
    """Why real-SGLang tests cannot run here ('' when they can)."""
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA device: SGLang engines (and NCCL / CUDA-IPC weight sync) need a GPU"
    python = sglang_python()
    if python == sys.executable:
        if importlib.util.find_spec("sglang") is None:
            return ("sglang is not importable by this interpreter (it is the GPU extra); install it or set "
                    "VESPO_SGLANG_PYTHON to a Python that has it")
        return ""
    probe = subprocess.run([python, "-c", "import sglang, sglang.launch_server"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"VESPO_SGLANG_PYTHON={python} cannot import sglang: {probe.stderr.strip()[-300:]}"
    return ""


def pytest_collection_modifyitems(config, items):
    """Tests that start SGLang (the ``test_sglang_*`` modules) skip where SGLang cannot run; the others
    here need only CUDA (and say what else) themselves."""
    reason = sglang_skip_reason()
    if not reason:
        return
    here = os.path.dirname(__file__)
    for item in items:
        path = str(item.fspath)
        if path.startswith(here) and os.path.basename(path).startswith("test_sglang"):
            item.add_marker(pytest.mark.skip(reason=reason))
