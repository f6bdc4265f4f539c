"""Activation recomputation (``train.recompute``): config rules, and gradients equal to none.

The model is built through the project's provider from a RunConfig, so the test covers the path
training takes. Each case also counts forward calls of the recomputed module: a recompute that
silently did nothing would leave the gradients equal too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_vespo.config import ConfigError, load_model_config
from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RecomputeConfig, RunConfig, TrainConfig
from typed_config import build

ROOT = Path(__file__).resolve().parents[2]
# One dense layer first, so that both 'mlp' and 'moe' have something to recompute.
MOE = dataclasses.replace(load_model_config(ROOT / "configs/models/tiny_moe.yaml"), mlp_only_layers=[0])


def run_config(recompute: RecomputeConfig, **parallel) -> RunConfig:
    return RunConfig(model=MOE, parallel=ParallelConfig(**parallel), precision=PrecisionConfig(params_dtype="fp32"),
                     train=TrainConfig(recompute=recompute))


# ---- config rules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, path", [
    ({"granularity": "none", "method": "block"}, "train.recompute.method"),
    ({"granularity": "selective", "num_layers": 2}, "train.recompute.num_layers"),
    ({"granularity": "full", "modules": ["mlp"]}, "train.recompute.modules"),
    ({"granularity": "selective", "modules": ["core_attn", "attention"]}, "train.recompute.modules[1]"),
    ({"granularity": "full", "num_layers": 0}, "train.recompute.num_layers"),
    ({"granularity": "partial"}, "train.recompute.granularity"),
])
def test_bad_recompute_settings_name_the_field(data, path):
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, {"recompute": data}, "train")
    assert err.value.path == path


def test_rules_that_need_the_model_and_layout():
    run_config(RecomputeConfig(granularity="full", num_layers=4)).validate("")
    with pytest.raises(ConfigError, match="more than the 2 layer") as err:  # 4 layers over 2 stages
        run_config(RecomputeConfig(granularity="full", num_layers=3), pipeline=2).validate("")
    assert err.value.path == "train.recompute.num_layers"
    all_moe = dataclasses.replace(MOE, mlp_only_layers=[])
    cfg = dataclasses.replace(run_config(RecomputeConfig(granularity="selective", modules=["mlp"])), model=all_moe)
    with pytest.raises(ConfigError, match="every layer of the model is MoE"):
        cfg.validate("")
    dense = load_model_config(ROOT / "configs/models/tiny_dense.yaml")
    cfg = dataclasses.replace(run_config(RecomputeConfig(granularity="selective", modules=["moe"])), model=dense)
    with pytest.raises(ConfigError, match="the model has none"):
        cfg.validate("")


def test_modules_that_need_transformer_engine_are_refused_without_it():
    from megatron_vespo.models.provider import build_transformer_config

    for module in ("layernorm", "moe_act"):
        rc = RecomputeConfig(granularity="selective", modules=["core_attn", module])
        with pytest.raises(ConfigError, match="Transformer Engine is not available") as err:
            build_transformer_config(MOE, ParallelConfig(), PrecisionConfig(params_dtype="fp32"), use_te=False,
                                     recompute=rc)
        assert err.value.path == "train.recompute.modules[1]"


# ---- gradients --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process():
    from megatron_vespo.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _loss_grads_and_calls(recompute: RecomputeConfig, count: str) -> tuple[torch.Tensor, dict, int]:
    """Loss, every parameter's gradient, and how often modules whose class name is ``count`` ran
    forward during one forward + backward of the same model, weights and tokens."""
    from megatron.core import tensor_parallel

    from megatron_vespo.models.provider import build_gpt_model

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = build_gpt_model(run_config(recompute))
    calls = [0]
    for module in model.modules():
        if type(module).__name__ == count:
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, MOE.vocab_size, (1, 96), generator=gen)
    logits = model(tokens, torch.arange(96)[None], None)
    loss = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).mean().neg()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls[0]


# (recompute, the module class whose forward runs again in the backward)
CASES = {
    "full-uniform-1": (RecomputeConfig(granularity="full"), "TransformerLayer"),
    "full-uniform-2": (RecomputeConfig(granularity="full", method="uniform", num_layers=2), "TransformerLayer"),
    "full-block-3": (RecomputeConfig(granularity="full", method="block", num_layers=3), "TransformerLayer"),
    "selective-core_attn": (RecomputeConfig(granularity="selective"), "DotProductAttention"),
    # MoELayer.forward checkpoints its inner function (router, dispatch, experts): the router runs again.
    "selective-moe": (RecomputeConfig(granularity="selective", modules=["moe"]), "TopKRouter"),
    "selective-mlp": (RecomputeConfig(granularity="selective", modules=["mlp"]), "MLP"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_with_recompute_equal_those_without(single_process, case):
    recompute, module = CASES[case]
    loss0, grads0, calls0 = _loss_grads_and_calls(RecomputeConfig(), module)
    loss, grads, calls = _loss_grads_and_calls(recompute, module)
    layers = MOE.num_hidden_layers
    recomputed = {"full-block-3": 3, "selective-moe": layers - 1, "selective-mlp": 1}.get(case, layers)
    if module == "MLP":  # every expert of the MoE layers is an MLP too; only the dense layer's is recomputed
        assert calls - calls0 == recomputed
    else:
        assert calls0 == (layers - 1 if module == "TopKRouter" else layers)
        assert calls == calls0 + recomputed, "the module was not recomputed"
    assert grads.keys() == grads0.keys() and len(grads) > 10
    assert torch.allclose(loss, loss0, rtol=0, atol=1e-6)
    worst = max((grads[n] - grads0[n]).abs().max().item() for n in grads)
    assert worst <= 1e-6, f"{case}: gradients differ by {worst}"
