"""Custom rollout functions (rollout.function): loading, checking what they return, and the loss mask of
environment tokens from the rollout result through packing into VESPO's loss and sequence weight."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.config.schema import AdvantageConfig, LossConfig, OverlongConfig, VespoConfig
from megatron_vespo.data.dataset import PromptRow
from megatron_vespo.driver.rollout import RolloutGroup, build_rollout_batch
from megatron_vespo.losses import PolicyBatch, compute_policy_loss, normalizer_from_masks
from megatron_vespo.preflight import preflight
from megatron_vespo.rollout_function import (
    RolloutFunctionError, RolloutResult, RolloutSampling, check_results, load_rollout_function, single_turn,
)
from megatron_vespo.train.packing import build_thd_micro_batch
from megatron_vespo.train.sample import TrainSample
from rollout_sglang.types import FinishReason

REPO = Path(__file__).resolve().parents[2]
SAMPLING = RolloutSampling(n=2, params={"max_new_tokens": 8}, max_response_len=8)


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("spec,message", [
    ("no_such_package.rollouts:fn", "cannot import module 'no_such_package.rollouts'"),
    ("megatron_vespo.data.synthetic:no_such_fn", "has no attribute 'no_such_fn'"),
    ("megatron_vespo.data.synthetic:VOCAB", "is a SyntheticVocab, not a function"),
    ("megatron_vespo.data.synthetic:synthetic_rows", "must be an async function"),
    ("megatron_vespo.data.synthetic", "expected 'package.module:function'"),
])
def test_a_bad_function_is_a_config_error_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match="rollout.function") as err:
        load_rollout_function(spec)
    assert message in str(err.value)


def test_check_refuses_a_missing_function_before_anything_starts():
    cfg = load_run_config(REPO / "configs/quickstart.yaml", ["rollout.function=no_such_package.rollouts:fn"])
    with pytest.raises(ConfigError, match="rollout.function.*cannot import module"):
        preflight(cfg, 1, files=False)


@pytest.mark.parametrize("overrides,field", [
    (["rollout.function=examples.calculator_tool:rollout", "rollout.return_routed_experts=true"],
     "rollout.return_routed_experts"),
    (["rollout.function=examples.calculator_tool:rollout", "rollout.replay_dir=/tmp/x"], "rollout.function"),
    (["rollout.function=not a path"], "rollout.function"),
])
def test_combinations_a_custom_rollout_cannot_serve_are_refused(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/quickstart.yaml", overrides)
    assert err.value.args[0].startswith(field) or field in str(err.value)


def test_default_is_single_turn_and_the_example_registers_its_verifier():
    from megatron_vespo.rewards.registry import get_verifier

    assert load_rollout_function("").fn is single_turn
    runner = load_rollout_function("examples.calculator_tool:rollout")
    assert runner.spec == "examples.calculator_tool:rollout"
    get_verifier("calculator")  # the module registered it on import


# ------------------------------------------------------------------------------------------ checking
def result(**fields) -> RolloutResult:
    base = dict(output_ids=[1, 2, 3, 4], output_logprobs=[-0.1, None, None, -0.2], loss_mask=[1, 0, 0, 1])
    return RolloutResult(**{**base, **fields})


def test_a_valid_group_is_normalised():
    checked = check_results([result(), result(finish_reason="length", text="x")], SAMPLING, "f")
    assert checked[0].output_logprobs == [-0.1, 0.0, 0.0, -0.2]  # μ of environment tokens: never read
    assert checked[0].finish_reason == FinishReason("stop") and checked[1].finish_reason.type == "length"


@pytest.mark.parametrize("bad,message", [
    (dict(loss_mask=[1, 0, 1]), "sample 1.loss_mask: expected one entry per output token (4); got 3 entries"),
    (dict(loss_mask=[1, 0, 2, 1]), "sample 1.loss_mask[2]: expected 0 or 1; got 2"),
    (dict(loss_mask=[1, 0, True, 1]), "sample 1.loss_mask[2]: expected 0 or 1"),
    (dict(output_logprobs=[-0.1, None, None]), "sample 1.output_logprobs: expected one entry per output token"),
    (dict(output_logprobs=[None, None, None, -0.2]), "sample 1.output_logprobs[0]: a policy token (loss_mask 1)"),
    (dict(output_logprobs=[-0.1, None, None, math.nan]), "sample 1.output_logprobs[3]"),
    (dict(output_logprobs=[-0.1, None, None, 0.5]), "sample 1.output_logprobs[3]"),
    (dict(output_ids=[1, 2, -3, 4]), "sample 1.output_ids: expected a list of non-negative token ids"),
    (dict(output_ids=list(range(9)), output_logprobs=[-1.0] * 9, loss_mask=[1] * 9),
     "sample 1.output_ids: 9 tokens, more than max_response_len=8"),
    (dict(finish_reason="done"), "sample 1.finish_reason: expected one of stop, length, abort"),
])
def test_each_violation_names_the_sample_and_the_field(bad, message):
    with pytest.raises(RolloutFunctionError) as err:
        check_results([result(), result(**bad)], SAMPLING, "rollout.function m:f, prompt row 7")
    assert str(err.value).startswith("rollout.function m:f, prompt row 7: ") and message in str(err.value)


def test_the_group_must_be_a_list_of_n_results():
    with pytest.raises(RolloutFunctionError, match="returned 1 samples; the group needs 2"):
        check_results([result()], SAMPLING, "f")
    with pytest.raises(RolloutFunctionError, match="returned a dict; expected a list"):
        check_results({}, SAMPLING, "f")
    with pytest.raises(RolloutFunctionError, match="sample 0: expected a RolloutResult; got dict"):
        check_results([{}, result()], SAMPLING, "f")


# ------------------------------------------------------------------------------- the calculator example
def test_calculator_example_tool_and_reward():
    from examples.calculator_tool import CALL, RESULT, calculator, calculator_reward, final_answer
    from megatron_vespo.rewards.registry import ScoreRequest

    prompt = [4, 7, 6, 0, 12]  # 47 + 60
    assert calculator(prompt) == [1, 0, 7, RESULT]
    called = [CALL, 1, 0, 7, RESULT, 1, 0, 7, 13]
    assert final_answer(called) == [1, 0, 7] and final_answer([1, 0, 3, 13]) is None

    def reward(ids: list[int]) -> float:
        return calculator_reward(ScoreRequest(response_ids=ids, response_text=None, ground_truth=[1, 0, 7],
                                              prompt_ids=prompt))

    assert reward(called) == 1.0
    assert reward([CALL, 1, 0, 7, RESULT, 1, 0, 13]) == pytest.approx(2 / 3)
    assert reward([CALL, 1, 0, 7, RESULT, 9, 9, 9, 13]) == 0.0
    assert reward([1, 0, 7, 13]) == 0.0  # right, but without the calculator: the task's rule


# ----------------------------------------------------------------------------------------- the mask
def test_loss_mask_becomes_the_response_mask_with_truncation_masking_on_top():
    row = PromptRow(index=0, prompt_ids=[5, 6], ground_truth=None)
    responses = [result(), RolloutResult(output_ids=[1, 2], output_logprobs=[-0.5, -0.5], loss_mask=[1, 1]),
                 result(finish_reason=FinishReason("length"))]
    group = RolloutGroup(row, check_results(responses, RolloutSampling(3, {}, 8), "f"), generations=5)
    batch = build_rollout_batch([group], [1.0, 0.0, 0.5], AdvantageConfig(), OverlongConfig(mask_truncated=True),
                                max_response_len=8)
    tool, plain, truncated = batch.groups[0]
    assert tool.response_mask == [1.0, 0.0, 0.0, 1.0] and tool.rollout_logp == [-0.1, 0.0, 0.0, -0.2]
    assert plain.response_mask is None  # every token the policy's: as a single-turn sample
    assert truncated.response_mask == [0.0] * 4
    assert batch.metrics["rollout/generations_per_response"] == pytest.approx(5 / 3)
    assert batch.metrics["rollout/env_token_fraction"] == pytest.approx(4 / 10)


def _trainer_batch(samples: list[TrainSample], logp_of_position) -> tuple[PolicyBatch, dict]:
    """The PolicyBatch the train step builds from a packed micro-batch, with π given per packed position."""
    mb = build_thd_micro_batch(samples)
    logp = torch.tensor([logp_of_position(k) for k in range(mb["num_tokens"])], dtype=torch.float64,
                        requires_grad=True)
    batch = PolicyBatch(logp=logp, behavior_logp=mb["rollout_logp"].double(), mask=mb["loss_mask"],
                        seq_index=mb["seq_index"], advantages=mb["advantage"].double(), num_seqs=len(samples))
    return batch, mb


def _loss(samples: list[TrainSample], logp_of_position):
    batch, mb = _trainer_batch(samples, logp_of_position)
    out = compute_policy_loss(batch, normalizer_from_masks([batch]), LossConfig(name="vespo"))
    out.loss.backward()
    return out, batch, mb


def test_vespo_over_a_sample_with_tool_tokens_counts_only_the_policys_tokens():
    """A multi-turn sample (policy, tool, policy) and a single-turn one: the loss and log W are those computed by
    hand over the mask-1 tokens only; π and μ at the tool's tokens change nothing."""
    cfg = VespoConfig()
    tool_sample = TrainSample(prompt_ids=[5, 6, 7], response_ids=[14, 1, 0, 7, 15, 1, 0, 7, 13],
                              rollout_logp=[-0.7, 0, 0, 0, 0, -1.1, -0.4, -0.9, -0.3], advantage=1.5,
                              response_mask=[1, 0, 0, 0, 0, 1, 1, 1, 1])
    plain = TrainSample(prompt_ids=[8], response_ids=[3, 4], rollout_logp=[-0.2, -2.0], advantage=-0.5)

    def pi(k: int) -> float:  # π at packed position k: a different value everywhere
        return -0.05 * (k + 1)

    out, batch, mb = _loss([tool_sample, plain], pi)
    # By hand: response token j of a sample with P prompt tokens is read at packed position offset + P - 1 + j.
    sequences = [(tool_sample, 0), (plain, tool_sample.num_tokens)]
    total_tokens = sum(sum(s.response_mask or [1] * len(s.response_ids)) for s, _ in sequences)
    expected_loss, expected_log_w = 0.0, []
    for s, offset in sequences:
        mask = s.response_mask or [1] * len(s.response_ids)
        positions = [offset + len(s.prompt_ids) - 1 + j for j in range(len(s.response_ids)) if mask[j]]
        mus = [s.rollout_logp[j] for j in range(len(s.response_ids)) if mask[j]]
        log_w = sum(pi(k) - mu for k, mu in zip(positions, mus))
        expected_log_w.append(log_w)
        c1, c2 = (cfg.k_pos, cfg.lambda_pos) if s.advantage >= 0 else (cfg.k_neg, cfg.lambda_neg)
        phi = math.exp(log_w) ** c1 * math.exp(c2 * (1 - math.exp(log_w)))
        expected_loss += sum(-phi * s.advantage * pi(k) for k in positions) / total_tokens
    # rel 1e-6: the packed μ is float32
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert out.metrics.compute()["vespo/logW_max"] == pytest.approx(max(expected_log_w), rel=1e-6)
    assert out.metrics.compute()["vespo/logW_min"] == pytest.approx(min(expected_log_w), rel=1e-6)
    assert out.metrics.compute()["loss/valid_tokens"] == total_tokens == 7
    tool_positions = [len(tool_sample.prompt_ids) - 1 + j for j in (1, 2, 3, 4)]
    assert all(batch.logp.grad[k].item() == 0.0 for k in tool_positions)  # in the forward, never trained
    assert mb["input_ids"][:tool_sample.num_tokens].tolist() == tool_sample.prompt_ids + tool_sample.response_ids

    # π and μ of the tool's tokens moved far away: the same loss, weights and gradient.
    moved = TrainSample(**{**vars(tool_sample), "rollout_logp": [-0.7, -9.0, -0.01, -30.0, -5.0, -1.1, -0.4,
                                                                     -0.9, -0.3]})
    out2, batch2, _ = _loss([moved, plain], lambda k: pi(k) - (7.0 if k in tool_positions else 0.0))
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    for key in ("vespo/logW_max", "vespo/logW_min", "vespo/W_mean", "vespo/phi_mean"):
        assert out2.metrics.compute()[key] == pytest.approx(out.metrics.compute()[key], rel=1e-12)
    assert torch.allclose(batch2.logp.grad, batch.logp.grad)
