"""End to end on CPU: the multi-turn calculator example (examples/calculator_tool.py) through the real stack.

``megatron-vespo train`` with ``rollout.function: examples.calculator_tool:rollout``: the CPU rollout
server behind sglang-router is called once per turn, the calculator's tokens are appended with loss mask
0, the saved batches (rollout.dump_dir) are what was trained, and training stays finite. That the example
learns is measured by its command (README, "Custom and multi-turn rollouts"), not here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from examples.calculator_tool import write_prompts

    out = tmp_path_factory.mktemp("calculator")
    write_prompts(out / "prompts.jsonl")
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "examples/calculator_tool.yaml"),
           f"data.path={out / 'prompts.jsonl'}", f"run.output_dir={out / 'run'}", f"rollout.dump_dir={out / 'dump'}",
           "run.rollout_steps=2", "train.staleness=1", "train.mini_batch_prompts=4", "rollout.n_samples=8",
           "run.plot=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_tool_spans_are_trained_with_mask_zero_and_the_server_is_called_per_turn(short_run):
    from examples.calculator_tool import CALL, RESULT, calculator
    from megatron_vespo.config import load_run_config
    from megatron_vespo.data.rollout_dump import BatchContext, read_batch

    records = read_metrics(short_run / "run" / "metrics.jsonl")
    assert len(records) == 2
    for r in records:
        # Every sample is one request at least; those that called the calculator were two or more.
        assert r["rollout/generations_per_response"] > 1.0 and r["rollout/env_token_fraction"] > 0
        assert r["train/skipped_nonfinite_step"] == 0 and r["loss/bad_seqs"] == 0
        assert all(abs(r[k]) < 1e6 for k in ("loss/policy_loss", "train/grad_norm", "vespo/W_mean"))
        # At lag 0 the trainer's log-probs of the policy's tokens, read after tool spans too, are the server's μ.
        assert r["lag"] == 0 and r["mismatch/logp_gap_max"] < 1e-4

    context = BatchContext.from_config(load_run_config(REPO / "examples/calculator_tool.yaml"))
    tool_spans = 0
    for path in sorted((short_run / "dump").glob("batch_*.safetensors")):
        for sample in (s for mini_batch in read_batch(path, context).mini_batches for s in mini_batch):
            mask = sample.response_mask or [1.0] * len(sample.response_ids)
            ids = sample.response_ids
            for j, token in enumerate(ids):
                if mask[j] == 0.0:  # only the calculator's output is masked: right after a CALL of the policy
                    start = j - next(k for k in range(j + 1) if mask[j - k] == 1.0) + 1
                    assert ids[start - 1] == CALL and mask[start - 1] == 1.0
                    assert ids[start:start + 4] == calculator(sample.prompt_ids)[:len(ids) - start]
            tool_spans += sum(1 for j in range(len(ids)) if mask[j] == 0.0 and ids[j] == RESULT)
    assert tool_spans > 0
