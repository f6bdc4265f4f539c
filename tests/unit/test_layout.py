"""Impossible parallel layouts are rejected before any process group exists, naming the setting."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, load_model_config
from megatron_vespo.config.loader import load_run_config
from megatron_vespo.config.schema import FP8Config, ParallelConfig, PrecisionConfig
from megatron_vespo.models.layout import megatron_parallel_sizes, moe_layer_pattern, validate_layout, virtual_pipeline_size

ROOT = Path(__file__).resolve().parents[2]
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")  # 4 layers, 4 heads/2 groups, 8 experts
DENSE = load_model_config(ROOT / "configs/models/tiny_dense.yaml")  # 2 layers, no experts
QWEN = load_model_config(ROOT / "configs/models/qwen3_30b_a3b.yaml")
FP32 = PrecisionConfig(params_dtype="fp32")


def P(**kw) -> ParallelConfig:
    return ParallelConfig(**kw)


VALID = [
    (MOE, P(), 1),
    (MOE, P(tensor=2, expert_tensor=2, sequence_parallel=True), 2),
    (MOE, P(pipeline=2), 2),
    (MOE, P(expert=2), 2),
    (MOE, P(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True), 2),
    (MOE, P(pipeline=2, virtual_pipeline=2), 4),
    (MOE, P(expert=8), 8),
    (DENSE, P(tensor=2), 2),
    (QWEN, P(tensor=4, expert=8, expert_tensor=1, sequence_parallel=True), 16),
    (QWEN, P(tensor=2, expert=8, expert_tensor=1, sequence_parallel=True), None),
    # Odd vocabularies: Megatron's embedding and output layer are padded (make_vocab_size_divisible_by x TP).
    (dataclasses.replace(MOE, vocab_size=97), P(tensor=2, expert_tensor=2, sequence_parallel=True), 2),
    (dataclasses.replace(DENSE, vocab_size=127), P(tensor=2), 2),
]


@pytest.mark.parametrize("model,parallel,world", VALID)
def test_valid_layouts_pass(model, parallel, world):
    validate_layout(model, parallel, FP32, world)


INVALID = [
    # (model, parallel, world size, field named in the error, words in the message)
    (MOE, P(tensor=8, expert_tensor=8, sequence_parallel=True), None, "parallel.tensor", "num_attention_heads=4"),
    (MOE, P(tensor=4, expert_tensor=4, sequence_parallel=True), None, "parallel.tensor", "num_key_value_heads=2"),
    (MOE, P(tensor=2, expert_tensor=2), None, "parallel.sequence_parallel", "MoE"),
    (DENSE, P(sequence_parallel=True), None, "parallel.sequence_parallel", "tensor > 1"),
    (MOE, P(pipeline=3), None, "parallel.pipeline", "num_hidden_layers=4"),
    (MOE, P(pipeline=2, virtual_pipeline=4), None, "parallel.virtual_pipeline", "pipeline*virtual_pipeline=2*4"),
    (MOE, P(virtual_pipeline=2), None, "parallel.virtual_pipeline", "pipeline > 1"),
    (MOE, P(expert=3), None, "parallel.expert", "num_experts=8"),
    (MOE, P(expert=2, expert_tensor=3), None, "parallel.expert_tensor", "moe_intermediate_size=32"),
    (MOE, P(tensor=2, expert_tensor=1, sequence_parallel=True), None, "parallel.expert_tensor", "expert=1"),
    (DENSE, P(expert=2), None, "parallel.expert", "without MoE"),
    (MOE, P(tensor=2, expert_tensor=2, sequence_parallel=True), 3, "parallel.tensor", "world size 3"),
    (MOE, P(expert=4), 2, "parallel.expert", "tensor*context*data=1*1*2"),
    (MOE, P(pipeline=2, expert=2), 2, "parallel.expert", "world size 2"),
]


@pytest.mark.parametrize("model,parallel,world,field,words", INVALID,
                         ids=[f"{f}-{w}" for _, _, _, f, w in INVALID])
def test_impossible_layouts_name_the_setting(model, parallel, world, field, words):
    with pytest.raises(ConfigError) as info:
        validate_layout(model, parallel, FP32, world)
    assert info.value.path == field
    assert words in info.value.message


def test_fp8_rules():
    bf16_fp8 = PrecisionConfig(params_dtype="bf16", fp8=FP8Config(enabled=True, recipe="tensorwise"))
    validate_layout(QWEN, P(tensor=2, expert=8, sequence_parallel=True), bf16_fp8, 16)
    # The tiny model's per-expert FFN (32) is fine for tensorwise but an ETP=4 shard (8) is not.
    with pytest.raises(ConfigError) as info:
        validate_layout(MOE, P(expert=2, expert_tensor=4), bf16_fp8, None)
    assert info.value.path == "precision.fp8.recipe" and "moe_intermediate_size/ETP = 8" in info.value.message
    # MXFP8 needs multiples of 32: a TP=2 attention shard of the tiny model is 2 heads * 16 = 32 (ok),
    # a TP=4 dense MLP shard of the dense model is 128/4 = 32 (ok), hidden 64 (ok); head_dim 8 breaks it.
    mx = PrecisionConfig(params_dtype="bf16", fp8=FP8Config(enabled=True, recipe="mxfp8"))
    validate_layout(DENSE, P(tensor=2), mx, 2)
    small_heads = dataclasses.replace(DENSE, head_dim=8)
    with pytest.raises(ConfigError, match="divisible by 32"):
        validate_layout(small_heads, P(tensor=2), mx, 2)
    with pytest.raises(ConfigError) as info:
        validate_layout(MOE, P(), PrecisionConfig(params_dtype="fp32", fp8=FP8Config(param_gather=True)), None)
    assert info.value.path == "precision.fp8.param_gather"


@pytest.mark.parametrize("parallel, expected", [
    (P(pipeline=2, virtual_pipeline=2), 2),
    (P(pipeline=4, virtual_pipeline=3), 3),
    (P(pipeline=2, virtual_pipeline=1), None),  # one chunk per rank is the plain 1F1B schedule
    (P(pipeline=2), None),
    (P(), None),
])
def test_megatron_gets_a_virtual_pipeline_size_only_for_two_or_more_chunks(parallel, expected):
    assert virtual_pipeline_size(parallel) == expected
    assert megatron_parallel_sizes(parallel)["virtual_pipeline_model_parallel_size"] == expected


def test_padded_vocab_size_follows_megatron_lm():
    odd = dataclasses.replace(DENSE, vocab_size=97)
    assert [odd.padded_vocab_size(tp) for tp in (1, 2, 4)] == [128, 256, 512]
    assert dataclasses.replace(odd, make_vocab_size_divisible_by=1).padded_vocab_size(2) == 98
    assert dataclasses.replace(odd, make_vocab_size_divisible_by=8).padded_vocab_size(1) == 104
    # Qwen3's 151936 = 128 * 1187 needs no padding at TP=1, and 152064 rows at TP=2 (as in Megatron-LM).
    assert QWEN.padded_vocab_size(1) == 151936 and QWEN.padded_vocab_size(2) == 152064


def test_moe_layer_pattern_follows_hf_rule():
    assert moe_layer_pattern(MOE) == [1, 1, 1, 1]
    assert moe_layer_pattern(DENSE) == [0, 0]
    assert moe_layer_pattern(dataclasses.replace(MOE, decoder_sparse_step=2)) == [0, 1, 0, 1]
    assert moe_layer_pattern(dataclasses.replace(MOE, mlp_only_layers=[0, 3])) == [0, 1, 1, 0]


def test_run_config_rejects_bad_layout(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {ROOT / 'configs/models/tiny_moe.yaml'}\nparallel:\n  tensor: 2\n  expert_tensor: 2\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(run)
    assert info.value.path == "parallel.sequence_parallel"
