"""Streaming weight publication, every layout, real CPU rollout servers: bitwise equal weights.

One torchrun launch (two processes, gloo) runs TP=2+SP, PP=2, EP=2 and TP=2+EP=2 in turn against the
same two CPU servers (see ``worker_publish.py``): each stage's source rank sends its own buckets (a
broadcast group per pipeline stage; shards written per stage for disk), and every server must then
hold exactly the HF export of the trainer's weights. Under EP=2 a server is killed: it comes back
waiting for weights (no copy is kept anywhere) and the live model is re-published to it. With an odd
vocabulary (97, padded by Megatron to 256 rows at TP=2) the servers receive the unpadded HF shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping
from megatron_vespo.config import load_model_config

from .torchrun import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("worker_publish.py")
LAYOUTS = ("tp2_sp", "pp2", "ep2", "tp2_ep2")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("publish")
    out = tmp / "results.json"
    run_torchrun(WORKER, ["--layouts", ",".join(LAYOUTS), "--kill-layout", "ep2", "--workdir", tmp, "--out", out],
                 nproc=2, timeout=420)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("transport", ["distributed", "disk"])
def test_servers_hold_the_hf_export_bitwise(results, layout, transport):
    got = results[layout]
    assert got[transport] == [], got[transport][:10]
    assert got[f"{transport}_bytes"] > 0
    assert got["stages"] == (2 if layout == "pp2" else 1)


def test_same_bytes_in_every_layout(results):
    """The same model: every layout pushes the same bytes, whatever the sharding."""
    assert len({results[layout][f"{t}_bytes"] for layout in LAYOUTS for t in ("distributed", "disk")}) == 1


def test_a_killed_server_is_restored_from_the_live_model_under_ep2(results):
    kill = results["ep2"]["kill"]
    assert kill["waited"] and not kill["in_router_while_waiting"], kill
    assert kill["restored_servers"] == 1  # only the restarted server was pushed to
    assert kill["state"] == "healthy" and kill["in_router"], kill
    assert kill["mismatches"] == [], kill["mismatches"][:10]


def test_odd_vocabulary_is_published_unpadded(tmp_path):
    """Vocab 97 at TP=2+SP: Megatron holds 256 padded rows (TP rank 1 only padding); the servers (a
    97-token model that rejects any other shape) must receive and hold the HF export bitwise."""
    out = tmp_path / "results.json"
    run_torchrun(WORKER, ["--layouts", "tp2_sp", "--servers", "1", "--vocab-size", "97", "--workdir", tmp_path,
                          "--out", out], nproc=2, timeout=300)
    got = json.loads(out.read_text())["tp2_sp"]
    assert got["padded_vocab"] == 256
    model_cfg = dataclasses.replace(load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml"), vocab_size=97)
    hf_bytes = 4 * sum(math.prod(shape) for shape in Qwen3Mapping(model_cfg).hf_tensors().values())  # fp32
    for transport in ("distributed", "disk"):
        assert got[transport] == [], got[transport][:10]
        assert got[f"{transport}_bytes"] == hf_bytes  # the unpadded HF tensors, nothing more
