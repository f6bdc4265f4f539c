"""Peak extra memory per rank while the weights are published, on a model much larger than a bucket.

One torchrun launch (two processes): a 67 MiB Qwen3-MoE (fp32), 4 MiB buckets (the largest tensor, the
8 MiB embedding / output layer, travels alone), PP=2 and TP=2+EP=2. Peak RSS growth of every rank during
``export_hf_dir`` (every stage writes its shards) and during ``publish`` (broadcast to a CPU server) must
stay within two of the largest bucket plus a small constant — a gather to one process would add the
whole model there. ``MALLOC_MMAP_THRESHOLD_`` makes glibc return every freed tensor to the OS, so RSS
follows the live tensors (with its default dynamic threshold freed heap memory is reused silently).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .torchrun import run_torchrun

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("worker_publish_memory.py")
LAYOUTS = ("pp2", "tp2_ep2")
CONSTANT = 8 << 20  # allocator and bookkeeping slack; measured ~1.3 MiB


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("publish_memory")
    out = tmp / "results.json"
    run_torchrun(WORKER, ["--layouts", ",".join(LAYOUTS), "--workdir", tmp, "--out", out], nproc=2, timeout=300,
                 env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("phase", ["export", "publish"])
def test_peak_growth_per_rank_is_within_two_buckets(results, layout, phase):
    got = results[layout]
    assert got["model_bytes"] >= 16 * got["bucket_bytes"]  # much larger than a bucket
    assert got["pushed_bytes"] == got["model_bytes"]
    bound = 2 * got["largest_bucket"] + CONSTANT
    for rank, growth in enumerate(got[phase]):
        assert growth <= bound, f"{layout} {phase}: rank {rank} grew {growth / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    # ...and far from a copy of the model on any rank (two 8 MiB buckets are already ~model/4 here: 16.8 MiB
    # against 16.8 MiB was measured once, with the bound above met).
    assert max(got[phase]) < got["model_bytes"] / 3
