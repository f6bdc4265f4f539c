"""Trainer offload (colocated runs): moving the trainer's state out of device memory and back between every
phase changes nothing, bitwise, under two ranks (distributed optimizer over DP=2 in bf16; EP=2 in fp32), and
what is offloaded really holds no device memory (see ``worker_offload.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module", params=["dp2_distopt_bf16", "ep2_fp32"])
def reports(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("offload") / "report"
    run_torchrun(Path(__file__).with_name("worker_offload.py"), ["--out", out, "--layout", request.param], nproc=2,
                 timeout=240)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def test_offloading_between_every_phase_trains_bitwise_the_same(reports):
    for report in reports:
        for step in report["metrics_equal"]:
            assert step and all(step.values()), step  # losses, grad norms, W/φ, ... equal, not close
        assert report["weights_changed"] and report["weights_equal"]
        assert report["optimizer_tensors"] > 0 and report["optimizer_equal"]
        assert all(report["export_equal"])  # the publication between the two offloads reads the same weights


def test_what_is_offloaded_holds_no_device_memory(reports):
    for report in reports:
        for left in report["left_after_offload"]:
            assert left == {"params": 0, "grads": 0, "optimizer": 0}, left
        for left in report["left_after_training_offload"]:
            assert left["params"] > 0 and left["grads"] == 0 and left["optimizer"] == 0, left
        assert report["device_bytes"]["grads"] == report["device_bytes"]["optimizer"] == 0
        assert report["device_bytes"]["params"] > 0
        # Parameters (and the first time, fp32 main params) moved each cycle; the same buffers every time.
        assert all(b > 0 for b in report["offloaded_bytes"])
