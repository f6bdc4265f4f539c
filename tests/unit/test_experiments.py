"""Experiment grids (megatron_vespo.experiments): a run's metrics records summarised, runs aggregated into
rows, the markdown table, the reward plot, and the sweep's grid points, on hand-made records.

The grid of real `train` processes and `megatron-vespo sweep` end to end: tests/e2e/test_sweep.py."""
from __future__ import annotations

import json
import math

import pytest

from megatron_vespo.config import ConfigError
from megatron_vespo.experiments.grid import RunOutcome
from megatron_vespo.experiments.summary import (
    aggregate_runs, json_safe, markdown_table, mean_reward_curve, summarize_outcomes, summarize_run, write_report,
)
from megatron_vespo.experiments.sweep import SweepPoint, grid_points, parse_list
from megatron_vespo.plotting import plot_reward_curves


def step(train_step: int, lag: int, reward: float, *, log_ratio: float = 0.0, gap: float = 0.01,
         flip: float | None = None, grad_norm: float | None = 1.0, skipped: float = 0.0) -> dict:
    """One optimizer step's record as the synchronous loop writes it (None: JSON null, a non-finite value)."""
    r = {"step": (train_step - 1) // 2, "lag": lag, "train_step": train_step, "rollout/reward_mean": reward,
         "train/grad_norm": grad_norm, "train/skipped_nonfinite_step": skipped,
         "mismatch/seq_log_ratio_max": log_ratio, "mismatch/logp_gap_mean": gap}
    if flip is not None:
        r["mismatch/routing_flip_rate"] = flip
    return r


# Two rollout batches of two steps each (staleness 2), then a final evaluation record (no lag).
LEARNS = [step(1, 0, 0.25, log_ratio=0.5, gap=0.01, flip=0.1), step(2, 1, 0.25, log_ratio=math.log(4.0), flip=0.3),
          step(3, 0, 0.75, gap=0.03, flip=0.2), step(4, 1, 0.75, flip=0.2),
          {"eval/reverse/accuracy": 0.5, "train_step": 4}]
# Reaches the threshold at once, then falls below half of its best.
FALLS = [step(1, 0, 0.8), step(2, 1, 0.8), step(3, 0, 0.3), step(4, 1, 0.3)]
# Never reaches the threshold; one step skipped for non-finite gradients (grad norm written as null).
SKIPS = [step(1, 0, 0.1), step(2, 1, 0.1, grad_norm=None, skipped=1.0)]


def test_summary_of_one_run():
    s = summarize_run(LEARNS, wall_s=12.0, threshold=0.5)
    assert s["final"] == 0.75 and s["best"] == 0.75
    assert s["steps_to_threshold"] == 3  # the first step trained on the batch that reached 0.5
    assert s["collapsed"] is False
    assert s["w_max"] == pytest.approx(4.0, rel=1e-12)  # exp of the largest sequence log-ratio
    assert s["flip_rate"] == pytest.approx(0.2, rel=1e-12)  # mean over the 4 steps
    assert s["lag0_logp_gap"] == pytest.approx(0.02, rel=1e-12)  # mean over the 2 batches (lag 0)
    assert s["optimizer_steps"] == 4 and s["wall_s"] == 12.0
    assert s["rewards"] == [(1, 0.25), (3, 0.75)]

    falls = summarize_run(FALLS, 5.0, 0.5)
    assert (falls["final"], falls["best"], falls["steps_to_threshold"], falls["collapsed"]) == (0.3, 0.8, 1, True)
    assert falls["w_max"] == 1.0 and falls["flip_rate"] is None  # no experts returned: no flip rate
    skips = summarize_run(SKIPS, 5.0, 0.5)
    assert skips["steps_to_threshold"] is None and skips["collapsed"] is True
    # A non-finite sequence log-ratio (null in the JSONL) is an unbounded weight.
    assert summarize_run([step(1, 0, 0.5, log_ratio=None)], 1.0, 0.5)["w_max"] == math.inf
    with pytest.raises(ValueError, match="no rollout batch"):
        summarize_run([{"eval/reverse/accuracy": 0.5, "train_step": 0}], 1.0, 0.5)


def test_rows_aggregate_seeds_and_count_failed_runs():
    learns, falls, skips = (summarize_run(r, w, 0.5) for r, w in ((LEARNS, 12.0), (FALLS, 6.0), (SKIPS, 3.0)))
    row = aggregate_runs([learns, falls, None])
    assert row == {"runs": 2, "failed": 1, "final": pytest.approx(0.525), "best": 0.8, "steps_to_threshold": 2,
                   "reached": 2, "collapsed": 1, "w_max": pytest.approx(4.0), "flip_rate": pytest.approx(0.2),
                   "lag0_logp_gap": pytest.approx(0.01 * 0.5 + 0.02 * 0.5), "wall_s": 9.0}
    assert aggregate_runs([skips])["steps_to_threshold"] is None and aggregate_runs([skips])["reached"] == 0
    assert aggregate_runs([None, None]) == {"runs": 0, "failed": 2}
    # Mean over the runs that have a batch at each step (FALLS, SKIPS and a failed run).
    assert mean_reward_curve([falls, skips, None]) == [(1, pytest.approx(0.45)), (3, 0.3)]


def test_markdown_table():
    learns, falls, skips = (summarize_run(r, w, 0.5) for r, w in ((LEARNS, 12.0), (FALLS, 6.0), (SKIPS, 3.0)))
    rows = [(("vespo", "4"), aggregate_runs([learns, falls, None])), (("gspo", "4"), aggregate_runs([skips])),
            (("sapo", "4"), aggregate_runs([None]))]
    assert markdown_table(rows, ("loss", "staleness"), 0.5).splitlines() == [
        "| loss | staleness | runs | final reward | best reward | steps to reward >= 0.5 (runs reaching it) | "
        "collapsed runs | W tail (max π/μ) | wall time per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| vespo | 4 | 2 + 1 failed | 0.525 | 0.800 | 2 (2/2) | 1/2 | 4 | 9 s |",
        "| gspo | 4 | 1 | 0.100 | 0.100 | never (0/1) | 1/1 | 1 | 3 s |",
        "| sapo | 4 | 0 + 1 failed | failed | failed | failed | failed | failed | failed |",
    ]
    with_extra = markdown_table(rows[:2], ("arm",), 0.5, extra=("flip_rate", "lag0_logp_gap")).splitlines()
    assert with_extra[0].endswith("| W tail (max π/μ) | flip rate | lag-0 log-prob gap | wall time per run |")
    assert with_extra[2].endswith("| 4 | 0.2000 | 1.50e-02 | 9 s |")
    assert with_extra[3].endswith("| 1 | - | 1.00e-02 | 3 s |")  # no flip rate reported: "-"
    with pytest.raises(ValueError, match="unknown table columns"):
        markdown_table(rows, ("arm",), 0.5, extra=("nope",))


def test_reward_plot_is_a_png(tmp_path):
    curves = {"vespo": [(1, 0.25), (3, 0.75)], "gspo": [(1, 0.1)], "sapo": []}  # a loss whose runs all failed
    path = plot_reward_curves(curves, tmp_path / "plots" / "reward_n2.png", title="staleness N=2",
                              linestyles={"gspo": "--"})
    assert path == tmp_path / "plots" / "reward_n2.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outcomes_are_summarised_or_marked_failed(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LEARNS))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    outcomes = [RunOutcome("good", tmp_path / "good", tmp_path / "good.log", 0, 12.0),
                RunOutcome("empty", tmp_path / "empty", tmp_path / "empty.log", 0, 2.0),
                RunOutcome("crashed", tmp_path / "crashed", tmp_path / "crashed.log", 1, 2.0, "exit status 1", "boom")]
    good, empty, crashed = summarize_outcomes(outcomes, 0.5)
    assert good["ok"] and good["summary"] == summarize_run(LEARNS, 12.0, 0.5)
    assert not empty["ok"] and empty["summary"] is None and "no rollout batch" in empty["error"]
    assert not crashed["ok"] and crashed["error"] == "exit status 1" and crashed["log_tail"] == "boom"
    table, results = write_report(tmp_path, "text", {"w": math.inf, "rows": [{"x": (1, math.nan)}]})
    assert table.read_text() == "text\n"
    assert json.loads(results.read_text()) == {"w": "inf", "rows": [{"x": [1, "nan"]}]}
    assert json_safe({"a": [1.5, -math.inf]}) == {"a": [1.5, "-inf"]}


def test_sweep_grid_points():
    points = grid_points(["vespo", "gspo"], [1, 4], [7, 8], optimizer_steps=8)
    assert [p.name for p in points] == ["vespo-n1-s7", "gspo-n1-s7", "vespo-n4-s7", "gspo-n4-s7",
                                        "vespo-n1-s8", "gspo-n1-s8", "vespo-n4-s8", "gspo-n4-s8"]
    assert points[2].overrides == ("loss.name=vespo", "train.staleness=4", "train.seed=7", "run.rollout_steps=2")
    assert SweepPoint("sapo", 16, 1).overrides == ("loss.name=sapo", "train.staleness=16", "train.seed=1")
    with pytest.raises(ConfigError, match="6 is not a multiple of staleness 4") as info:
        grid_points(["vespo"], [1, 4], [1], optimizer_steps=6)
    assert info.value.path == "--optimizer-steps"


@pytest.mark.parametrize("text, kind, fragment", [
    ("", str, "without empty items"), ("vespo,,gspo", str, "without empty items"),
    ("vespo,vespo", str, "twice"), ("1,x", int, "positive integers; got x"), ("4,0", int, "got 0"),
])
def test_sweep_lists_are_checked_naming_the_flag(text, kind, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_list(text, "--staleness", kind)
    assert info.value.path == "--staleness"
    assert parse_list(" 1, 4 ,16", "--staleness", int) == [1, 4, 16]
