"""``megatron-vespo plan``'s weight-sync section: bytes per engine, per stage, time at a stated bandwidth."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.config import load_run_config
from megatron_vespo.planning.params import count_params
from megatron_vespo.planning.weight_sync import estimate_push

REPO = Path(__file__).resolve().parents[2]


def test_tiny_model_bytes_equal_what_the_publisher_pushes():
    """1,059,584 bytes: what every layout of tests/multiproc/test_weight_publish.py pushes (fp32 tiny MoE)."""
    cfg = load_run_config(REPO / "configs/tiny_vespo.yaml", ["precision.params_dtype=fp32"])
    assert estimate_push(cfg, 10).bytes_per_engine == 1_059_584


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stages_share_the_model_and_the_flagship_is_61_gb(pp):
    cfg = load_run_config(REPO / "configs/paper/vespo_sync_n8.yaml", [f"parallel.pipeline={pp}"])
    est = estimate_push(cfg, 25)
    assert len(est.stage_bytes) == pp
    assert est.bytes_per_engine == sum(est.stage_bytes) == count_params(cfg.model).total * 2  # bf16
    assert est.bytes_per_engine == 61_064_245_248
    assert est.seconds == pytest.approx(61_064_245_248 / 25e9)
    assert est.engines == len(cfg.rollout.fleet.servers)


def test_disk_reads_once_per_engine():
    cfg = load_run_config(REPO / "configs/paper/vespo_sync_n8.yaml", ["rollout.weight_sync.transport=disk"])
    est = estimate_push(cfg, 10)
    assert est.seconds == pytest.approx(est.bytes_per_engine * (1 + est.engines) / 10e9)


def test_plan_prints_the_section():
    out = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "plan", "configs/paper/vespo_sync_n8.yaml",
                          "--trainer-gpus", "16", "--weight-sync-gb-s", "25"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bytes pushed per engine       56.87 GiB  (61,064,245,248 bytes" in out.stdout
    assert "estimated push time              2.44 s  at 25 GB/s" in out.stdout
