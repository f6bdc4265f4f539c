"""Shared pieces of the real-SGLang GPU tests: a tiny random Qwen3-MoE written at test time, the
server config, rollouts through the client, and log-prob comparisons against HF transformers."""
from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import torch

# Small, but with shapes SGLang's GPU kernels are built for (head_dim 64; MoE widths multiple of 64).
TINY_QWEN3_MOE = dict(
    vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=1024, rope_theta=1e6, tie_word_embeddings=False,
    initializer_range=0.2, decoder_sparse_step=1, mlp_only_layers=[],
)

# No tokenizer (ids in, ids out), a backend that takes any head size, no graph capture (fast start).
SGLANG_TEST_ARGS = ["--skip-tokenizer-init", "--attention-backend", "triton", "--cuda-graph-backend-decode",
                    "disabled", "--cuda-graph-backend-prefill", "disabled", "--random-seed", "0"]


def tiny_engine_server(model_dir: Path, python: str, **fields) -> dict:
    """A fleet's ``servers`` entry for one bf16 SGLang engine on the tiny model (``fields`` add or override)."""
    return {"kind": "sglang", "python": python, "model_path": str(model_dir), "dtype": "bfloat16",
            "mem_fraction_static": 0.3, "startup_timeout_s": 900, "extra_args": SGLANG_TEST_ARGS, **fields}


def engine_gpu() -> int:
    """The engine's device index in this process: the last visible GPU."""
    return torch.cuda.device_count() - 1


def write_tiny_qwen3_moe(path: Path, seed: int = 0) -> Path:
    """An HF directory (config.json + bf16 safetensors) of a random tiny Qwen3-MoE."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**TINY_QWEN3_MOE, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(str(path))
    return path


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def reference_model(path: Path, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """fp32 HF model holding the (bf16) weights the engine should hold."""
    from transformers import AutoModelForCausalLM

    from rollout_sglang.cpu_server.weights import load_hf_named_tensors  # HF per-expert names -> fused experts

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if state is not None:
        load_hf_named_tensors(model, ((k, v.float()) for k, v in state.items()))
    return model


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        v32 = v.float()
        if v.dim() > 1:
            v32 = v32 + scale * v32.std().clamp(min=1e-3) * torch.randn(v.shape, generator=g)
        out[k] = v32.to(v.dtype)
    return out


def physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's device ``index`` (for a server's environment)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def prompts(count: int, seed: int, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 12))] for _ in range(count)]


def rollout(url: str, batch, n: int = 2, max_new_tokens: int = 6, temperature: float = 1.0):
    from rollout_sglang.client import SGLangClient

    async def go():
        async with SGLangClient(url, request_timeout_s=120, total_timeout_s=300) as client:
            return await client.generate_batch(batch, {"max_new_tokens": max_new_tokens, "temperature": temperature},
                                               n=n)
    return asyncio.run(go())


@torch.no_grad()
def mean_logprob_error(model, groups, temperature: float = 1.0) -> float:
    """Mean |engine log-prob - teacher-forced HF log-prob| over every returned token."""
    errors = []
    for group in groups:
        for s in group:
            ids = torch.tensor([s.prompt_ids + s.output_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
            start = len(s.prompt_ids) - 1
            ref = [float(logp[start + i, tok]) for i, tok in enumerate(s.output_ids)]
            errors += [abs(a - b) for a, b in zip(ref, s.output_logprobs)]
    assert errors, "no tokens returned"
    return sum(errors) / len(errors)


# bf16 engine vs fp32 HF on the same (bf16) weights; MoE routing near ties can differ too.
BF16_MEAN_LOGPROB_TOL = 0.1


def assert_follows_weights(groups, version: str, new_model, old_model) -> None:
    """Samples carry ``version`` and match ``new_model`` far better than ``old_model``."""
    assert all(s.weight_version == version and not s.aborted for g in groups for s in g)
    new_err, old_err = mean_logprob_error(new_model, groups), mean_logprob_error(old_model, groups)
    assert new_err < BF16_MEAN_LOGPROB_TOL and old_err > 4 * new_err, (new_err, old_err)
