"""CUDA-IPC weight transport: the parts that run without a GPU.

The payload goes through the same serializer as on a GPU (``serialize_for_sglang``: ForkingPickler;
CPU tensors become shared-memory handles instead of CUDA-IPC ones) and is read back with an unpickler
that allows what SGLang's ``SafeUnpickler`` allows, then rebuilt the way both generations of SGLang's
``FlattenedTensorBucket`` rebuild it. The end-to-end path (a real SGLang engine mapping our CUDA
memory) is tests/gpu/test_sglang_server.py.
"""
from __future__ import annotations

import base64
import io
import pickle

import pytest
import torch

from rollout_sglang.config import FleetConfig, WeightSyncConfig
from rollout_sglang.errors import WeightSyncError
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync import make_weight_sync
from rollout_sglang.weight_sync.common import one_dtype_buckets, with_last
from rollout_sglang.weight_sync.ipc import (
    IPCWeightSync, engine_sees, ipc_update_payload, physical_gpu, serialize_for_sglang,
)
from typed_config import build

# What SGLang's SafeUnpickler (sglang.srt.utils.common) lets a weight payload reference.
SGLANG_ALLOWED_PREFIXES = ("builtins.", "collections.", "copyreg.", "functools.", "itertools.", "operator.", "types.",
                           "weakref.", "torch.", "multiprocessing.resource_sharer.", "multiprocessing.reduction.",
                           "pickletools.")


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str):
        self.globals_seen.append(f"{module}.{name}")
        if not any((module + ".").startswith(p) for p in SGLANG_ALLOWED_PREFIXES):
            raise pickle.UnpicklingError(f"blocked {module}.{name}")
        return super().find_class(module, name)


def deserialize_like_sglang(payload: str):
    unpickler = AllowListUnpickler(base64.b64decode(payload, validate=True))
    return unpickler.load(), unpickler.globals_seen


def named_weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(16, 8, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8, generator=g)),
        ("model.layers.0.mlp.gate.weight", torch.randn(4, 8, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.experts.0.up_proj.weight", torch.randn(6, 8, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(8, generator=g)),
        ("lm_head.weight", torch.randn(16, 8, generator=g)),
    ]


def test_bucket_plan_bounds_size_never_mixes_dtypes_and_keeps_order():
    weights = named_weights()
    buckets = list(one_dtype_buckets([weights[:3], weights[3:]], bucket_bytes=600))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in weights]
    for bucket in buckets:
        assert len({t.dtype for _, t in bucket}) == 1
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= 600
    # 512 B embedding alone (q_proj would overflow), q_proj; both bf16 together; norm + lm_head (544 B) together.
    assert [[n.split(".")[-2] for n, _ in b] for b in buckets] == [
        ["embed_tokens"], ["q_proj"], ["gate", "up_proj"], ["norm", "lm_head"]]


@pytest.mark.parametrize("rebuild", ["uint8_view", "per_dtype_cast"])
def test_flattened_payload_round_trip_through_the_sglang_allow_list(rebuild):
    weights = named_weights()
    restored = []
    for bucket in one_dtype_buckets([weights], bucket_bytes=1 << 20):
        payload, keep_alive = ipc_update_payload(bucket, flattened=True)
        assert len(keep_alive) == 1 and keep_alive[0] is payload["flattened_tensor"]
        obj, seen = deserialize_like_sglang(serialize_for_sglang(payload))
        assert not any(g.startswith("rollout_sglang") for g in seen), seen
        flat = obj["flattened_tensor"]
        for meta in obj["metadata"]:  # attribute access, as SGLang's FlattenedTensorMetadata conversion does
            piece = flat[meta.start_idx:meta.end_idx]
            if rebuild == "uint8_view":  # SGLang >= 0.5 (supports_multi_dtypes): view as the dtype, reshape
                tensor = piece.view(meta.dtype).reshape(meta.shape)
            else:  # older SGLang: reshape, then cast if the bucket dtype differs
                tensor = piece.reshape(meta.shape).to(meta.dtype)
            assert meta.numel == tensor.numel()
            restored.append((meta.name, tensor))
    assert [n for n, _ in restored] == [n for n, _ in weights]
    for (_, want), (_, got) in zip(weights, restored):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_per_tensor_payload_round_trip():
    weights = named_weights()
    payload, keep_alive = ipc_update_payload(weights, flattened=False)
    obj, seen = deserialize_like_sglang(serialize_for_sglang(payload))
    assert not any(g.startswith("rollout_sglang") for g in seen)
    assert [n for n, _ in obj] == [n for n, _ in weights]
    assert all(torch.equal(got, want) and got.dtype == want.dtype for (_, got), (_, want) in zip(obj, weights))
    assert len(keep_alive) == len(weights)


def test_flattened_payload_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        ipc_update_payload(named_weights(), flattened=True)


def test_the_engine_must_see_the_trainers_gpu():
    assert physical_gpu(None, 1) == "1" and physical_gpu("4,6", 1) == "6" and physical_gpu("GPU-a, GPU-b", 0) == "GPU-a"
    assert engine_sees(None, "6")  # inherits the trainer's devices
    assert engine_sees("6,7", "6") and not engine_sees("7", "6")


def test_with_last_marks_only_the_final_bucket():
    assert list(with_last([])) == []
    assert list(with_last("abc")) == [("a", False), ("b", False), ("c", True)]


def test_ipc_config():
    cfg = build(WeightSyncConfig, {"transport": "ipc"})
    assert cfg.transport == "ipc" and cfg.ipc_flattened_bucket
    with pytest.raises(Exception, match="transport"):
        build(WeightSyncConfig, {"transport": "shm"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_ipc_refuses_without_cuda(tmp_path):
    fleet = Fleet(build(FleetConfig, {"servers": [{"model_path": str(tmp_path)}], "log_dir": str(tmp_path)}))
    cfg = build(WeightSyncConfig, {"transport": "ipc"})
    with pytest.raises(WeightSyncError, match="CUDA IPC needs a CUDA device"):
        IPCWeightSync(fleet, cfg)
    with pytest.raises(WeightSyncError, match="transport=ipc"):
        make_weight_sync(fleet, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_nccl_broadcast_refuses_without_cuda(tmp_path):
    """NCCL sends CUDA tensors only; the weights the trainer exports are CPU tensors the transport moves."""
    from rollout_sglang.weight_sync import DistributedWeightSync

    fleet = Fleet(build(FleetConfig, {"servers": [{"model_path": str(tmp_path)}], "log_dir": str(tmp_path)}))
    with pytest.raises(WeightSyncError, match="backend=nccl: NCCL sends from a CUDA device"):
        DistributedWeightSync(fleet, build(WeightSyncConfig, {"transport": "distributed", "backend": "nccl"}))
