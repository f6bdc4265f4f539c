"""Routing flip rate in the real train step: the trainer's own routing (recorded forward-only) as
the rollout experts gives exactly 0 flips, three edited sets exactly 3 and a reordered set none,
in one process and under TP=2+SP (token slices), PP=2 (global layer numbers) and EP=2 with DP=2
(per-rank sequences), all from the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc
WORKER = Path(__file__).with_name("worker_routing_flip.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("routing")
    ref, out = tmp / "routed.json", tmp / "single.json"
    run_torchrun(WORKER, ["--out", str(out), "--reference", str(ref), "--make-reference"], nproc=1, timeout=180)
    return ref, json.loads(out.read_text())


def check(report: dict) -> None:
    compared = report["response_tokens"] * report["layers"]
    assert report["baseline"] == {"mismatch/routing_flipped_pairs": 0.0, "mismatch/routing_compared_pairs": compared,
                                  "mismatch/routing_flip_rate": 0.0}
    assert report["edited"]["mismatch/routing_flipped_pairs"] == 3.0
    assert report["edited"]["mismatch/routing_compared_pairs"] == compared
    assert report["edited"]["mismatch/routing_flip_rate"] == pytest.approx(3 / compared)


def test_single_process_counts_exactly(reference):
    check(reference[1])


@pytest.mark.parametrize("layout", [
    ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.sequence_parallel=true"],  # SP token slices
    ["parallel.pipeline=2"],  # global layer numbers (PP offset)
    ["parallel.expert=2"],  # EP=2, DP=2: each rank its own sequences
], ids=["tp2_sp", "pp2", "ep2_dp2"])
def test_layouts_reduce_to_the_same_counts(reference, layout, tmp_path):
    out = tmp_path / "report.json"
    run_torchrun(WORKER, ["--out", str(out), "--reference", str(reference[0]), *layout], nproc=2, timeout=180)
    check(json.loads(out.read_text()))
