"""No NaN reaches the weights; bad sequences are counted; the LR schedule follows the config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("guards") / "report.json"
    run_torchrun(Path(__file__).with_name("worker_train_guards.py"), ["--out", out], nproc=1, timeout=180)
    return json.loads(out.read_text())


def test_nan_behaviour_logprob_is_counted_and_contained(report):
    r = report["nan_mu"]
    assert r["bad_seqs"] == 1 and r["valid_seqs"] == 23  # 24 responses, one screened out
    assert not r["skipped"] and r["loss_finite"] and r["weights_finite"]
    assert r["weights_changed"] == r["num_weights"]


def test_nan_gradient_skips_the_step_and_leaves_weights_untouched(report):
    assert report["nan_grad"] == {"skipped": True, "flag": 1.0, "weights_changed": 0}


def test_warmup_then_cosine_schedule(report):
    # warmup 2 steps to 1e-3, cosine to 1e-4 at step 6; the skipped step does not advance it.
    # report["lr"] holds the lr each successful update used (update k uses the lr of step k).
    lr_max, lr_min, warmup, decay = 1e-3, 1e-4, 2, 6

    def expected(step: int) -> float:
        if step <= warmup:
            return lr_max * step / warmup
        frac = min(1.0, (step - warmup) / (decay - warmup))
        return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * frac))

    steps = [1, 2, 3, 4, 5, 6]
    assert report["lr"] == pytest.approx([expected(s) for s in steps], rel=1e-6)


def test_entropy_diagnostic_is_reported(report):
    assert 0.5 < report["entropy"] < math.log(128) + 1e-3
