"""Weight payloads and routed experts through SGLang's own code.

- CUDA-IPC payloads (``/update_weights_from_tensor``): one payload per engine TP rank, each read by
  that rank with SGLang's deserializer (its safe unpickler) and, flattened, rebuilt by its
  ``FlattenedTensorBucket``; the tensors come back bit for bit. Here the tensors are CPU tensors
  (shared memory instead of CUDA-IPC handles); the pickling path is the same.
- Flattened broadcast buckets (``/update_weights_from_distributed``): received the way SGLang's
  distributed updater allocates and rebuilds them; SGLang refuses a bucket whose tensors sit at byte
  offsets their dtype cannot be read at, which the transport's buckets (one dtype each) never have.
- Routed experts encoded by SGLang's detokenizer decode to the same (tokens, layers, top-k) ids.
"""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from rollout_sglang.types import decode_routed_experts
from rollout_sglang.weight_sync.common import flatten_bucket, one_dtype_buckets
from rollout_sglang.weight_sync.ipc import ipc_update_payload, per_rank_payloads, serialize_for_sglang

from .conftest import tensor_in


def weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(16, 8, generator=g)),
        ("model.layers.0.mlp.gate.weight", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 15 elements: odd
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8, generator=g)),
        ("model.layers.0.mlp.experts.0.up_proj.weight", torch.randn(6, 8, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(8, generator=g)),
    ]


def assert_same(got: list, want: list) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, spec), (_, tensor) in zip(got, want):
        back = tensor_in(spec)
        assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor), name


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened", "per_tensor"])
def test_ipc_payload_per_tp_rank_round_trips_through_sglang(sglang, flattened):
    named = weights()
    restored = []
    for bucket in one_dtype_buckets([named], bucket_bytes=1 << 20):
        payload, keep_alive = ipc_update_payload(bucket, flattened=flattened)
        per_rank = per_rank_payloads(payload, 2)  # what IPCWeightSync sends an engine of TP 2
        for rank in (0, 1):
            answer = sglang.ask("tensor_payload", serialized_named_tensors=per_rank, tp_rank=rank, flattened=flattened)
            if rank == 0:
                restored += answer["tensors"]
            else:
                assert_same(answer["tensors"], bucket)
        del keep_alive
    assert_same(restored, named)


def test_a_payload_shared_by_all_ranks_breaks_on_the_second_rank(sglang):
    """Why one serialization per rank: a shared handle is taken by the first rank that reads it."""
    payload, keep_alive = ipc_update_payload(weights()[:1], flattened=False)
    shared = [serialize_for_sglang(payload)] * 2
    sglang.ask("tensor_payload", serialized_named_tensors=shared, tp_rank=0, flattened=False)
    with pytest.raises(AssertionError, match="SGLang's side raised"):
        sglang.ask("tensor_payload", serialized_named_tensors=shared, tp_rank=1, flattened=False)
    del keep_alive


def test_flattened_broadcast_buckets_are_received_as_sglang_does(sglang):
    named = weights()
    received = []
    for bucket in one_dtype_buckets([named], bucket_bytes=1 << 20):
        answer = sglang.ask("flattened_receive", names=[n for n, _ in bucket],
                            dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
                            shapes=[list(t.shape) for _, t in bucket],
                            b64=base64.b64encode(flatten_bucket(bucket).numpy().tobytes()).decode())
        received += answer["tensors"]
    assert_same(received, named)


def test_a_mixed_dtype_bucket_is_refused_by_sglang(sglang):
    """Why buckets are cut per dtype: after 15 bf16 elements (30 bytes) an fp32 tensor is unaligned."""
    named = weights()[:3]
    with pytest.raises(AssertionError, match="Unaligned received tensor"):
        sglang.ask("flattened_receive", names=[n for n, _ in named],
                   dtypes=[str(t.dtype).removeprefix("torch.") for _, t in named], shapes=[list(t.shape) for _, t in named],
                   b64=base64.b64encode(flatten_bucket(named).numpy().tobytes()).decode())


@pytest.mark.parametrize("shape", [(4, 2), None], ids=["shape_known", "shape_unreported"])
def test_routed_experts_encoded_by_sglang_decode(sglang, shape):
    tokens, layers, topk = 7, 4, 2
    experts = (np.arange(tokens * layers * topk, dtype=np.int32) % 128).reshape(tokens, layers, topk)
    encoded = sglang.ask("encode_routed_experts", dtype="int32", shape=list(experts.shape),
                         b64=base64.b64encode(experts.tobytes()).decode())["encoded"]
    decoded = decode_routed_experts(encoded, "sglang", tokens, shape)
    if shape is None:  # SGLang does not report the shape: rows of layers x top-k ids
        assert decoded.shape == (tokens, 1, layers * topk)
        decoded = decoded.reshape(tokens, layers, topk)
    assert np.array_equal(decoded, experts)
