"""Model provider: Hugging Face-style model YAML -> Megatron TransformerConfig and GPTModel."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_vespo.config import ConfigError, load_model_config
from megatron_vespo.config.schema import FP8Config, ParallelConfig, PrecisionConfig, RunConfig
from megatron_vespo.models.provider import build_transformer_config, te_available

ROOT = Path(__file__).resolve().parents[2]
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")
DENSE = load_model_config(ROOT / "configs/models/tiny_dense.yaml")
FP32 = PrecisionConfig(params_dtype="fp32")


def test_qwen3_moe_fields_map_onto_transformer_config():
    c = build_transformer_config(MOE, ParallelConfig(), FP32)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (4, 64, 128)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 16)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == MOE.rms_norm_eps
    assert c.qk_layernorm and c.gated_linear_unit and c.activation_func is F.silu
    assert not c.add_bias_linear and not c.add_qkv_bias
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (8, 2, 32)
    assert c.moe_router_dtype == "fp32" and c.moe_router_score_function == "softmax"
    assert c.moe_router_pre_softmax is False  # norm_topk_prob: true
    assert c.moe_router_load_balancing_type == "none" and c.moe_aux_loss_coeff == 0.0
    assert c.moe_layer_freq == [1, 1, 1, 1]
    assert c.params_dtype == torch.float32 and not c.bf16


def test_norm_topk_prob_false_softmaxes_over_all_experts():
    c = build_transformer_config(dataclasses.replace(MOE, norm_topk_prob=False), ParallelConfig(), FP32)
    assert c.moe_router_pre_softmax is True


def test_aux_loss_dense_layers_bias_and_precision():
    model = dataclasses.replace(MOE, router_aux_loss_coef=0.001, mlp_only_layers=[0], attention_bias=True)
    c = build_transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="bf16"))
    assert c.moe_router_load_balancing_type == "aux_loss" and c.moe_aux_loss_coeff == 0.001
    assert c.moe_layer_freq == [0, 1, 1, 1]
    assert c.add_qkv_bias
    assert c.bf16 and c.params_dtype == torch.bfloat16 and c.pipeline_dtype == torch.bfloat16
    dense = build_transformer_config(DENSE, ParallelConfig(tensor=2), FP32)
    assert dense.num_moe_experts is None and dense.tensor_model_parallel_size == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU configuration rules")
def test_cpu_rules():
    assert not te_available()
    c = build_transformer_config(MOE, ParallelConfig(tensor=2, expert_tensor=2, sequence_parallel=True), FP32)
    assert c.use_cpu_initialization
    assert not (c.gradient_accumulation_fusion or c.apply_rope_fusion or c.bias_activation_fusion
                or c.moe_permute_fusion or c.moe_grouped_gemm)
    assert c.moe_token_dispatcher_type == "alltoall" and c.sequence_parallel
    fp8 = PrecisionConfig(params_dtype="bf16", fp8=FP8Config(enabled=True))
    with pytest.raises(ConfigError) as info:
        build_transformer_config(MOE, ParallelConfig(), fp8)
    assert info.value.path == "precision.fp8.enabled"
    with pytest.raises(ConfigError) as info:
        build_transformer_config(MOE, ParallelConfig(context=2), FP32)
    assert info.value.path == "parallel.context"


def test_layout_is_validated_by_the_provider():
    with pytest.raises(ConfigError) as info:
        build_transformer_config(MOE, ParallelConfig(expert=3), FP32)
    assert info.value.path == "parallel.expert"


# ------------------------------------------------------------------------------------------
# Building real models (one process, gloo)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process():
    from megatron_vespo.distributed import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(collective_timeout_minutes=7), seed=1234)
    yield ctx
    destroy_distributed()


def test_collective_timeout_reaches_every_group(single_process):
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state

    groups = {"world": dist.group.WORLD, "tensor": parallel_state.get_tensor_model_parallel_group(),
              "expert": parallel_state.get_expert_model_parallel_group(),
              "data": parallel_state.get_data_parallel_group()}
    for name, group in groups.items():
        assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(minutes=7), name


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_gpt_model_shapes_and_parameter_count(single_process):
    from megatron_vespo.models.provider import build_gpt_model

    m = MOE
    model = build_gpt_model(RunConfig(model=m, precision=FP32))
    h, v, L, kv = m.hidden_size, m.vocab_size, m.num_hidden_layers, m.kv_channels
    attn = h * (m.num_attention_heads + 2 * m.num_key_value_heads) * kv + m.num_attention_heads * kv * h
    norms = 2 * h + 2 * kv  # input + pre-MLP RMSNorm, q/k norms
    moe = m.num_experts * 3 * h * m.moe_intermediate_size + m.num_experts * h  # experts + router
    expected = 2 * v * h + L * (attn + norms + moe) + h  # untied embedding/output, final norm
    assert _count(model) == expected

    tokens = torch.randint(0, v, (2, 8))
    logits = model(input_ids=tokens, position_ids=torch.arange(8).expand(2, 8), attention_mask=None)
    assert logits.shape == (2, 8, v) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None or p.main_grad is not None for p in model.parameters() if p.requires_grad)

    tied = build_gpt_model(RunConfig(model=DENSE, precision=FP32))
    assert tied.share_embeddings_and_output_weights and tied.output_layer.weight is None
    assert _count(tied) == DENSE.vocab_size * DENSE.hidden_size + DENSE.num_hidden_layers * (
        DENSE.hidden_size * (4 + 2 * 2) * 16 + 4 * 16 * DENSE.hidden_size
        + 3 * DENSE.hidden_size * DENSE.intermediate_size + 2 * DENSE.hidden_size + 2 * 16
    ) + DENSE.hidden_size


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_hf_qwen3_moe_rule(single_process, norm_topk_prob):
    """HF Qwen3-MoE: softmax over all experts in fp32, top-k, renormalise iff norm_topk_prob."""
    from megatron_vespo.models.provider import build_gpt_model

    model = build_gpt_model(RunConfig(model=dataclasses.replace(MOE, norm_topk_prob=norm_topk_prob), precision=FP32))
    router = model.decoder.layers[0].mlp.router
    hidden = torch.randn(6, 1, MOE.hidden_size)
    probs, routing_map = router(hidden)
    scores = torch.softmax(hidden.reshape(-1, MOE.hidden_size) @ router.weight.t(), dim=-1)
    top, idx = scores.topk(MOE.num_experts_per_tok, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    expected = torch.zeros_like(scores).scatter(1, idx, top)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert routing_map.sum(-1).eq(MOE.num_experts_per_tok).all()


def test_full_state_roundtrip(single_process):
    from megatron_vespo.models.full_state import load_full_state_dict
    from megatron_vespo.models.provider import build_gpt_model
    from tests.model_state import gather_full_state_dict

    cfg = RunConfig(model=MOE, precision=FP32)
    a, b = build_gpt_model(cfg), build_gpt_model(cfg)
    full = gather_full_state_dict(a)
    assert full["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].shape == (8, 2 * 32, 64)
    assert sum(t.numel() for t in full.values()) == _count(a)
    assert any(not torch.equal(full[k], v) for k, v in gather_full_state_dict(b).items())
    load_full_state_dict(b, full)
    for key, value in gather_full_state_dict(b).items():
        assert torch.equal(value, full[key]), key
    bad = dict(full)
    bad["output_layer.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="output_layer.weight"):
        load_full_state_dict(b, bad)
    del bad["output_layer.weight"]
    with pytest.raises(KeyError, match="output_layer.weight"):
        load_full_state_dict(b, bad)
