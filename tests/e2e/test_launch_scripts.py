"""The shipped torchrun launch scripts, run unchanged: one node, two trainer processes (EP=2), the
quickstart config shortened by overrides. The multi-node script runs as its own one-node case."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from tests.multiproc.torchrun import free_port

REPO = Path(__file__).resolve().parents[2]
SHORT_RUN = ["parallel.expert=2", "run.stop_at_reward=null", "run.plot=false", "train.staleness=1"]


def start_script(script: str, env: dict[str, str], overrides: list[str]) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
                "CONFIG": "configs/quickstart.yaml", "NPROC_PER_NODE": "2", **env}
    # Own session: a timeout ends torchrun and its ranks together.
    return subprocess.Popen(["bash", str(REPO / script), *overrides], cwd=REPO, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} timed out\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both scripts at once (each run is dominated by start-up, so together they take little longer)."""
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    procs = {
        "single": (start_script("examples/train_single_node.sh", {},
                                SHORT_RUN + ["run.rollout_steps=2", f"run.output_dir={single}"]), single),
        "multi": (start_script("examples/train_multi_node.sh",
                               {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                               SHORT_RUN + ["run.rollout_steps=1", f"run.output_dir={multi}"]), multi),
    }
    return {name: (finish(proc, timeout=150), out) for name, (proc, out) in procs.items()}


def test_single_node_script(launched):
    out, run_dir = launched["single"]
    assert out.count("megatron-vespo run summary") == 1  # rank 0 only
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["train_step"] for r in records] == [1, 2]
    assert [r["rollout_weight_version"] for r in records] == ["0", "1"]


def test_multi_node_script_with_one_node(launched):
    out, run_dir = launched["multi"]
    assert "megatron-vespo run summary" in out
    assert [r["train_step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]


def test_multi_node_script_refuses_a_missing_master_addr(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    proc = subprocess.run(["bash", str(REPO / "examples/train_multi_node.sh")], cwd=REPO, text=True,
                          env={**env, "NNODES": "2", "NODE_RANK": "1", "PYTHON": sys.executable},
                          capture_output=True, timeout=30)
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr


def test_plan_before_launch_stops_an_impossible_layout(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "examples/train_single_node.sh"), "parallel.expert=3"], cwd=REPO,
                          text=True, env={**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "2"},
                          capture_output=True, timeout=30)
    assert proc.returncode == 2 and "parallel.expert" in proc.stderr
