"""The CPU platform layer: applied exactly when CUDA is absent, idempotent, and each patch works."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_vespo import platform
from megatron_vespo.platform import cpu

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches are never applied with CUDA")


def test_decision_follows_cuda_availability():
    assert cpu.should_patch(cuda_available=True) is False
    assert cpu.should_patch(cuda_available=False) is True
    assert cpu.should_patch() is (not torch.cuda.is_available())


def test_apply_is_a_no_op_when_cuda_is_available():
    # A fresh interpreter that believes CUDA is present: no CPU patch, only the pipeline fix every
    # platform needs.
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        original = (torch.cuda.Stream, torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
        from megatron_vespo import platform
        assert platform.apply() == [], platform.applied_patches()
        assert platform.applied_patches() == []
        assert (torch.cuda.Stream, torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type) == original
        from megatron_vespo.platform.pipeline_p2p import pipeline_p2p_fix_applied
        assert pipeline_p2p_fix_applied()
        from megatron_vespo.platform.router_replay import router_replay_patch_applied
        assert router_replay_patch_applied()  # routing replay's extension: every platform too
        print("untouched")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "untouched" in out.stdout


@needs_cpu_only
def test_apply_on_cpu_is_idempotent_and_complete():
    first = platform.apply()
    from megatron.core.tensor_parallel import mappings

    forward = mappings._AllToAll.forward
    second = platform.apply()
    assert first == second == platform.applied_patches()
    assert [name for name, _ in cpu._PATCHES] == first
    assert mappings._AllToAll.forward is forward  # not wrapped twice


@needs_cpu_only
def test_megatron_imports_without_compiling_and_compiles_on_first_call():
    """Megatron-Core's @jit_fuser kernels are not run through torch.compile at import (which would import
    TorchDynamo and Inductor); the first call of one compiles it with the real torch.compile."""
    code = textwrap.dedent("""
        import sys, torch
        real = torch.compile
        from megatron_vespo import platform
        platform.apply()
        assert torch.compile is real
        assert "torch._dynamo" not in sys.modules and "torch._inductor" not in sys.modules
        from megatron.core.fusions import fused_bias_geglu
        compiled = []
        torch.compile = lambda fn, **kw: compiled.append(fn) or fn  # record, run eagerly
        y = torch.randn(4, 6)
        out = fused_bias_geglu.geglu(y)
        assert compiled and compiled[0].__name__ == "geglu"
        a, b = y.chunk(2, -1)
        assert torch.allclose(out, torch.nn.functional.gelu(a, approximate="tanh") * b, atol=1e-6)
        print("deferred")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "deferred" in out.stdout


@needs_cpu_only
def test_cuda_device_means_cpu():
    platform.apply()
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.ones(3)
    assert t.cuda().device.type == "cpu"
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    assert torch.cuda.current_stream() == stream  # one logical stream: no cross-stream waits needed

    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)  # hard-coded device="cuda" inside Megatron
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert mask.tolist()[0] == [False, True, True, True]
    # torch itself is untouched: only Megatron's modules see the CPU-device view.
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


@needs_cpu_only
def test_rng_tracker_uses_cpu_generator():
    platform.apply()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before)  # default stream restored
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced
    with tracker.fork(mrandom.get_expert_parallel_rng_tracker_name()):
        c = torch.rand(4)
    assert not torch.equal(a, c)  # a different named stream

    mrandom.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # reseeding reproduces the stream


@needs_cpu_only
def test_type_names_are_cuda_only_inside_the_optimizer():
    platform.apply()
    assert torch.ones(1).type() == "torch.FloatTensor"
    with cpu._cpu_tensors_report_cuda_type_names():
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.ones(1).type() == "torch.FloatTensor"


@needs_cpu_only
def test_torch_norm_accepts_sequence_parallel_and_tags_weights():
    platform.apply()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                use_cpu_initialization=True)
    # TransformerConfig's own validation would reject SP with TP=1, so set it after construction.
    config = TransformerConfig(**base)
    config.sequence_parallel = True
    norm = WrappedTorchNorm(config=config, hidden_size=8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(p.sequence_parallel for p in norm.parameters())
    assert config.sequence_parallel  # the caller's config is not modified
    plain = WrappedTorchNorm(config=TransformerConfig(**base), hidden_size=8, eps=1e-6)
    assert not any(p.sequence_parallel for p in plain.parameters())


@needs_cpu_only
def test_moe_router_gemm_name_is_bound():
    platform.apply()
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None or callable(moe_utils.te_general_gemm)
