"""The fleet under faults, through the real CLI: a run survives the loss of its only rollout server, of
the router, and of one of two servers in asynchronous mode; nothing it started outlives it.

Each run is ``megatron-vespo train`` on the quickstart model (CPU rollout servers behind the real
sglang-router, disk weight sync). The test kills a process of the fleet with SIGKILL once the run has
written some metrics lines and checks that training goes on with every sample of every step (no
response lost or aborted, none duplicated: each record counts exactly prompts x n responses). Then:

- sync run: the trainer itself is SIGKILLed: its servers and router die with it (parent-death signal);
- async run (requests sent to the workers directly, routed experts on): the trainer gets SIGTERM: it
  shuts down cleanly (exit 143, everything stopped).

Before these fixes a dead only server ended the run in ~6 s of client retries (``503
no_available_workers``), a dead one of two in async mode ended it in the abort fan-out (``Connection
refused``), a dead router ended it for good, and servers and router stayed behind with parent 1.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from megatron_vespo.logging_utils import read_metrics
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]
SERVER, ROUTER = "rollout_sglang.cpu_server", "sglang::router"  # the router renames its process
# A restart of a CPU server takes ~10-20 s on a loaded 2-core machine; every wait keeps >= 3x headroom.
STEP_TIMEOUT_S = 180


def train_cmd(config: str, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs" / config),
            f"run.output_dir={out}", "run.stop_at_reward=null", "run.plot=false", "eval.every_steps=0",
            "train.mini_batch_prompts=4", "rollout.n_samples=8", *overrides]


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_one(run: ProcessTree, match: str) -> int:
    procs = run.descendants(match)
    assert procs, f"no running {match} under the trainer"
    procs[0].kill()
    return procs[0].pid


def assert_every_sample_trained(out: Path, expected_lines: int, responses: int) -> None:
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) >= expected_lines
    assert [r["train_step"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        assert r["rollout/num_responses"] == responses, r
        assert r["rollout/finish_abort"] == 0 and r["rollout/aborted_excluded"] == 0, r


def wait_gone(run: ProcessTree, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while run.descendants():
        assert time.monotonic() < deadline, [p.cmdline() for p in run.descendants()]
        time.sleep(0.2)


def test_sync_run_survives_its_only_server_and_the_router_and_takes_its_fleet_down_when_killed(tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd("quickstart.yaml", out, "run.rollout_steps=100", "train.staleness=1")
    with ProcessTree(cmd, tmp_path / "train.log", cwd=REPO) as run:
        run.wait_for(lambda: metric_lines(out) >= 2, STEP_TIMEOUT_S, "2 optimizer steps")
        old_server = kill_one(run, SERVER)
        run.wait_for(lambda: metric_lines(out) >= 5, STEP_TIMEOUT_S, "3 more steps after the server was killed")
        assert any(p.pid != old_server for p in run.descendants(SERVER)), "the server was not restarted"
        kill_one(run, ROUTER)
        run.wait_for(lambda: metric_lines(out) >= 8, STEP_TIMEOUT_S, "3 more steps after the router was killed")
        assert run.descendants(ROUTER), "the router was not restarted"
        fleet = run.descendants(SERVER) + run.descendants(ROUTER)
        run.proc.send_signal(signal.SIGKILL)  # the trainer alone; its fleet must follow it
        run.proc.wait()
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != "zombie" for p in fleet):
            assert time.monotonic() < deadline, "servers or router outlived the SIGKILLed trainer"
            time.sleep(0.2)
    log = (tmp_path / "train.log").read_text()
    assert "restarting" in log and "sglang-router" in log
    assert_every_sample_trained(out, 8, responses=4 * 8)


def test_async_run_survives_one_of_two_servers_and_stops_cleanly_on_sigterm(tmp_path):
    out = tmp_path / "run"
    # Routed experts on: requests go to the workers directly (worker_pool.py), the other request path.
    cmd = train_cmd("quickstart_async.yaml", out, "run.rollout_steps=100", "rollout.cpu_servers=2",
                    "asynchronous.buffer_groups=8", "rollout.return_routed_experts=true")
    with ProcessTree(cmd, tmp_path / "train.log", cwd=REPO) as run:
        run.wait_for(lambda: metric_lines(out) >= 2, STEP_TIMEOUT_S, "2 optimizer steps")
        assert len(run.descendants(SERVER)) == 2
        kill_one(run, SERVER)
        run.wait_for(lambda: metric_lines(out) >= 8, STEP_TIMEOUT_S, "6 more steps after a server was killed")
        run.signal(signal.SIGTERM)
        code = run.wait(STEP_TIMEOUT_S)
        assert code == 128 + signal.SIGTERM, run.tail()
        wait_gone(run, 30)
    assert "[shutdown] SIGTERM" in (tmp_path / "train.log").read_text()
    assert_every_sample_trained(out, 8, responses=4 * 8)


@pytest.fixture(autouse=True)
def _no_torch_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
