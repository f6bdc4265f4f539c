"""The declarative HF <-> Megatron mapping of Qwen3 / Qwen3-MoE.

The HF side is checked against what transformers' ``save_pretrained`` really writes; the Megatron
side against the real model's ``sharded_state_dict()`` in ``tests/multiproc/test_hf_parity.py``
(which needs a process group), and against hand-computed layouts here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_vespo.checkpoint.hf_io import SafetensorsReader, hf_config_from_model
from megatron_vespo.checkpoint.hf_mapping import (
    MappingError, Qwen3Mapping, Transform, detect_stacked_layers,
)
from megatron_vespo.config import load_model_config

ROOT = Path(__file__).resolve().parents[2]
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")
DENSE = load_model_config(ROOT / "configs/models/tiny_dense.yaml")


def _saved_hf_tensors(model_cfg, tmp_path: Path) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_from_model(model_cfg, torch.float32)))
    model.save_pretrained(tmp_path)
    reader = SafetensorsReader(tmp_path)
    return {name: reader.info(name).shape for name in reader.names()}


@pytest.mark.parametrize("model_cfg", [MOE, DENSE, dataclasses.replace(MOE, mlp_only_layers=[0, 2])],
                         ids=["moe", "dense_tied", "moe_with_dense_layers"])
def test_hf_names_and_shapes_are_what_transformers_saves(model_cfg, tmp_path):
    assert Qwen3Mapping(model_cfg).hf_tensors() == _saved_hf_tensors(model_cfg, tmp_path)


def test_megatron_layout_of_a_moe_model():
    mapping = Qwen3Mapping(MOE)
    shapes = mapping.dist_tensors()
    assert shapes["embedding.word_embeddings.weight"] == (128, 64)
    assert shapes["output_layer.weight"] == (128, 64)
    assert shapes["decoder.layers.3.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert shapes["decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"] == (64,)
    assert shapes["decoder.layers.3.self_attention.q_layernorm.weight"] == (16,)
    assert shapes["decoder.layers.0.mlp.router.weight"] == (8, 64)
    assert shapes["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"] == (8, 64, 64)  # [E, 2F, H]
    assert shapes["decoder.layers.0.mlp.experts.experts.linear_fc2.weight"] == (8, 64, 32)
    # The pre-MLP norm under the local/fused key and the TE spec's separate-norm key.
    assert shapes["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"] == (64,)
    assert shapes["decoder.layers.1.pre_mlp_layernorm.weight"] == (64,)
    expert = mapping.unit_for_hf("model.layers.2.mlp.experts.5.up_proj.weight")
    assert (expert.key, expert.prefix, expert.shape) == ("decoder.layers.2.mlp.experts.experts.linear_fc1.weight",
                                                         (5,), (64, 64))
    objects = {o.unique_key for o in mapping.extra_states}
    assert "decoder.layers.2.mlp.experts.experts.linear_fc1._extra_state/shard_5_8" in objects
    assert "decoder.layers.2.self_attention.linear_qkv._extra_state/shard_0_1" in objects
    assert len(objects) == 4 * (2 + 2 * 8)


def test_megatron_layout_of_a_dense_tied_model_stacks_layers():
    mapping = Qwen3Mapping(DENSE)
    shapes = mapping.dist_tensors()
    assert "output_layer.weight" not in shapes and "lm_head.weight" not in mapping.hf_tensors()
    assert shapes["decoder.layers.mlp.linear_fc1.weight"] == (2, 256, 64)  # [L, gate+up, H]
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (2, 128, 64)
    assert not any("pre_mlp_layernorm" in k for k in shapes)  # dense layers fuse the norm into fc1
    unit = mapping.unit_for_hf("model.layers.1.mlp.down_proj.weight")
    assert (unit.key, unit.prefix) == ("decoder.layers.mlp.linear_fc2.weight", (1,))
    assert mapping.unit_at("decoder.layers.mlp.linear_fc2.weight", (1,)) is unit
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_1_2" in {o.unique_key for o in mapping.extra_states}
    per_layer = Qwen3Mapping(DENSE, stacked_layers=False).dist_tensors()
    assert per_layer["decoder.layers.1.mlp.linear_fc1.weight"] == (256, 64)


def test_vocabulary_is_padded_in_megatron_only():
    """Megatron's vocabulary tensors hold vocab_size rounded up to make_vocab_size_divisible_by x TP rows;
    the units (and HF tensors) keep the real vocabulary."""
    odd = dataclasses.replace(MOE, vocab_size=97)
    for tp, rows in ((1, 128), (2, 256)):
        mapping = Qwen3Mapping(odd, tensor_parallel=tp)
        shapes = mapping.dist_tensors()
        assert shapes["embedding.word_embeddings.weight"] == shapes["output_layer.weight"] == (rows, 64)
        assert mapping.vocab_padding_rows("output_layer.weight") == (97, rows - 97)
        assert mapping.vocab_padding_rows("decoder.final_layernorm.weight") is None
        assert mapping.hf_tensors()["model.embed_tokens.weight"] == mapping.hf_tensors()["lm_head.weight"] == (97, 64)
        assert mapping.unit_for_hf("lm_head.weight").shape == (97, 64)
    assert Qwen3Mapping(MOE, tensor_parallel=2).vocab_padding_rows("embedding.word_embeddings.weight") == (128, 128)
    unpadded = Qwen3Mapping(dataclasses.replace(odd, make_vocab_size_divisible_by=1))
    assert unpadded.dist_tensors()["embedding.word_embeddings.weight"] == (97, 64)
    assert unpadded.vocab_padding_rows("embedding.word_embeddings.weight") is None


def test_qkv_is_interleaved_per_query_group():
    cfg = dataclasses.replace(MOE, hidden_size=3, num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    mapping = Qwen3Mapping(cfg)
    unit = mapping.unit_for_hf("model.layers.0.self_attn.q_proj.weight")
    assert unit.transform is Transform.QKV
    # Row r of q/k/v holds 100*r + {1000: q, 2000: k, 3000: v}.
    q = (1000 + 100 * torch.arange(8.0))[:, None].expand(8, 3)
    k = (2000 + 100 * torch.arange(4.0))[:, None].expand(4, 3)
    v = (3000 + 100 * torch.arange(4.0))[:, None].expand(4, 3)
    names = unit.hf_names
    qkv = mapping.hf_to_megatron(unit, dict(zip(names, (q, k, v))))
    expected_rows = [1000, 1100, 1200, 1300, 2000, 2100, 3000, 3100,   # group 0: q heads 0-1, k0, v0
                     1400, 1500, 1600, 1700, 2200, 2300, 3200, 3300]   # group 1: q heads 2-3, k1, v1
    assert qkv[:, 0].tolist() == expected_rows
    back = dict(mapping.megatron_to_hf(unit, qkv))
    assert all(torch.equal(back[n], t) for n, t in zip(names, (q, k, v)))


def test_gate_and_up_fuse_as_gate_then_up():
    mapping = Qwen3Mapping(MOE)
    unit = mapping.unit_for_hf("model.layers.0.mlp.experts.3.gate_proj.weight")
    gate, up = torch.zeros(32, 64), torch.ones(32, 64)
    fc1 = mapping.hf_to_megatron(unit, {unit.hf_names[0]: gate, unit.hf_names[1]: up})
    assert torch.equal(fc1[:32], gate) and torch.equal(fc1[32:], up)
    assert mapping.unit_for_hf("model.layers.0.mlp.gate.weight").key == "decoder.layers.0.mlp.router.weight"


@pytest.mark.parametrize("model_cfg", [MOE, DENSE], ids=["moe", "dense"])
def test_every_unit_round_trips_bitwise(model_cfg):
    mapping = Qwen3Mapping(model_cfg)
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in mapping.hf_tensors().items()}
    seen = set()
    for unit in mapping.units:
        megatron = mapping.hf_to_megatron(unit, hf)
        assert tuple(megatron.shape) == unit.shape and megatron.dtype == torch.bfloat16
        for name, tensor in mapping.megatron_to_hf(unit, megatron):
            assert torch.equal(tensor, hf[name]) and tensor.is_contiguous()
            seen.add(name)
    assert seen == set(hf)


def test_bad_tensors_are_named():
    mapping = Qwen3Mapping(MOE)
    with pytest.raises(MappingError, match=r"experts\.8\.up_proj.*8 experts"):
        mapping.unit_for_hf("model.layers.0.mlp.experts.8.up_proj.weight")
    unit = mapping.unit_for_hf("model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(MappingError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: shape \(64, 32\)"):
        mapping.hf_to_megatron(unit, {unit.hf_names[0]: torch.zeros(64, 32)})
    qkv = mapping.unit_for_hf("model.layers.1.self_attn.q_proj.weight")
    parts = {n: torch.zeros(s, dtype=torch.float32 if "k_proj" in n else torch.bfloat16)
             for n, s in zip(qkv.hf_names, qkv.hf_shapes)}
    with pytest.raises(MappingError, match="mixed dtypes"):
        mapping.hf_to_megatron(qkv, parts)
    with pytest.raises(MappingError, match="missing"):
        mapping.hf_to_megatron(qkv, {})
    with pytest.raises(MappingError, match="no HF tensor maps"):
        mapping.unit_at("decoder.layers.9.mlp.router.weight")
    with pytest.raises(MappingError, match="attention_bias"):
        Qwen3Mapping(dataclasses.replace(MOE, attention_bias=True))


def test_stacked_layer_keys_are_detected():
    assert detect_stacked_layers(["embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc1.weight"])
    assert not detect_stacked_layers(["decoder.final_layernorm.weight", "decoder.layers.0.mlp.router.weight"])
    with pytest.raises(MappingError):
        detect_stacked_layers(["optimizer.state.exp_avg"])
