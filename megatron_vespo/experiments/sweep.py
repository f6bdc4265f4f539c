"""``megatron-vespo sweep``: one run config trained over the grid loss x staleness x seed.

Grid point (L, N, S) is the config with ``loss.name=L train.staleness=N train.seed=S`` added to the
user's overrides (and ``run.rollout_steps=K/N`` with ``--optimizer-steps K``, so that every staleness
makes the same number of optimizer steps on the same number of samples); seeds are the config's
``train.seed`` and the next ones. "Staleness" is the synchronous loop's N: a rollout batch is N
mini-batches and mini-batch j trains at policy lag j (``train.mode: async`` is refused: its lag is not
set by N).

Every grid point is validated as ``megatron-vespo check`` would (config rules, the one-process layout
the runs use, verifiers; data, tokenizer and checkpoint files once, as the points differ only in fields
no file check reads) before anything starts: a bad point fails fast, naming its loss and staleness. Then
the runs go through :func:`~megatron_vespo.experiments.grid.run_grid` (``--jobs`` at a time, each its own
``megatron-vespo train`` process, all dying with this one) into ``OUT/<loss>-n<N>-s<seed>/``. A failed
run is reported with the end of its log and marked failed in the table; the sweep fails only when every
run failed. Written under ``OUT``: ``table.md`` (per loss x staleness: final and best reward, steps to
``--threshold``, collapsed runs, W tail, wall time; see :mod:`~megatron_vespo.experiments.summary`),
``results.json`` (the rows and every run's summary) and ``reward_n<N>.png`` per staleness (mean reward
over seeds against the optimizer step, one line per loss).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.experiments.grid import GridRun, run_grid
from megatron_vespo.experiments.summary import aggregate_runs, markdown_table, mean_reward_curve, summarize_outcomes, \
    write_report
from megatron_vespo.preflight import preflight

DEFAULT_LOSSES = ("vespo", "ppo_clip", "gspo", "sapo")
DEFAULT_STALENESS = (1, 4, 16, 64)
# Set per grid point: an override of one of them would be silently replaced, so it is refused.
GRID_FIELDS = {"loss.name": "--losses", "train.staleness": "--staleness", "train.seed": "--seeds",
               "run.output_dir": "--out"}


class SweepError(RuntimeError):
    """A sweep that cannot start (its output directory holds another sweep) or whose every run failed."""


@dataclass(frozen=True)
class SweepPoint:
    loss: str
    staleness: int
    seed: int
    rollout_steps: Optional[int] = None  # with --optimizer-steps

    @property
    def name(self) -> str:
        return f"{self.loss}-n{self.staleness}-s{self.seed}"

    @property
    def overrides(self) -> tuple[str, ...]:
        steps = () if self.rollout_steps is None else (f"run.rollout_steps={self.rollout_steps}",)
        return (f"loss.name={self.loss}", f"train.staleness={self.staleness}", f"train.seed={self.seed}", *steps)

    def describe(self) -> str:
        return f"sweep grid point loss={self.loss}, staleness={self.staleness}"


def parse_list(text: str, flag: str, kind: type = str) -> list:
    """A comma-separated flag value (``vespo,gspo``, ``1,4,16``); ConfigError naming ``flag`` if it is
    empty, repeats an item or (``kind=int``) holds something that is not a positive integer."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ConfigError(flag, f"expected a comma-separated list without empty items; got {text!r}")
    if kind is int:
        bad = [t for t in items if not t.isdigit() or int(t) < 1]
        if bad:
            raise ConfigError(flag, f"expected positive integers; got {', '.join(bad)}")
        items = [int(t) for t in items]
    if len(set(items)) != len(items):
        raise ConfigError(flag, f"lists an item twice: {text!r}")
    return items


def grid_points(losses: Sequence[str], staleness: Sequence[int], seeds: Sequence[int],
                optimizer_steps: Optional[int] = None) -> list[SweepPoint]:
    """Every (loss, staleness, seed), seed-major (every loss and staleness of the first seed comes first)."""
    points = []
    for seed in seeds:
        for n in staleness:
            if optimizer_steps is not None and optimizer_steps % n:
                raise ConfigError("--optimizer-steps", f"{optimizer_steps} is not a multiple of staleness {n}: "
                                  "each rollout batch makes N optimizer steps")
            steps = None if optimizer_steps is None else optimizer_steps // n
            points.extend(SweepPoint(loss, n, seed, steps) for loss in losses)
    return points


def check_points(run_yaml: str | Path, overrides: Sequence[str], points: Sequence[SweepPoint]) -> None:
    """``check``'s validation of every point for the one-process runs the sweep starts; the files once."""
    for i, point in enumerate(points):
        try:
            cfg = load_run_config(run_yaml, [*overrides, *point.overrides])
            preflight(cfg, 1, files=i == 0)
        except ConfigError as exc:
            raise ConfigError(exc.path, f"{exc.message} ({point.describe()})") from None


def _refuse_grid_overrides(overrides: Sequence[str], optimizer_steps: Optional[int]) -> None:
    fields = dict(GRID_FIELDS, **({"run.rollout_steps": "--optimizer-steps"} if optimizer_steps else {}))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in fields:
            raise ConfigError(key, f"set by the sweep for each grid point ({fields[key]}); drop the override")


def run_sweep(run_yaml: str | Path, overrides: Sequence[str], *, losses: Sequence[str] = DEFAULT_LOSSES,
              staleness: Sequence[int] = DEFAULT_STALENESS, seeds: int = 1, jobs: int = 1,
              out: Optional[str | Path] = None, threshold: float = 0.5, timeout_s: Optional[float] = None,
              optimizer_steps: Optional[int] = None, command: str = "",
              report: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Validate, run and summarise the sweep (see the module docstring); returns what ``results.json``
    holds. ConfigError for a bad flag or grid point, SweepError when ``out`` holds another sweep's files
    or every run failed (after the table is written)."""
    for flag, value in (("--seeds", seeds), ("--jobs", jobs)):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1; got {value}")
    if optimizer_steps is not None and optimizer_steps < 1:
        raise ConfigError("--optimizer-steps", f"must be >= 1; got {optimizer_steps}")
    if timeout_s is not None and timeout_s <= 0:
        raise ConfigError("--timeout-s", f"must be > 0; got {timeout_s}")
    _refuse_grid_overrides(overrides, optimizer_steps)
    base = load_run_config(run_yaml, overrides)
    if base.train.mode != "sync":
        raise ConfigError("train.mode", f"the sweep varies the synchronous loop's staleness N; got {base.train.mode!r}")
    seed_list = [base.train.seed + k for k in range(seeds)]
    points = grid_points(losses, staleness, seed_list, optimizer_steps)
    check_points(run_yaml, overrides, points)
    out = Path(out) if out else Path(base.run.output_dir) / "sweep"
    ours = [out / "results.json", *(out / q.name for q in points), *(out / f"{q.name}.log" for q in points)]
    taken = [p for p in ours if p.exists()]
    if taken:
        raise SweepError(f"--out {out}: already holds {taken[0].name} (another sweep's files); choose another "
                         "directory or remove it")

    started = time.strftime("%Y-%m-%d %H:%M")
    report(f"[sweep] {len(points)} runs ({len(losses)} losses x {len(staleness)} staleness x {seeds} seeds), "
           f"{jobs} at a time, into {out}")
    outcomes = run_grid(run_yaml, [GridRun(p.name, (*overrides, *p.overrides)) for p in points], out, jobs=jobs,
                        timeout_s=timeout_s, tag="sweep", report=report)
    runs = [{"loss": p.loss, "staleness": p.staleness, "seed": p.seed, **r}
            for p, r in zip(points, summarize_outcomes(outcomes, threshold))]

    command = command or " ".join(["megatron-vespo sweep", str(run_yaml), "--losses", ",".join(losses), "--staleness",
                                   ",".join(map(str, staleness)), "--seeds", str(seeds), "--jobs", str(jobs),
                                   *(["--optimizer-steps", str(optimizer_steps)] if optimizer_steps else []),
                                   *overrides])
    setting = f"`{command}`: seeds {seed_list}, {jobs} run(s) at a time on {os.cpu_count()} CPU cores, " \
              f"started {started}"
    payload = _tabulate(out, {"setting": setting, "run_yaml": str(run_yaml), "overrides": list(overrides),
                              "losses": list(losses), "staleness": list(staleness), "seeds": seed_list,
                              "threshold": threshold, "optimizer_steps": optimizer_steps}, runs, report)
    failed = [r["name"] for r in runs if not r["ok"]]
    if failed and len(failed) == len(runs):
        raise SweepError(f"every run of the sweep failed ({', '.join(failed)}); their logs are under {out}")
    if failed:
        report(f"[sweep] {len(failed)} of {len(runs)} runs failed: {', '.join(failed)} (marked in the table)")
    return payload


def _tabulate(out: Path, header: dict, runs: list[dict], report: Callable[[str], None]) -> dict:
    """Rows per loss x staleness, ``table.md``, one reward plot per staleness and ``results.json`` (``header``,
    the rows, plots and runs), whose content it returns."""
    from megatron_vespo.plotting import plot_reward_curves  # matplotlib: only once there is something to plot

    def cell(loss: str, n: int) -> list[Optional[dict]]:
        return [r["summary"] for r in runs if r["loss"] == loss and r["staleness"] == n]

    losses, staleness = header["losses"], header["staleness"]
    rows = [((loss, str(n)), aggregate_runs(cell(loss, n))) for loss in losses for n in staleness]
    text = f"{header['setting']}\n\n{markdown_table(rows, ('loss', 'staleness'), header['threshold'])}\n"
    plots = [str(plot_reward_curves({loss: mean_reward_curve(cell(loss, n)) for loss in losses},
                                    out / f"reward_n{n}.png", title=f"staleness N={n}")) for n in staleness]
    payload = {**header, "plots": plots, "runs": runs,
               "rows": [{"loss": loss, "staleness": int(n), **row} for (loss, n), row in rows]}
    table, results = write_report(out, text, payload)
    report(text)
    report(f"[sweep] {table}, {results}, {', '.join(plots)}")
    return payload
