"""A response the server aborted is never trained as if complete, and a run that cannot learn stops
with an error instead of finishing with exit status 0.

Before: aborted (truncated) responses were scored and trained like complete ones; a data file whose
answers never verify gave reward 0 and ``reward/verifier_errors`` at every step without printing the
first error, rc 0; ``checkpoint.init_from`` with NaN weights gave "0 optimizer steps", every response
aborted, rc 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.config.schema import AdvantageConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.driver.rollout import RolloutGroup, build_rollout_batch
from megatron_vespo.driver.run_health import CannotLearnError, LearningGuard, check_finite_weights
from megatron_vespo.rollout_function import RolloutResult
from rollout_sglang.types import FinishReason, Sample
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]


def response(rid: str, tokens: int, finish: str) -> RolloutResult:
    return RolloutResult.from_sample(Sample(
        rid=rid, prompt_ids=[1, 2], output_ids=list(range(3, 3 + tokens)), output_logprobs=[-0.5] * tokens,
        finish_reason=FinishReason(finish), weight_version="0", prompt_tokens=2, completion_tokens=tokens))


def test_aborted_responses_are_not_trained_and_not_in_their_groups_advantage():
    row = PromptRow(index=0, prompt_ids=[1, 2], ground_truth=[3])
    groups = [RolloutGroup(row, [response("a", 3, "stop"), response("b", 1, "abort"), response("c", 3, "length")]),
              RolloutGroup(row, [response("d", 2, "abort"), response("e", 3, "stop"), response("f", 3, "stop")])]
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    batch = build_rollout_batch(groups, rewards, AdvantageConfig(normalize_std=False))
    assert [len(g) for g in batch.groups] == [2, 2]  # the aborted ones are gone
    # Group 1 over its complete responses only: rewards (1, 0) -> advantages (+0.5, -0.5); with the
    # aborted response's 0 counted, the mean would be 1/3 instead.
    assert [s.advantage for s in batch.groups[0]] == [0.5, -0.5]
    assert [s.advantage for s in batch.groups[1]] == [0.0, 0.0]
    assert batch.metrics["rollout/aborted_excluded"] == 2 and batch.metrics["rollout/finish_abort"] == 2


def test_guard_stops_after_consecutive_batches_without_signal_and_names_the_first_error():
    guard = LearningGuard(max_failed_steps=2)
    failing = {"rollout/num_responses": 8.0, "reward/verifier_errors": 8.0, "reward/first_error": "ValueError: x"}
    guard.observe(failing)
    guard.observe({"rollout/num_responses": 8.0, "reward/verifier_errors": 3.0})  # some signal: the count restarts
    guard.observe(failing)
    with pytest.raises(CannotLearnError, match="every response failed verification.*ValueError: x"):
        guard.observe(failing)
    aborted = LearningGuard(max_failed_steps=1)
    with pytest.raises(CannotLearnError, match="every response was aborted"):
        aborted.observe({"rollout/num_responses": 8.0, "rollout/finish_abort": 8.0})


def test_non_finite_weights_are_named():
    check_finite_weights([("a", torch.zeros(3))], "init")
    bad = torch.zeros(4)
    bad[2] = float("nan")
    with pytest.raises(CannotLearnError, match="weight model.b has 1 non-finite value"):
        check_finite_weights([("a", torch.zeros(3)), ("model.b", bad)], "init")


def _train(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "configs/quickstart.yaml"),
           f"run.output_dir={tmp_path / 'run'}", "run.rollout_steps=20", "run.stop_at_reward=null", "run.plot=false",
           "eval.every_steps=0", "train.staleness=1", "train.mini_batch_prompts=2", "rollout.n_samples=4", *overrides]
    with ProcessTree(cmd, tmp_path / "train.log", cwd=REPO) as run:
        code = run.wait(300)
        return code, run.tail(6000)


def test_a_data_file_whose_answers_never_verify_stops_the_run_with_the_first_error(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": [1, 2, 3], "ground_truth": "not token ids"}) + "\n"
                            for _ in range(8)))
    code, log = _train(tmp_path, f"data.path={data}", "run.max_failed_steps=2")
    assert code != 0, log
    assert "2 rollout batches in a row without a learning signal" in log
    assert "synthetic ground truth must be a non-empty list of token ids" in log  # the first error, shown


def test_non_finite_initial_weights_are_refused_before_the_fleet_starts(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_vespo.checkpoint.hf_io import hf_config_from_model
    from megatron_vespo.config import load_run_config

    cfg = load_run_config(REPO / "configs/quickstart.yaml", [])
    config = AutoConfig.for_model(**hf_config_from_model(cfg.model, torch.float32))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_hf")
    code, log = _train(tmp_path, f"checkpoint.init_from={tmp_path / 'nan_hf'}")
    assert code != 0, log
    assert "model.layers.0.self_attn.q_proj.weight has 1 non-finite value" in log
    assert "[fleet]" not in log  # refused before any server started


def test_a_dead_remote_verifier_stops_the_run_with_one_line_naming_its_url(tmp_path):
    """reward.verifier: http with nothing listening: every response fails after its retries (the later ones
    after one attempt), and the run stops with one ``error:`` line naming the URL and the last error."""
    from rollout_sglang.net import find_free_port

    url = f"http://127.0.0.1:{find_free_port()}/score"
    code, log = _train(tmp_path, "reward.verifier=http", f"reward.http.url={url}", "reward.http.retries=2",
                       "run.max_failed_steps=1")
    assert code != 0, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log
    assert "1 rollout batches in a row without a learning signal" in errors[0]
    assert f"http verifier {url}: 3 attempt(s) failed" in errors[0] and "ConnectionRefusedError" in errors[0]
