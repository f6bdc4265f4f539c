"""optimizer.cpu_offload on a GPU: the same updates as the on-device optimizer (Megatron's
HybridDeviceOptimizer steps the state in host memory). Skips, with the reason, without CUDA or
Transformer Engine (Megatron offloads through its precision-aware path, which needs TE); on a
machine without a GPU the option is refused (tests/unit/test_planning.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_vespo.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def _skip_reason() -> str:
    from megatron_vespo.models.provider import te_available

    if not torch.cuda.is_available():
        return "no CUDA device: optimizer offload moves GPU state to host memory"
    if not te_available():
        return "Transformer Engine is not installed (Megatron's offload path needs it)"
    return ""


@pytest.fixture(scope="module")
def single_process():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from megatron_vespo.config.schema import ParallelConfig
    from megatron_vespo.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _two_steps(offload: bool) -> tuple[dict, dict]:
    from megatron.core import tensor_parallel

    from megatron_vespo.models.trainable import build_model_and_optimizer

    cfg = load_run_config(data={"model": str(ROOT / "configs/models/tiny_moe.yaml"),
                                "precision": {"params_dtype": "bf16"},
                                "optimizer": {"lr": 1e-3, "cpu_offload": offload}})
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    trainable = build_model_and_optimizer(cfg)
    model = trainable.model[0]
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for step in range(2):
        trainable.zero_grad()
        gen = torch.Generator().manual_seed(5 + step)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 64), generator=gen).cuda()
        logits = model(tokens, torch.arange(64, device="cuda")[None], None)
        logits.float().pow(2).mean().backward()
        trainable.optimizer.step()
    after = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return before, after


def test_offloaded_optimizer_makes_the_same_updates(single_process):
    before, plain = _two_steps(offload=False)
    before_off, offloaded = _two_steps(offload=True)
    for name in before:
        assert torch.equal(before[name], before_off[name]), name
        update, update_off = plain[name] - before[name], offloaded[name] - before[name]
        scale = update.abs().max().item() or 1.0
        # bf16 weights: the same fp32 update may round to neighbouring bf16 values.
        assert (update - update_off).abs().max().item() <= 2e-2 * scale + 1e-2 * before[name].abs().max().item(), name
