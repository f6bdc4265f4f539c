"""The train/inference gate: which training records it checks, its thresholds, its one-line error, its config."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.config.schema import TrainInferenceGateConfig
from megatron_vespo.driver.run_health import CannotLearnError, TrainInferenceGate, TrainInferenceGateError

REPO = Path(__file__).resolve().parents[2]


def record(lag: float, gap_mean: float, gap_max: float = 0.0, step: int = 1) -> dict:
    return {"lag": lag, "mismatch/logp_gap_mean": gap_mean, "mismatch/logp_gap_max": gap_max, "train_step": step}


def test_off_by_default_checks_nothing():
    gate = TrainInferenceGate(TrainInferenceGateConfig())
    assert gate.observe(record(0, 50.0)) == {} and gate.checks == 0


def test_first_lag0_record_only_unless_every_step():
    gate = TrainInferenceGate(TrainInferenceGateConfig(enabled=True, max_logp_gap_mean=0.1))
    assert gate.observe(record(1, 5.0)) == {}  # lag 1: the policy moved, a gap is expected
    assert gate.observe({"lag": 0, "train/skipped_empty_mini_batch": 1.0}) == {}  # nothing was trained
    assert gate.observe(record(0.0, 0.05)) == {"gate/checked": 1.0}  # async lags are floats
    assert gate.observe(record(0, 5.0)) == {}  # checked once only
    every = TrainInferenceGate(TrainInferenceGateConfig(enabled=True, every_step=True, max_logp_gap_mean=0.1))
    assert every.observe(record(0, 0.05)) == {"gate/checked": 1.0}
    with pytest.raises(TrainInferenceGateError, match="on train step 7 at lag 0"):
        every.observe(record(0, 0.2, step=7))


def test_failure_is_one_line_naming_the_gap_the_threshold_and_the_causes():
    gate = TrainInferenceGate(TrainInferenceGateConfig(enabled=True, max_logp_gap_mean=0.1))
    with pytest.raises(TrainInferenceGateError) as err:
        gate.observe(record(0, 0.25, gap_max=3.5))
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, CannotLearnError)  # printed as one `error:` line by the CLI
    assert "first mini-batch" in text and "0.25 per token > max_logp_gap_mean=0.1" in text and "(max 3.5)" in text
    for cause in ("weights", "dtype", "config"):
        assert cause in text


@pytest.mark.parametrize("gap_mean,gap_max,fails", [
    (0.1, 1.0, False),  # at the thresholds: passes
    (0.1000001, 0.5, True),  # mean over
    (0.05, 1.0000001, True),  # one token over
    (math.nan, 0.5, True),  # a NaN gap never passes
])
def test_thresholds(gap_mean, gap_max, fails):
    gate = TrainInferenceGate(TrainInferenceGateConfig(enabled=True, max_logp_gap_mean=0.1, max_logp_gap_max=1.0))
    if fails:
        with pytest.raises(TrainInferenceGateError):
            gate.observe(record(0, gap_mean, gap_max))
    else:
        assert gate.observe(record(0, gap_mean, gap_max)) == {"gate/checked": 1.0}


@pytest.mark.parametrize("overrides,path,fragment", [
    (["run.train_inference_gate.every_step=true"], "run.train_inference_gate.every_step", "enabled: true"),
    (["run.train_inference_gate.enabled=true", "run.train_inference_gate.max_logp_gap_mean=0"],
     "run.train_inference_gate.max_logp_gap_mean", "> 0"),
    (["run.train_inference_gate.enabled=true", "run.train_inference_gate.max_logp_gap_max=0.01"],
     "run.train_inference_gate.max_logp_gap_max", "must be >= max_logp_gap_mean=0.1"),
])
def test_bad_gate_config_names_the_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/quickstart.yaml", overrides)
    assert err.value.path == path and fragment in str(err.value), str(err.value)
