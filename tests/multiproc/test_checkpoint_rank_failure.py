"""A checkpoint write that fails on one rank raises on every rank instead of leaving the others
waiting at the next collective (see ``on_every_rank`` in ``checkpoint/training.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc


def test_a_write_failing_on_one_rank_fails_on_every_rank(tmp_path):
    run_torchrun(Path(__file__).with_name("worker_rank_failure.py"), ["--out", tmp_path], nproc=2, timeout=90)
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert [r["ok_result"] for r in reports] == [0, 10]
    for r in reports:
        assert r["after_barrier"]
        assert r["error"].startswith(f"writing the RNG states to {tmp_path} failed on 1 rank(s): rank 1: "), r["error"]
        assert str(tmp_path / "missing") in r["error"]  # torch.save's own message: which directory
    assert reports[0]["error"] == reports[1]["error"]
    assert (tmp_path / "rank_00000.pt").exists()
