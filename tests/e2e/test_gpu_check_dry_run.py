"""scripts/gpu_check.sh --dry-run: the prepared GPU check runs end to end on the CPU (everything but CUDA)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_one_passing_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["dry_run"]
    checks = report["checks"]
    assert set(checks) == {"step_parity", "throughput", "logprob_memory", "weight_export"}
    parity = checks["step_parity"]
    assert parity["dtype"] == "bf16" and parity["reference"].startswith("cpu fp32")
    assert parity["loss_rel_diff"] < 0.05 and parity["max_weight_diff"] < 1e-2
    assert checks["throughput"]["tokens_per_s"] > 0 and checks["throughput"]["mfu"] is None  # no known CPU peak
    assert checks["logprob_memory"]["working_ratio"] < 1
    assert checks["weight_export"]["written_bytes"] >= checks["weight_export"]["bytes"] > 0
    assert report["environment"]["transformer_engine"] is False
