"""Metrics logging: JSONL, TensorBoard and an offline wandb run get the same metrics under the same names."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any, Iterable

import pytest

from megatron_vespo.config import load_run_config
from megatron_vespo.logging_utils import MetricsLogger, MetricsWriter, ProgressReporter, read_metrics, wandb_mode

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


# ---------------------------------------------------------------------------------- reading the sinks back
def read_tensorboard_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


_WANDB_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_LOG_RECORD = struct.Struct("<IHB")  # crc32c, length, type (leveldb log format, 32 KiB blocks)
_BLOCK = 32768


def _wandb_log_payloads(data: bytes) -> Iterable[bytes]:
    ident, magic, _ = _WANDB_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a wandb transaction log (.wandb)")
    pos, pending = _WANDB_HEADER.size, b""
    while pos + _LOG_RECORD.size <= len(data):
        if _BLOCK - pos % _BLOCK < _LOG_RECORD.size:  # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = _LOG_RECORD.unpack_from(data, pos)
        pos += _LOG_RECORD.size
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def read_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged history rows of a wandb run directory (e.g. ``wandb/offline-run-*``), read from its
    ``.wandb`` transaction log; each row has ``_step`` and the logged keys."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file")
    rows = []
    for payload in _wandb_log_payloads(files[0].read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
