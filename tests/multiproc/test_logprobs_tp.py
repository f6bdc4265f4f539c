"""TP=2 vocab-parallel log-probs over gloo equal the single-process reference (values and gradients)."""
from __future__ import annotations

from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("worker_logprobs_tp.py")
CASES = ("even-shards", "temperature-one-chunk", "padded-vocab", "rank-without-vocab", "bf16", "bad-label")


def test_tp2_logprobs_match_single_process_reference():
    output = run_torchrun(WORKER, nproc=2, timeout=180)
    for rank in (0, 1):
        for case in CASES:
            assert f"rank {rank}: case {case} OK" in output, output[-6000:]
