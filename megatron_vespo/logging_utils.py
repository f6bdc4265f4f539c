"""Run metrics: JSONL always, TensorBoard and wandb when configured, and a one-line progress report.

One record per ``write(step, metrics)``; every sink gets the same metric names. ``step`` is the
rollout step (the JSONL ``step`` field); the x-axis of TensorBoard and wandb is the record's
``train_step`` (optimizer step) when it has one, since the driver writes several records per
rollout step (one per optimizer step) and both tools want one strictly increasing step per point.
Non-numeric values (e.g. a weight-version string) go to the JSONL file only.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Protocol, TextIO

if TYPE_CHECKING:
    from megatron_vespo.config.schema import RunConfig


def _plain(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a record (bools and nulls excluded): what TensorBoard and wandb get."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _chart_step(step: int, record: Mapping[str, Any]) -> int:
    train_step = record.get("train_step")
    return int(train_step) if isinstance(train_step, (int, float)) and not isinstance(train_step, bool) else int(step)


class MetricsSink(Protocol):
    def write(self, step: int, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """``metrics.jsonl`` is corrupt before its last line (the message names the file and line)."""


@dataclass
class MetricsLines:
    """A parsed JSONL metrics file: its records with their text, and a torn last line (if any)."""

    path: Path
    lines: list[str]  # the text of each record, without the newline
    records: list[dict[str, Any]]
    torn_tail: Optional[str] = None  # an unparsable last line (a crash mid-write), dropped


def parse_metrics_file(path: str | Path) -> MetricsLines:
    """Read ``path`` strictly except for its last line: a last line that is not a JSON object is what a
    crash in the middle of a write leaves (or NUL padding after a power loss), and is returned as
    ``torn_tail``; a bad line anywhere before it is :class:`MetricsFileError` naming file and line."""
    path = Path(path)
    raw = path.read_bytes().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(raw) if line.strip()]
    out = MetricsLines(path=path, lines=[], records=[])
    for k, (lineno, line) in enumerate(numbered):
        try:
            text = line.decode("utf-8")
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if k == len(numbered) - 1:
                out.torn_tail = line.decode("utf-8", errors="replace")
                break
            raise MetricsFileError(f"{path}:{lineno}: not a JSON record ({exc}); the file is corrupt before its "
                                   "last line") from None
        out.lines.append(text.rstrip("\r"))
        out.records.append(record)
    return out


def check_metrics_file(path: str | Path) -> Optional[MetricsLines]:
    """The parsed file when it exists (None otherwise); :class:`MetricsFileError` when it cannot be continued."""
    path = Path(path)
    return parse_metrics_file(path) if path.is_file() else None


class MetricsWriter:
    """Writes ``{"step": ..., **metrics}`` lines to a JSONL file, flushed after every line.

    A new file by default. With ``resume_step`` (a run resumed from a checkpoint taken after step
    ``resume_step - 1``) the lines of steps ``< resume_step`` are kept and new lines are appended.
    The file is never lost on the way: the kept lines go to a temporary file that replaces it
    atomically. Lines of steps ``>= resume_step`` (the resumed run redoes those steps; e.g. it
    resumed from an older checkpoint than the last line) and a torn last line (a crash mid-write)
    are not silently dropped: they are moved to ``<file>.superseded-<UTC time>`` next to it, and a
    one-line message names that file. A line corrupt before the last one is a
    :class:`MetricsFileError` naming the file and line (nothing is changed).
    """

    def __init__(self, path: str | Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept_records: list[dict[str, Any]] = []
        self.superseded_path: Optional[Path] = None
        if resume_step is not None and self.path.is_file():
            self._rewrite_for_resume(resume_step)
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w")

    def _rewrite_for_resume(self, resume_step: int) -> None:
        parsed = parse_metrics_file(self.path)
        kept, dropped = [], []
        for text, record in zip(parsed.lines, parsed.records):
            step = record.get("step", 0)
            (kept if isinstance(step, (int, float)) and step < resume_step else dropped).append((text, record))
        self.kept_records = [record for _, record in kept]
        superseded = [text for text, _ in dropped] + ([parsed.torn_tail] if parsed.torn_tail is not None else [])
        if superseded:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.superseded_path = self.path.with_name(f"{self.path.name}.superseded-{stamp}")
            if self.superseded_path.exists():
                self.superseded_path = self.path.with_name(f"{self.superseded_path.name}-{uuid.uuid4().hex[:4]}")
            self.superseded_path.write_text("".join(line + "\n" for line in superseded))
            torn = " and a torn last line (a crash mid-write)" if parsed.torn_tail is not None else ""
            print(f"[metrics] {self.path}: {len(dropped)} line(s) of steps >= {resume_step}{torn} moved to "
                  f"{self.superseded_path} (the resumed run writes those steps again)", flush=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            f.write("".join(text + "\n" for text, _ in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars to ``<log_dir>/events.out.tfevents.*`` (torch.utils.tensorboard)."""

    def __init__(self, log_dir: str | Path, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # the tensorboard package is missing
            raise ImportError("logging.tensorboard needs the 'tensorboard' package: pip install tensorboard") from exc
        # purge_step: on resume, TensorBoard hides the events of steps >= purge_step from the old files.
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        x = _chart_step(step, record)
        for name, value in _scalars(record).items():
            self._writer.add_scalar(name, value, global_step=x)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_mode() -> str:
    """online with an API key, offline without one; an explicit WANDB_MODE wins."""
    explicit = os.environ.get("WANDB_MODE", "")
    if explicit in ("online", "offline", "disabled"):
        return explicit
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """A wandb run under ``<dir>/wandb``; the run id is kept in ``<dir>/wandb_run_id`` so a resumed
    run continues the same wandb run."""

    def __init__(self, directory: str | Path, project: str, name: str, config: Optional[dict] = None,
                 resume: bool = False):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("logging.wandb needs the 'wandb' package: pip install wandb") from exc
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self._wandb = wandb
        self.mode = wandb_mode()
        self.run = wandb.init(mode=self.mode, dir=str(directory), project=project, name=name, id=run_id,
                              resume="allow", config=config, reinit="finish_previous")
        self._last_step = -1

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        x = _chart_step(step, record)
        if x <= self._last_step:  # wandb drops non-increasing steps with a warning; say why here
            print(f"[wandb] step {x} <= {self._last_step}: not logged to wandb", file=sys.stderr)
            return
        self._last_step = x
        self.run.log(_scalars(record), step=x)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans each record out to the JSONL writer and the optional sinks (same names everywhere)."""

    def __init__(self, jsonl: MetricsWriter, sinks: Iterable[MetricsSink] = ()):
        self.jsonl = jsonl
        self.sinks = list(sinks)

    @classmethod
    def from_config(cls, cfg: "RunConfig", resume_step: Optional[int] = None) -> "MetricsLogger":
        """Sinks from ``cfg.logging`` under ``cfg.run.output_dir`` (call on the driver rank only)."""
        from typed_config import to_dict

        out = Path(cfg.run.output_dir)
        jsonl = MetricsWriter(out / METRICS_FILE, resume_step=resume_step)
        sinks: list[MetricsSink] = []
        log = cfg.logging
        if log.tensorboard:
            # Events of steps past the resume point are superseded by the new ones.
            done = [r["train_step"] for r in jsonl.kept_records if isinstance(r.get("train_step"), int)]
            purge = (max(done) + 1 if done else 0) if resume_step is not None else None
            sinks.append(TensorBoardSink(out / "tensorboard", purge_step=purge))
        if log.wandb:
            sinks.append(WandbSink(out, project=log.wandb_project, name=log.run_name or out.resolve().name,
                                   config=to_dict(cfg), resume=resume_step is not None))
        return cls(jsonl, sinks)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {k: _plain(v) for k, v in metrics.items()}
        self.jsonl.write(step, record)
        for sink in self.sinks:
            sink.write(step, record)

    def close(self) -> None:
        self.jsonl.close()
        for sink in self.sinks:
            sink.close()


# ---------------------------------------------------------------------------------- reading back
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL metrics file; a torn last line (a run killed mid-write) is left out, a bad
    line before it is :class:`MetricsFileError` naming the file and line."""
    return parse_metrics_file(path).records


# ---------------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressReporter:
    """Prints ``step k/K | key value ... | elapsed | ETA`` after each step (ETA from the mean step time)."""

    def __init__(self, total_steps: int, keys: Mapping[str, str], stream: Optional[TextIO] = None,
                 first_step: int = 0):
        self.total = total_steps
        self.keys = dict(keys)  # metric name -> short label
        self.stream = stream or sys.stdout
        self.first_step = first_step  # a resumed run: the ETA counts only the steps timed in this process
        self.start = time.monotonic()

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        elapsed = time.monotonic() - self.start
        done = step + 1
        eta = elapsed / max(1, done - self.first_step) * (self.total - done)
        parts = [f"step {done}/{self.total}"]
        for key, label in self.keys.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and value is not None:
                parts.append(f"{label} {value:.3g}")
        parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
        return " | ".join(parts)

    def report(self, step: int, metrics: Mapping[str, Any]) -> None:
        print(self.line(step, metrics), file=self.stream, flush=True)
