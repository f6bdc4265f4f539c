"""Run metrics: one JSON object per rollout step in ``metrics.jsonl``, and a one-line progress report."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO


def _plain(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


class MetricsWriter:
    """Writes ``{"step": ..., **metrics}`` lines to a (new) JSONL file, flushed after every line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")  # one run per file: a rerun starts afresh

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressReporter:
    """Prints ``step k/K | key value ... | elapsed | ETA`` after each step (ETA from the mean step time)."""

    def __init__(self, total_steps: int, keys: Mapping[str, str], stream: Optional[TextIO] = None):
        self.total = total_steps
        self.keys = dict(keys)  # metric name -> short label
        self.stream = stream or sys.stdout
        self.start = time.monotonic()

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        elapsed = time.monotonic() - self.start
        done = step + 1
        eta = elapsed / done * (self.total - done)
        parts = [f"step {done}/{self.total}"]
        for key, label in self.keys.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and value is not None:
                parts.append(f"{label} {value:.3g}")
        parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
        return " | ".join(parts)

    def report(self, step: int, metrics: Mapping[str, Any]) -> None:
        print(self.line(step, metrics), file=self.stream, flush=True)
