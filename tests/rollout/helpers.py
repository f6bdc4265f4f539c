"""Helpers for rollout tests: a tiny random Qwen3-MoE as an HF directory, teacher-forced log-probs and
routing, a CPU rollout server process."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_moe_config(vocab_size: Optional[int] = None):
    """The HF config of configs/models/tiny_moe.yaml (``vocab_size``: another vocabulary)."""
    from transformers import Qwen3MoeConfig

    spec = yaml.safe_load((REPO / "configs/models/tiny_moe.yaml").read_text())
    return Qwen3MoeConfig(
        vocab_size=vocab_size or spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"], intermediate_size=spec["intermediate_size"],
        moe_intermediate_size=spec["moe_intermediate_size"], num_experts=spec["num_experts"],
        num_experts_per_tok=spec["num_experts_per_tok"], norm_topk_prob=spec["norm_topk_prob"],
        rms_norm_eps=spec["rms_norm_eps"], max_position_embeddings=spec["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        tie_word_embeddings=spec["tie_word_embeddings"], initializer_range=0.2,  # peaked, not uniform, outputs
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )


def save_tiny_moe(path: Path, seed: int = 0, vocab_size: Optional[int] = None) -> Path:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(tiny_moe_config(vocab_size)).save_pretrained(str(path))
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


@contextlib.contextmanager
def _flipped_routing(model, layer: int, position: int) -> Iterator[None]:
    """Make the router of ``layer`` take the other side of its k-th / (k+1)-th choice at ``position``."""
    gate = model.model.layers[layer].mlp.gate

    def hook(module, inputs, output):
        logits, weights, indices = output
        probs = torch.softmax(logits.float(), dim=-1)
        ranked = probs.topk(module.top_k + 1, dim=-1).indices[position]
        chosen = torch.cat([ranked[:module.top_k - 1], ranked[module.top_k:]])
        top = probs[position, chosen]
        if module.norm_topk_prob:
            top = top / top.sum()
        indices, weights = indices.clone(), weights.clone()
        indices[position], weights[position] = chosen, top.to(weights.dtype)
        return logits, weights, indices

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def routing_near_ties(model, ids: list[int], margin: float = 1e-4) -> list[tuple[int, int]]:
    """(layer, position) where the HF router's k-th and (k+1)-th expert probabilities differ by < ``margin``."""
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(torch.softmax(o[0].float(), -1)))
             for layer in model.model.layers]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    k = model.model.layers[0].mlp.gate.top_k
    ties = []
    for layer, probs in enumerate(captured):
        top = probs.topk(k + 1, dim=-1).values
        ties += [(layer, int(p)) for p in torch.nonzero(top[:, k - 1] - top[:, k] < margin).flatten()]
    return ties


def flipped_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0,
                     tie_margin: float = 1e-4, up_to: Optional[int] = None) -> Iterator[tuple[int, int, list[float]]]:
    """(layer, position, teacher-forced log-probs) with one router near-tie decision flipped, for every
    near-tie at a fed position <= ``up_to`` (all when None)."""
    for layer, position in routing_near_ties(model, prompt + output[:-1], tie_margin):
        if up_to is None or position <= up_to:
            with _flipped_routing(model, layer, position):
                yield layer, position, teacher_forced_logprobs(model, prompt, output, temperature)


def logprob_mismatch(model, prompt: list[int], output: list[int], logprobs: list[float], temperature: float = 1.0,
                     tol: float = 1e-4, tie_margin: float = 1e-4) -> Optional[str]:
    """None when ``logprobs`` equal a teacher-forced recomputation within ``tol``, else why not.

    An MoE router at a near-tie (two experts' probabilities within fp32 noise of each other) can pick
    either expert depending on batch shape, so a server and a one-sequence reference legitimately
    disagree from that token on. Such a mismatch is reported as ``"routing flip ..."`` only when
    forcing the reference onto the other side of one near-tie reproduces the server's log-probs;
    anything else (wrong weights, a corrupted KV cache, a misaligned row) is "unexplained".
    """
    ref = teacher_forced_logprobs(model, prompt, output, temperature)
    off = [t for t, (a, b) in enumerate(zip(ref, logprobs)) if abs(a - b) >= tol]
    if not off:
        return None
    worst = max(abs(a - b) for a, b in zip(ref, logprobs))
    if hasattr(model.model.layers[0].mlp, "gate"):
        # The flip sits at or before the position that fed the first token that differs.
        for layer, position, flipped in flipped_logprobs(model, prompt, output, temperature, tie_margin,
                                                         up_to=len(prompt) + off[0] - 1):
            if max(abs(a - b) for a, b in zip(flipped, logprobs)) < tol:
                return f"routing flip at layer {layer}, position {position} (max difference {worst:.2e})"
    return f"unexplained: output tokens {off[:8]} differ, max {worst:.2e}"


def assert_logprob_parity(model, samples, temperature: float = 1.0, version: Optional[str] = None,
                          tol: float = 1e-4, max_flip_fraction: float = 0.02) -> list[str]:
    """Every sample's log-probs equal teacher forcing, or differ only by an explained MoE routing flip
    (at most ``max_flip_fraction`` of the samples, and always one). Returns the flips found."""
    samples = list(samples)
    flips, unexplained = [], []
    for s in samples:
        assert not s.aborted, s.finish_reason
        if version is not None:
            assert s.weight_version == version, (s.rid, s.weight_version, version)
        why = logprob_mismatch(model, s.prompt_ids, s.output_ids, s.output_logprobs, temperature, tol)
        if why is not None:
            (flips if why.startswith("routing flip") else unexplained).append(f"{s.meta_info.get('id', s.rid)}: {why}")
    assert not unexplained, f"{len(unexplained)} of {len(samples)} samples differ from teacher forcing: {unexplained[:5]}"
    assert len(flips) <= max(1.0, max_flip_fraction * len(samples)), f"too many routing flips: {flips[:5]}"
    for flip in flips:
        print(f"tolerated MoE routing flip: {flip}")
    return flips


def load_state_into(model, state: dict[str, torch.Tensor]) -> None:
    from rollout_sglang.cpu_server.weights import load_hf_named_tensors

    load_hf_named_tensors(model, state.items())


@contextlib.contextmanager
def cpu_server(model_dir: Path, log_path: Path, startup_timeout_s: float = 120.0,
               extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """A CPU rollout server on a free loopback port serving ``model_dir``; yields its URL once healthy."""
    from rollout_sglang.net import find_free_port, is_healthy

    port = find_free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rollout_sglang.cpu_server", "--model-path", str(model_dir),
                                 "--port", str(port), *extra_args], stdout=log, stderr=subprocess.STDOUT)
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
