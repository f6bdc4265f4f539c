"""Routing flip rate in the real train step: the trainer's own routing (recorded forward-only) as
the rollout experts gives exactly 0 flips, three edited sets exactly 3 and a reordered set none,
in one process and under TP=2+SP (token slices), PP=2 (global layer numbers), PP=2 with 2 virtual
stages (routers found per model chunk) and EP=2 with DP=2 (per-rank sequences), all from the same weights.

Routing replay in the same launches (``worker_routing_flip.replay_phases``): with r3 the trainer's
top-k sets equal random engine experts at every (prompt or response position, MoE layer) in the
log-prob pass and the update (flip rate exactly 0; the same rows flip without replay), and the
replayed log-probs equal the one-process ones; with r2 the update routes exactly as the π_old pass
recorded after the routers were perturbed (which changes a free forward's routing)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc
WORKER = Path(__file__).with_name("worker_routing_flip.py")


# Each launch: ~25-40 s with two CPU-bound processes beside it, 53-79 s measured at load 22 on 2 cores.
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("routing")
    ref, out = tmp / "routed.json", tmp / "single.json"
    run_torchrun(WORKER, ["--out", str(out), "--reference", str(ref), "--make-reference"], nproc=1, timeout=240)
    return ref, json.loads(out.read_text())


def check(report: dict) -> None:
    compared = report["response_tokens"] * report["layers"]
    assert report["baseline"] == {"mismatch/routing_flipped_pairs": 0.0, "mismatch/routing_compared_pairs": compared,
                                  "mismatch/routing_flip_rate": 0.0}
    assert report["edited"]["mismatch/routing_flipped_pairs"] == 3.0
    assert report["edited"]["mismatch/routing_compared_pairs"] == compared
    assert report["edited"]["mismatch/routing_flip_rate"] == pytest.approx(3 / compared)


def check_replay(report: dict, single: dict) -> None:
    layers = report["layers"]
    response_pairs = report["response_tokens"] * layers
    all_pairs = (report["response_tokens"] + report["prompt_rows"]) * layers
    # Without replay the random rows mostly disagree with the router (4 of 28 sets agree by chance).
    assert report["r3_control"]["compared"] == all_pairs
    assert report["r3_control"]["flipped"] > 0.5 * all_pairs
    # r3: every replayed (position, layer) pair routed as the engine said, in both passes.
    assert report["r3_logprob_pass"]["flipped"] == 0.0
    assert report["r3_logprob_pass"]["compared"] == all_pairs
    assert report["r3_update"] == {"mismatch/routing_flipped_pairs": 0.0,
                                   "mismatch/routing_compared_pairs": response_pairs,
                                   "mismatch/routing_flip_rate": 0.0}
    for mine, ref in zip(report["r3_logprob_pass"]["logp"], single["r3_logprob_pass"]["logp"]):
        assert mine == pytest.approx(ref, abs=1e-5)
    # r2: perturbed routers route differently on their own, exactly as recorded under replay.
    calls, differing = report["r2_control"]
    assert calls > 0 and differing > 0
    calls, differing = report["r2_update"]
    assert calls > 0 and differing == 0


def test_single_process_counts_exactly(reference):
    check(reference[1])
    check_replay(reference[1], reference[1])


@pytest.mark.parametrize("layout", [
    ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.sequence_parallel=true"],  # SP token slices
    ["parallel.pipeline=2"],  # global layer numbers (PP offset)
    ["parallel.expert=2"],  # EP=2, DP=2: each rank its own sequences
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],  # one layer per chunk, interleaved schedule
], ids=["tp2_sp", "pp2", "ep2_dp2", "pp2_vpp2"])
def test_layouts_reduce_to_the_same_counts(reference, layout, tmp_path):
    out = tmp_path / "report.json"
    run_torchrun(WORKER, ["--out", str(out), "--reference", str(reference[0]), *layout], nproc=2, timeout=240)
    report = json.loads(out.read_text())
    check(report)
    check_replay(report, reference[1])
