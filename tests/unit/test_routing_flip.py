"""Routing flip rate: the trainer's top-k expert sets against the rollout engine's.

Pure functions: alignment with the packing, set comparison, response positions only, SP slices,
dense layers. The real train step under every layout: tests/multiproc/test_routing_flip_layouts.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vespo.train.routing import (
    count_flips, flip_metrics, moe_layer_rows, rollout_experts_shape, routed_positions, routed_shape,
)
from megatron_vespo.train.sample import TrainSample


def sample(prompt, response, routed=None) -> TrainSample:
    return TrainSample(prompt_ids=prompt, response_ids=response, rollout_logp=[0.0] * len(response), advantage=0.0,
                       rollout_routed_experts=routed)


class FakeRecorder:
    """The layer mapping of RouterRecorder without a model (RouterRecorder.layer_row's rules)."""

    def __init__(self, num_hidden_layers: int, mlp_only_layers=()):
        self.rows = moe_layer_rows(num_hidden_layers, mlp_only_layers)
        self.num_hidden_layers = num_hidden_layers

    def layer_row(self, layer: int, rollout_layers: int):
        from megatron_vespo.train.routing import RouterRecorder

        return RouterRecorder.layer_row(self, layer, rollout_layers)


def one_hot_sets(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(ids.shape[0], num_experts, dtype=torch.bool)
    return out.scatter_(1, ids, True)


def test_moe_layer_rows_skip_dense_layers():
    assert moe_layer_rows(4, []) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert moe_layer_rows(5, [0, 3]) == {1: 0, 2: 1, 4: 2}


def test_rollout_experts_shape_is_moe_layers_by_top_k():
    from pathlib import Path

    from megatron_vespo.config.loader import load_model_config

    models = Path(__file__).resolve().parents[2] / "configs" / "models"
    assert rollout_experts_shape(load_model_config(models / "qwen3_30b_a3b.yaml")) == (48, 8)
    assert rollout_experts_shape(load_model_config(models / "tiny_moe.yaml", ["mlp_only_layers=[0,2]"])) == (2, 2)


def test_driver_reads_unreported_rows_as_the_models_shape_only_when_unambiguous():
    """With dense layers an engine may give rows per MoE layer or per layer: no shape is imposed then."""
    from pathlib import Path

    from megatron_vespo.config.loader import load_model_config
    from megatron_vespo.train.routing import unreported_experts_shape

    models = Path(__file__).resolve().parents[2] / "configs" / "models"

    def fallback(path, *overrides):
        return unreported_experts_shape(load_model_config(models / path, list(overrides)))

    assert fallback("tiny_moe.yaml") == (4, 2)
    assert fallback("tiny_moe.yaml", "mlp_only_layers=[0,2]") is None
    assert fallback("tiny_dense.yaml") is None


def test_routed_positions_follow_the_packing_convention():
    # Sequence z = prompt ++ response; response token j is predicted at packed position offset + P - 1 + j.
    samples = [sample([1, 2, 3], [4, 5], np.array([[[0, 1]], [[2, 3]]])),
               sample([7], [8, 9, 10], np.array([[[4, 5]], [[6, 7]], [[0, 7]]]))]
    out = routed_positions(samples, [1, 0], num_tokens=10, layers=1, topk=2)  # packed in the order 1, 0
    assert out.shape == (10, 1, 2)
    assert out[0:3, 0].tolist() == [[4, 5], [6, 7], [0, 7]]  # sample 1 at offset 0, P=1: positions 0..2
    assert out[3:4].eq(-1).all()  # sample 1's last position predicts nothing
    assert out[4:6].eq(-1).all()  # sample 0's first two prompt positions
    assert out[6:8, 0].tolist() == [[0, 1], [2, 3]]  # offset 4, P=3: positions 6, 7
    assert out[8:].eq(-1).all()  # sample 0's last position, then padding


def test_routed_shape_reads_engine_layouts():
    assert routed_shape([sample([1], [2, 3, 4])], 4, 2) is None
    assert routed_shape([sample([1], [2, 3, 4], np.zeros((3, 4, 2)))], 4, 2) == (4, 2)
    # An engine that did not say its shape: [R, 1, layers * topk].
    assert routed_shape([sample([1], [2, 3, 4], np.zeros((3, 1, 8)))], 4, 2) == (4, 2)
    with pytest.raises(ValueError, match="not a multiple of top-k"):
        routed_shape([sample([1], [2, 3, 4], np.zeros((3, 1, 7)))], 4, 2)


def test_count_flips_compares_sets_on_response_positions_only():
    rollout = torch.tensor([[[0, 1]], [[2, 3]], [[1, 0]], [[3, 2]], [[-1, -1]]])  # [T=5, layers=1, k=2]
    trainer_ids = torch.tensor([[0, 1], [2, 0], [0, 1], [0, 1], [2, 3]])
    routing_map = one_hot_sets(trainer_ids, 4)
    loss_mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    counts = count_flips([(0, routing_map)], rollout, loss_mask, FakeRecorder(1))
    # pos 0 same set; pos 1 differs; pos 2 same set in another order; pos 3 differs but is not a
    # response position; pos 4 has no rollout experts.
    assert counts.tolist() == [1.0, 3.0]
    assert flip_metrics(counts)["mismatch/routing_flip_rate"] == pytest.approx(1 / 3)
    assert "mismatch/routing_flip_rate" not in flip_metrics(torch.zeros(2))


def test_count_flips_sequence_parallel_slices_and_dense_layers():
    # 2 MoE rows (layers 1 and 2 of 3; layer 0 is dense). TP rank 1 holds positions 2..3 under SP.
    rollout = torch.tensor([[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[2, 3], [0, 1]], [[2, 3], [2, 3]]])
    loss_mask = torch.ones(4)
    recorder = FakeRecorder(3, mlp_only_layers=[0])
    local = one_hot_sets(torch.tensor([[2, 3], [0, 1]]), 4)  # positions 2, 3
    records = [(0, local), (1, local), (2, local)]  # the dense layer never has a router; ignored if seen
    counts = count_flips(records, rollout, loss_mask, recorder, tp_rank=1)
    # layer 1 -> row 0: pos 2 same, pos 3 differs; layer 2 -> row 1: pos 2 differs, pos 3 differs.
    assert counts.tolist() == [3.0, 4.0]


def test_rollout_sample_keeps_the_response_positions_of_the_engine_experts():
    from megatron_vespo.driver.rollout import response_routed_experts
    from rollout_sglang.types import FinishReason, Sample

    prompt_len, out_ids = 3, [7, 8]
    # The engine's rows: positions 0 .. P + R - 2 (the last sampled token is never fed forward).
    engine = np.arange(4 * 2 * 2, dtype=np.int32).reshape(4, 2, 2) % 200
    sample = Sample(rid="r", prompt_ids=[1, 2, 3], output_ids=out_ids, output_logprobs=[-1.0, -1.0],
                    finish_reason=FinishReason("length", length=2), weight_version="0", prompt_tokens=3,
                    completion_tokens=2, routed_experts=engine)
    kept = response_routed_experts(sample, prompt_len)
    assert kept.dtype == np.uint8 and kept.tolist() == engine[2:4].tolist()  # positions P-1, P
    sample.routed_experts = engine[:3]
    with pytest.raises(ValueError, match="3 routed positions, expected 4"):
        response_routed_experts(sample, prompt_len)
    sample.routed_experts = None
    with pytest.raises(ValueError, match="no routed experts"):
        response_routed_experts(sample, prompt_len)
