"""The TCP stores this project hosts listen on loopback only when their address is a loopback one.

torch's TCPStore server binds every interface (``*:PORT``) whatever host it is given, so a
single-machine run exposed an unauthenticated key-value store (the trainer's rendezvous, and the
weight-sync group's) on the network. One subprocess (a process of its own, whose listening sockets
are read with psutil) initialises the trainer without torchrun, then as rank 0 of a launch that sets
a loopback MASTER_ADDR, then hosts a weight-sync group, and reports its listening sockets each time.

Not covered (torch's code, not ours): under torchrun the agent hosts the store; see
``megatron_vespo.distributed``.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc.torchrun import free_port

REPO = Path(__file__).resolve().parents[2]
WILDCARDS = {"0.0.0.0", "::", "::ffff:0.0.0.0"}

SCRIPT = r"""
import json, os, sys
import psutil
import torch.distributed as dist
from megatron_vespo.config import load_run_config
from megatron_vespo.distributed import destroy_distributed, init_distributed
from rollout_sglang.process_group import destroy_custom_process_group, init_custom_process_group

def listening():
    return sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN})

def default_store_port():
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore("default_pg", our TCPStore)
        store = store.underlying_store
    return store.port

cfg = load_run_config(sys.argv[1])
out = {}
init_distributed(cfg.parallel, 0, model=cfg.model, precision=cfg.precision)
out["single"] = {"port": default_store_port(), "listening": listening()}
destroy_distributed()

launch_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": sys.argv[2], "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
os.environ.update(launch_env)
init_distributed(cfg.parallel, 0, model=cfg.model, precision=cfg.precision)
out["master_addr"] = {"port": int(sys.argv[2]), "listening": listening()}
destroy_distributed()
for name in launch_env:
    del os.environ[name]

group = init_custom_process_group(backend="gloo", master_address="127.0.0.1", master_port=int(sys.argv[3]),
                                  world_size=1, rank=0, group_name="weights", timeout_s=30)
out["weight_sync"] = {"port": int(sys.argv[3]), "listening": listening()}
destroy_custom_process_group(group)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def listening() -> dict:
    cleared = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")
    env = {k: v for k, v in os.environ.items() if k not in cleared}  # a plain process, not a torchrun worker
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-c", SCRIPT, str(REPO / "configs/tiny_vespo.yaml"), str(free_port()), str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)  # one process, no tree
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("case", ["single", "master_addr", "weight_sync"])
def test_hosted_store_listens_on_loopback_only(listening, case):
    found = listening[case]
    bound = {ip for ip, port in found["listening"] if port == found["port"]}
    assert bound == {"127.0.0.1"}, found  # before: {"::"}, every interface
    assert not {ip for ip, _ in found["listening"]} & WILDCARDS, found


def test_stores_left_to_torch(monkeypatch):
    """torchrun's agent hosts the store (these processes are its clients); a non-loopback master must be
    reachable from other machines: both keep torch's rendezvous."""
    from megatron_vespo.distributed import trainer_store
    from rollout_sglang.process_group import loopback_address

    timeout = datetime.timedelta(seconds=5)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert trainer_store(0, 2, timeout) is None
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    assert trainer_store(0, 2, timeout) is None
    assert [loopback_address(h) for h in ("localhost", "127.0.0.1", "127.0.1.1", "::1", "10.1.2.3", "node-1")] == \
        ["127.0.0.1", "127.0.0.1", "127.0.1.1", "::1", None, None]
