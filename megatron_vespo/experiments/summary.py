"""What a grid of runs measured: one run's metrics records summarised, runs aggregated into rows, a table.

Records are those of the synchronous loop's ``metrics.jsonl``: one per optimizer step, the step's
``lag`` within its rollout batch, every step of a batch carrying the batch's ``rollout/*`` metrics (so
the ``lag == 0`` records are one per rollout batch); evaluation records (no ``lag``) are ignored.

Per run (:func:`summarize_run`):

- ``final``/``best``: the last / largest rollout-batch mean reward;
- ``steps_to_threshold``: the optimizer step (``train_step``) of the first batch whose mean reward
  reaches the threshold, None if none does;
- ``collapsed``: a step skipped for non-finite gradients or with a non-finite gradient norm, or a final
  reward below half of the run's best;
- ``w_max`` (the W tail): exp of the largest sequence log-ratio log π_θ(y|x) − log μ(y|x) over every
  step, i.e. the largest plain sequence importance weight any step saw;
- ``flip_rate`` (mean over steps; None when the engine returned no experts) and ``lag0_logp_gap`` (mean
  |log π_θ − log μ| per token at lag 0, mean over batches);
- ``rewards``: (train_step, reward) per batch, the curve that is plotted.

Per row (:func:`aggregate_runs`, several seeds): mean final reward, largest best, median steps to the
threshold over the runs that reach it (and how many do), collapsed runs, largest W tail, mean flip rate,
gap and wall time; failed runs are counted apart.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from megatron_vespo.experiments.grid import RunOutcome

# Optional table columns: summary key -> (header, format of a value).
EXTRA_COLUMNS = {
    "flip_rate": ("flip rate", "{:.4f}"),
    "lag0_logp_gap": ("lag-0 log-prob gap", "{:.2e}"),
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)  # JSON null (a NaN or inf) is not


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # math.exp overflows (raises) past ~709.78


def summarize_run(records: Sequence[Mapping[str, Any]], wall_s: float, threshold: float) -> dict[str, Any]:
    """One run's summary (see the module docstring); ValueError if it has no rollout batch."""
    batches = [r for r in records if r.get("lag") == 0 and _finite(r.get("rollout/reward_mean"))]
    if not batches:
        raise ValueError("no rollout batch in the metrics (no lag-0 record with rollout/reward_mean)")
    steps = [r for r in records if "lag" in r]
    rewards = [float(r["rollout/reward_mean"]) for r in batches]
    reached = next((int(r["train_step"]) for r in batches if r["rollout/reward_mean"] >= threshold), None)
    bad = any(r.get("train/skipped_nonfinite_step") or not _finite(r.get("train/grad_norm")) for r in steps)
    log_ratios = [r.get("mismatch/seq_log_ratio_max") for r in steps if "mismatch/seq_log_ratio_max" in r]
    flips = [r["mismatch/routing_flip_rate"] for r in steps if _finite(r.get("mismatch/routing_flip_rate"))]
    gaps = [r["mismatch/logp_gap_mean"] for r in batches if _finite(r.get("mismatch/logp_gap_mean"))]
    return {
        "final": rewards[-1], "best": max(rewards), "steps_to_threshold": reached,
        "collapsed": bool(bad or rewards[-1] < 0.5 * max(rewards)),
        # a non-finite log-ratio (written as null) is an unbounded weight
        "w_max": math.inf if any(not _finite(x) for x in log_ratios) else
        _exp(max(log_ratios)) if log_ratios else None,
        "flip_rate": statistics.mean(flips) if flips else None,
        "lag0_logp_gap": statistics.mean(gaps) if gaps else None,
        "optimizer_steps": len(steps), "wall_s": wall_s,
        "rewards": [(int(r["train_step"]), float(r["rollout/reward_mean"])) for r in batches],
    }


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def aggregate_runs(summaries: Sequence[Optional[Mapping[str, Any]]]) -> dict[str, Any]:
    """One table row from the :func:`summarize_run` of each run; None stands for a run that failed."""
    runs = [s for s in summaries if s is not None]
    row: dict[str, Any] = {"runs": len(runs), "failed": len(summaries) - len(runs)}
    if not runs:
        return row
    reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
    w = [r["w_max"] for r in runs if r["w_max"] is not None]
    row.update({
        "final": statistics.mean(r["final"] for r in runs), "best": max(r["best"] for r in runs),
        "steps_to_threshold": statistics.median(reached) if reached else None, "reached": len(reached),
        "collapsed": sum(bool(r["collapsed"]) for r in runs), "w_max": max(w) if w else None,
        "flip_rate": _mean([r["flip_rate"] for r in runs]), "lag0_logp_gap": _mean([r["lag0_logp_gap"] for r in runs]),
        "wall_s": statistics.mean(r["wall_s"] for r in runs),
    })
    return row


def mean_reward_curve(summaries: Sequence[Optional[Mapping[str, Any]]]) -> list[tuple[int, float]]:
    """Mean reward over the runs at every optimizer step where any of them has a rollout batch (runs
    that stopped early, e.g. at ``run.stop_at_reward``, leave the mean of the later steps; failed runs,
    None, are left out)."""
    by_step: dict[int, list[float]] = {}
    for run in (s for s in summaries if s is not None):
        for step, reward in run["rewards"]:
            by_step.setdefault(step, []).append(reward)
    return [(step, statistics.mean(by_step[step])) for step in sorted(by_step)]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]], key_headers: Sequence[str],
                   threshold: float, extra: Sequence[str] = ()) -> str:
    """A markdown table, one line per (labels, row of :func:`aggregate_runs`); ``key_headers`` name the
    label columns, ``extra`` adds columns of :data:`EXTRA_COLUMNS`. A row whose runs all failed reads
    "failed"; "-" is a value no run reported."""
    unknown = [k for k in extra if k not in EXTRA_COLUMNS]
    if unknown:
        raise ValueError(f"unknown table columns {unknown}; known: {sorted(EXTRA_COLUMNS)}")
    headers = [*key_headers, "runs", "final reward", "best reward",
               f"steps to reward >= {threshold:g} (runs reaching it)", "collapsed runs", "W tail (max π/μ)",
               *(EXTRA_COLUMNS[k][0] for k in extra), "wall time per run"]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for labels, r in rows:
        runs = f"{r['runs']}" + (f" + {r['failed']} failed" if r["failed"] else "")
        if not r["runs"]:
            cells = ["failed"] * (len(headers) - len(key_headers) - 1)
        else:
            steps = (f"{r['steps_to_threshold']:g} ({r['reached']}/{r['runs']})" if r["reached"]
                     else f"never (0/{r['runs']})")
            cells = [f"{r['final']:.3f}", f"{r['best']:.3f}", steps, f"{r['collapsed']}/{r['runs']}",
                     _cell(r["w_max"], "{:.3g}"), *(_cell(r[k], EXTRA_COLUMNS[k][1]) for k in extra),
                     f"{r['wall_s']:.0f} s"]
        lines.append("| " + " | ".join([*labels, runs, *cells]) + " |")
    return "\n".join(lines)


def summarize_outcomes(outcomes: Sequence["RunOutcome"], threshold: float) -> list[dict[str, Any]]:
    """Per run of a grid: its outcome and, when it succeeded, its :func:`summarize_run` (``summary``; None
    for a failed run, or one whose metrics hold no rollout batch, which then counts as failed too)."""
    from megatron_vespo.logging_utils import read_metrics

    out = []
    for o in outcomes:
        summary, error = None, o.error
        if o.ok:
            try:
                summary = summarize_run(read_metrics(o.metrics_path), o.wall_s, threshold)
            except (OSError, ValueError) as exc:  # MetricsFileError is a ValueError
                error = f"{o.metrics_path}: {exc}"
        out.append({"name": o.name, "ok": summary is not None, "error": error, "returncode": o.returncode,
                    "wall_s": o.wall_s, "log": str(o.log), "output_dir": str(o.output_dir),
                    "log_tail": o.log_tail, "summary": summary})
    return out


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf", "nan"): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(out: Path, text: str, payload: Mapping[str, Any]) -> tuple[Path, Path]:
    """``table.md`` (``text``) and ``results.json`` (``payload``) under ``out``; returns both paths."""
    import json

    table, results = out / "table.md", out / "results.json"
    table.write_text(text if text.endswith("\n") else text + "\n")
    results.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    return table, results
