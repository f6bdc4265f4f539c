"""A training checkpoint saved in one parallel layout loads into another.

Saved by two ranks, loaded by one process that started from other random weights:

- expert parallelism (EP=2: the experts are split across ranks and Megatron chains a dense and an
  expert optimizer) -> EP=1 (a single optimizer), plain optimizer;
- tensor parallelism with sequence parallelism and EP=2 (attention/MLP shards and experts split) -> one process;
- pipeline parallelism (PP=2: each rank holds half of the layers and their optimizer state) -> one process;
- data parallelism with the distributed optimizer (DP=2: each rank holds half of Adam's state)
  -> DP=1 with the distributed optimizer.
 After the load the full weights equal the saved ones exactly;
the next VESPO step — which depends on Adam's moments and step count and on the LR schedule's
position (warmup) from the checkpoint — gives the same loss, gradient norm, learning rate and
updated weights as the step the saving run took, up to the rounding of a different reduction order.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("worker_checkpoint_reshard.py")


CASES = {
    "ep2_to_one_process": (["--ep", "2"], []),
    "tp2_sp_ep2_to_one_process": (["--tp", "2", "--sp", "--ep", "2"], []),
    "pp2_to_one_process": (["--pp", "2"], []),
    "dp2_distributed_optimizer_to_one_process": (["--distributed-optimizer"], ["--distributed-optimizer"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_of_two_ranks_loads_into_one_process_and_continues(tmp_path, case):
    save_args, load_args = CASES[case]
    ckpt, samples = tmp_path / "ckpt", tmp_path / "samples.pt"
    saved, loaded = tmp_path / "saved.pt", tmp_path / "loaded.pt"
    run_torchrun(WORKER, ["--phase", "save", *save_args, "--ckpt", ckpt, "--samples", samples, "--out", saved],
                 nproc=2, timeout=150)
    assert (ckpt / "latest").read_text().strip() == "step_1"
    run_torchrun(WORKER, ["--phase", "load", *load_args, "--ckpt", ckpt / "step_1", "--samples", samples,
                          "--out", loaded], nproc=1, timeout=150)
    a, b = torch.load(saved, weights_only=True), torch.load(loaded, weights_only=True)

    assert b["driver_state"] == {"note": "after one step"}
    assert b["rng_restored"] is False  # another layout: re-seeded, not restored
    at_save, at_load = a["weights_at_checkpoint"], b["weights_at_checkpoint"]
    assert sorted(at_save) == sorted(at_load)
    assert [k for k in at_save if not torch.equal(at_save[k], at_load[k])] == []

    assert b["lr"] == a["lr"] == pytest.approx(2e-4)  # update 2 of a 3-step warmup to 3e-4
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    moved = max((a["weights_after"][k] - at_save[k]).abs().max().item() for k in at_save)
    diff = max((a["weights_after"][k] - b["weights_after"][k]).abs().max().item() for k in at_save)
    # The update moved weights by ~lr; without Adam's moments (or with the wrong step count or lr)
    # the difference would be of that order too.
    assert moved > 1e-4 and diff < 1e-7, (moved, diff)
