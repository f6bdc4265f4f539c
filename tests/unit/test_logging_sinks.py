"""Metrics logging: JSONL, TensorBoard and an offline wandb run get the same metrics under the same names."""
from __future__ import annotations

import io
import json

import pytest

from megatron_vespo.config import load_run_config
from megatron_vespo.logging_utils import (
    MetricsLogger, MetricsWriter, ProgressReporter, read_metrics, read_tensorboard_scalars, read_wandb_history,
    wandb_mode,
)

RECORDS = [  # (rollout step, record): two optimizer steps per rollout step, as the sync driver writes them
    (0, {"train_step": 1, "rollout/reward_mean": 0.25, "vespo/W_mean": 1.0, "rollout_weight_version": "0"}),
    (0, {"train_step": 2, "rollout/reward_mean": 0.25, "vespo/W_mean": 0.9, "rollout_weight_version": "0"}),
    (1, {"train_step": 3, "rollout/reward_mean": 0.5, "vespo/W_mean": 1.0, "rollout_weight_version": "2"}),
    (1, {"train_step": 4, "rollout/reward_mean": 0.5, "vespo/W_mean": float("nan"), "rollout_weight_version": "2"}),
]


@pytest.fixture
def cfg_for(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def make(**logging):
        return load_run_config("configs/tiny_vespo.yaml", [f"run.output_dir={tmp_path}"] +
                               [f"logging.{k}={v}" for k, v in logging.items()])
    return make


def expected_series(records):
    series: dict[str, list[tuple[int, float]]] = {}
    for _, rec in records:
        for key, value in rec.items():
            if isinstance(value, (int, float)) and value == value:  # numeric and not NaN
                series.setdefault(key, []).append((rec["train_step"], float(value)))
    return series


def test_all_sinks_get_the_same_metrics(cfg_for, tmp_path):
    cfg = cfg_for(tensorboard="true", wandb="true", run_name="sinks")
    logger = MetricsLogger.from_config(cfg)
    for step, rec in RECORDS:
        logger.write(step, rec)
    logger.close()

    jsonl = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == [0, 0, 1, 1]
    assert jsonl[3]["vespo/W_mean"] is None and jsonl[2]["rollout_weight_version"] == "2"
    expected = expected_series(RECORDS)
    from_jsonl = expected_series([(r["step"], r) for r in jsonl])
    from_jsonl.pop("step")
    assert from_jsonl == expected

    tb = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert {k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in tb.items()} == expected

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0])
    wb: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if not key.startswith("_"):
                wb.setdefault(key, []).append((row["_step"], float(value)))
    assert wb == expected
    assert set(wb) == set(tb)  # one naming for every sink


def write_then_resume_at_step_1(cfg) -> MetricsLogger:
    """Write RECORDS, then resume from a checkpoint taken after rollout step 0 (step-1 lines are dropped)
    and write one new step-1 record; the first logger is returned."""
    logger = MetricsLogger.from_config(cfg)
    for step, rec in RECORDS:
        logger.write(step, rec)
    logger.close()
    resumed = MetricsLogger.from_config(cfg, resume_step=1)
    resumed.write(1, {"train_step": 3, "rollout/reward_mean": 0.75})
    resumed.close()
    return logger


def test_jsonl_only_by_default_and_resume_keeps_earlier_steps(cfg_for, tmp_path):
    logger = write_then_resume_at_step_1(cfg_for())
    assert logger.sinks == []
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train_step"]) for r in records] == [(0, 1), (0, 2), (1, 3)]
    assert records[-1]["rollout/reward_mean"] == 0.75
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_resumed_tensorboard_supersedes_later_events(cfg_for, tmp_path):
    write_then_resume_at_step_1(cfg_for(tensorboard="true"))
    tb = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["rollout/reward_mean"] == [(1, 0.25), (2, 0.25), (3, 0.75)]


def test_wandb_mode_follows_the_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_metrics_writer_api_and_progress_eta(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.write(0, {"x": float("inf")})
    writer.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 0, "x": None}
    progress = ProgressReporter(10, {"r": "reward"}, stream=io.StringIO(), first_step=5)
    line = progress.line(5, {"r": 0.5})
    assert line.startswith("step 6/10 | reward 0.5 |") and "ETA" in line


def test_plot_command_writes_a_png_from_the_metrics_log(cfg_for, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    logger = MetricsLogger.from_config(cfg_for())
    for step, rec in RECORDS:
        logger.write(step, rec)
    logger.close()
    tool = Path(__file__).resolve().parents[2] / "tools/plot_metrics.py"
    proc = subprocess.run([sys.executable, str(tool), str(tmp_path / "metrics.jsonl")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and proc.stdout.strip() == str(png)
    missing = subprocess.run([sys.executable, str(tool), str(tmp_path / "nope.jsonl")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "file not found" in missing.stderr
