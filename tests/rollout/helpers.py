"""Helpers for rollout tests: a tiny random Qwen3-MoE as an HF directory, teacher-forced log-probs and
routing, a CPU rollout server process."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_moe_config():
    from transformers import Qwen3MoeConfig

    spec = yaml.safe_load((REPO / "configs/models/tiny_moe.yaml").read_text())
    return Qwen3MoeConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"], intermediate_size=spec["intermediate_size"],
        moe_intermediate_size=spec["moe_intermediate_size"], num_experts=spec["num_experts"],
        num_experts_per_tok=spec["num_experts_per_tok"], norm_topk_prob=spec["norm_topk_prob"],
        rms_norm_eps=spec["rms_norm_eps"], max_position_embeddings=spec["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        tie_word_embeddings=spec["tie_word_embeddings"], initializer_range=0.2,  # peaked, not uniform, outputs
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )


def save_tiny_moe(path: Path, seed: int = 0) -> Path:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(tiny_moe_config()).save_pretrained(str(path))
    return path


def load_hf(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_state(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their HF (per-expert) names."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().clamp(min=1e-3) * torch.randn(v.shape, generator=g) if v.dim() > 1 else v.clone()
            for k, v in state.items()}


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """Independent recomputation: one full forward over prompt+output, log_softmax(logits / T)."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(output) - 1)
    return [float(logp[p, tok]) for p, tok in zip(positions, output)]


@torch.no_grad()
def teacher_forced_routing(model, prompt: list[int], output: list[int]) -> np.ndarray:
    """The HF router's top-k experts of every position fed forward (prompt + output - 1), SGLang's
    layout ``(tokens, layers, topk)``, sorted along topk (a set)."""
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o[2]))
             for layer in model.model.layers]
    try:
        model(input_ids=torch.tensor([prompt + output[:-1]]))
    finally:
        for h in hooks:
            h.remove()
    return np.sort(torch.stack(captured).permute(1, 0, 2).numpy(), -1)


def load_state_into(model, state: dict[str, torch.Tensor]) -> None:
    from rollout_sglang.cpu_server.weights import load_hf_named_tensors

    load_hf_named_tensors(model, state.items())


@contextlib.contextmanager
def cpu_server(model_dir: Path, log_path: Path, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """A CPU rollout server on a free loopback port serving ``model_dir``; yields its URL once healthy."""
    from rollout_sglang.net import find_free_port, is_healthy

    port = find_free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rollout_sglang.cpu_server", "--model-path", str(model_dir),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout_s
        while not is_healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "CPU server did not start"
            time.sleep(0.2)
        try:
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=20)
