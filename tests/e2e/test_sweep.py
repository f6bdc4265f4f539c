"""``megatron-vespo sweep`` end to end: the CLI in a subprocess runs its grid of real ``train`` processes
(the quickstart, shrunk to one rollout batch of two optimizer steps) and writes a table, JSON and a plot
that agree with the runs' own metrics; a bad grid point stops it before anything starts; a killed sweep
takes its runs down; the grid runner reports failed and timed-out runs with their logs.

Pure functions (summaries, table, plot, grid points): tests/unit/test_experiments.py.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vespo.experiments.grid import GridRun, run_grid
from megatron_vespo.logging_utils import read_metrics
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs/quickstart.yaml"
SHRINK = ["run.rollout_steps=1", "run.stop_at_reward=null", "run.plot=false", "eval.every_steps=0",
          "train.mini_batch_prompts=2", "rollout.n_samples=4"]


def sweep_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vespo.cli", "sweep", str(QUICKSTART), "--out", str(out), *args]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    # Two single-process runs at once: ~40 s on a quiet 2-core machine (start-up dominates); 300 s keeps
    # 3x headroom beside other test runs.
    proc = subprocess.run(sweep_cmd(out, "--losses", "vespo,gspo", "--staleness", "2", "--seeds", "1", "--jobs", "2",
                                    *SHRINK),
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_sweep_writes_a_table_json_and_plot_that_agree_with_its_runs(sweep):
    out, stdout = sweep
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["vespo-n2-s1234", "gspo-n2-s1234"]  # train.seed of the config
    for name in names:
        assert f"[sweep] started {name}" in stdout and f"[sweep] finished {name}" in stdout
    table = (out / "table.md").read_text()
    assert table.strip() in stdout  # the table it wrote is the one it printed
    for row, run in zip(results["rows"], results["runs"]):
        assert (row["loss"], row["staleness"], row["runs"], row["failed"]) == (run["loss"], 2, 1, 0)
        # The runs' own metrics, read here independently of the summary code.
        records = read_metrics(out / run["name"] / "metrics.jsonl")
        assert [r["lag"] for r in records] == [0, 1]  # one rollout batch of N=2 mini-batches
        reward = records[0]["rollout/reward_mean"]
        assert row["final"] == row["best"] == reward
        assert row["w_max"] == pytest.approx(math.exp(max(r["mismatch/seq_log_ratio_max"] for r in records)))
        assert row["lag0_logp_gap"] == records[0]["mismatch/logp_gap_mean"]
        assert row["collapsed"] == 0 and run["summary"]["optimizer_steps"] == 2
        assert row["steps_to_threshold"] == (1 if reward >= 0.5 else None)
        assert f"| {run['loss']} | 2 | 1 | {reward:.3f} | {reward:.3f} |" in table
    assert results["plots"] == [str(out / "reward_n2.png")]
    assert (out / "reward_n2.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_sweep_into_the_same_directory_is_refused(sweep):
    out, _ = sweep
    proc = subprocess.run(sweep_cmd(out, "--losses", "vespo", "--staleness", "2", *SHRINK), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: --out ") and "another sweep" in proc.stderr


def test_a_bad_grid_point_fails_before_any_run_starts(tmp_path):
    proc = subprocess.run(sweep_cmd(tmp_path / "grid", "--losses", "vespo,nope", "--staleness", "1,4", *SHRINK),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: loss.name: must be one of") and "loss=nope, staleness=1" in proc.stderr
    assert not (tmp_path / "grid").exists() and "[sweep]" not in proc.stdout


def test_a_killed_sweep_takes_its_runs_down(tmp_path):
    cmd = sweep_cmd(tmp_path / "grid", "--losses", "vespo", "--staleness", "1", "run.rollout_steps=100")
    with ProcessTree(cmd, tmp_path / "sweep.log", cwd=REPO) as sweep:
        sweep.wait_for(lambda: bool(sweep.descendants("megatron_vespo.cli train")), 120, "a train process")
        runs = sweep.descendants("megatron_vespo.cli train")
        sweep.proc.send_signal(signal.SIGKILL)  # the sweep alone: no chance to stop its runs itself
        sweep.proc.wait()
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != "zombie" for p in runs):
            assert time.monotonic() < deadline, "a train process outlived the SIGKILLed sweep"
            time.sleep(0.2)


def test_the_grid_reports_a_failed_and_a_timed_out_run_with_their_logs(tmp_path):
    lines: list[str] = []
    # A run that fails (a config error, exit status 2, before torch is imported) does not stop the others.
    failed, ok = run_grid(QUICKSTART, [GridRun("bad", ("loss.name=nope",)), GridRun("check", ("--help",))],
                          tmp_path, jobs=2, report=lines.append)
    assert failed.returncode == 2 and failed.error == "exit status 2" and not failed.ok
    assert "error: loss.name: must be one of" in failed.log_tail
    assert ok.ok and ok.returncode == 0 and ok.log_tail == ""
    assert any(line.startswith("[grid] FAILED bad after") and "error: loss.name" in line for line in lines)
    assert any(line.startswith("[grid] finished check in") for line in lines)
    # A run past its timeout is stopped (a real run cannot finish in 1 s: its fleet alone takes seconds).
    slow, = run_grid(QUICKSTART, [GridRun("slow", tuple(SHRINK))], tmp_path, timeout_s=1.0, report=lines.append)
    assert slow.returncode is None and slow.error == "stopped at its timeout of 1 s" and not slow.ok
    assert "FAILED slow" in lines[-1]
