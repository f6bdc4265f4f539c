"""What the ranks of a checkpoint save or load agree on, under torchrun with 2 processes (one launch,
``worker_checkpoint_ranks.py``): a write that fails on one rank raises on every rank instead of
leaving the others waiting at the next collective (``on_every_rank`` in ``checkpoint/training.py``),
and file hashes spread over the ranks give every rank the same verdict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_ranks")
    run_torchrun(Path(__file__).with_name("worker_checkpoint_ranks.py"), ["--out", out], nproc=2, timeout=180)
    return out, [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]


def test_a_write_failing_on_one_rank_fails_on_every_rank(reports):
    out, both = reports
    parts = [r["failing_write"] for r in both]
    assert [r["ok_result"] for r in parts] == [0, 10]
    for r in parts:
        assert r["after_barrier"]
        assert r["error"].startswith(f"writing the RNG states to {out} failed on 1 rank(s): rank 1: "), r["error"]
        assert str(out / "missing") in r["error"]  # torch.save's own message: which directory
    assert parts[0]["error"] == parts[1]["error"]
    assert (out / "rank_00000.pt").exists()


def test_file_hashes_are_spread_over_the_ranks_and_every_rank_agrees_on_a_mismatch(reports):
    _, both = reports
    parts = [r["hashes"] for r in both]
    assert all(r["files_match"] for r in parts)
    assert parts[0]["error"] == parts[1]["error"] is not None  # rank 0 did not hash that file, yet it knows
    assert parts[0]["error"].startswith(f"{parts[0]['bad']}: sha256 ")
