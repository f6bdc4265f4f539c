"""A prepared check of the trainer's CUDA path on one GPU, in a few minutes, written to one JSON file.

Meant for a machine with a CUDA build of torch and megatron-core (wheels or source) but neither SGLang
nor Transformer Engine, and no network: the local layer spec, bf16, one process. Run it through
``scripts/gpu_check.sh`` (which finds the interpreter and the dependencies). Four checks:

1. ``step_parity``: one VESPO step of the tiny MoE policy on the GPU in bf16 against the same step on the
   CPU in fp32 (a subprocess without CUDA, so the project's CPU platform layer is used), from the same
   initial weights and the same samples: loss within 5 %, gradient norm within 10 %, every updated
   weight within 1e-2 (bf16 resolution near 1).
2. ``throughput``: VESPO training steps of a larger model — a few layers at Qwen3-30B-A3B's shapes
   (hidden 2048, 32 query / 4 KV heads of 128, experts of FFN 768, top-8; fewer experts; Qwen3's
   vocabulary of 151936), about a billion parameters: tokens/s and MFU (model FLOPs per token
   ``6 x active parameters + 6 x layers x q_dim x sequence length`` against the GPU's dense bf16 peak).
3. ``logprob_memory``: peak memory of token log-probs + a policy-gradient loss, forward and backward, at
   Qwen3's vocabulary: the trainer's chunked kernel against a naive ``log_softmax`` (CUDA allocator peaks).
4. ``weight_export``: the HF weight exporter over the larger model (buckets assembled on the GPU, GB/s)
   and the same export written as safetensors shards to local disk (GB/s, device to host included).

``--dry-run`` does all of it on the CPU with small shapes (everything but CUDA): the CI test runs it.
Exit code 0 when every check passed, 1 otherwise; the JSON says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10", 125e12),
             ("4090", 165e12), ("A6000", 155e12))
STEP_LOSS_TOL, STEP_GRAD_TOL, STEP_WEIGHT_TOL = 0.05, 0.10, 1e-2


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="everything on the CPU with small shapes (no CUDA)")
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_check.json"))
    p.add_argument("--layers", type=int, default=None, help="larger model: layers (default 4; dry run 2)")
    p.add_argument("--experts", type=int, default=None, help="larger model: experts (default 16; dry run 8)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5; dry run 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; dry run 64)")
    p.add_argument("--sequences", type=int, default=None, help="sequences per step (default 8; dry run 4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU when the GPU is "
                   "not in the table")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # "cpu-step": the fp32 CPU reference (subprocess)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- shared model set-up -------------------------------------------------------------------------------
def tiny_model_config():
    from megatron_vespo.config import load_model_config

    return load_model_config(REPO / "configs/models/tiny_moe.yaml")


def larger_model_config(args: argparse.Namespace):
    """A few layers at Qwen3-30B-A3B's shapes (the dry run shrinks everything)."""
    base = tiny_model_config()
    if args.dry_run:
        return dataclasses.replace(base, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   moe_intermediate_size=64, intermediate_size=256, num_hidden_layers=args.layers or 2,
                                   num_experts=args.experts or 8, num_experts_per_tok=2, vocab_size=4096)
    return dataclasses.replace(base, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               moe_intermediate_size=768, intermediate_size=6144, num_hidden_layers=args.layers or 4,
                               num_experts=args.experts or 16, num_experts_per_tok=8, vocab_size=151936,
                               max_position_embeddings=40960)


def run_config(model_cfg, dtype: str, micro_batch_tokens: int, logprob_chunk: int = 4096):
    from megatron_vespo.config.schema import (
        OptimizerConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig,
    )

    return RunConfig(model=model_cfg, parallel=ParallelConfig(), precision=PrecisionConfig(params_dtype=dtype),
                     optimizer=OptimizerConfig(lr=3e-4, weight_decay=0.1, adam_eps=1e-4, clip_grad=1.0),
                     train=TrainConfig(micro_batch_tokens=micro_batch_tokens, logprob_chunk_tokens=logprob_chunk))


def force_local_spec() -> None:
    """The check is about the local layer spec: never Transformer Engine, even where it imports."""
    import megatron_vespo.models.provider as provider
    import megatron_vespo.train.step as step

    provider.te_available = lambda: False
    step.te_available = lambda: False


def init(cfg) -> Any:
    from megatron_vespo.distributed import init_distributed

    return init_distributed(cfg.parallel, seed=1234, model=cfg.model, precision=cfg.precision)


def reset_parallel_state() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def full_state(chunks) -> dict[str, torch.Tensor]:
    """The canonical full weights of a one-process model (fp32, CPU)."""
    from megatron_vespo.models.full_state import local_shards

    full: dict[str, torch.Tensor] = {}
    for s in local_shards(chunks):
        if not s.main_replica:
            continue
        target = full.setdefault(s.key, torch.zeros(s.global_shape, dtype=torch.float32))
        target[s.index()] = s.tensor.detach().to("cpu", torch.float32)
    return full


def make_samples(vocab: int, sequences: int, prompt_len: int, response_len: int, seed: int):
    from megatron_vespo.train.sample import TrainSample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(sequences):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        response = torch.randint(0, vocab, (response_len,), generator=gen).tolist()
        out.append(TrainSample(prompt_ids=prompt, response_ids=response, rollout_logp=[0.0] * response_len,
                               advantage=float(torch.rand((), generator=gen)) - 0.25 * (1 + i % 2)))
    return out


# The step-parity samples: the CPU reference and the GPU step rebuild the same ones from this.
REFERENCE_SAMPLES = dict(sequences=12, prompt_len=6, response_len=10, seed=7)


def one_step(trainer, samples) -> dict:
    result = trainer.train_mini_batch(samples)
    return {"loss": float(result.metrics["loss/policy_loss"]), "grad_norm": float(result.grad_norm),
            "skipped": bool(result.skipped)}


# ---- 1. step parity --------------------------------------------------------------------------------------
def cpu_reference_step(workdir: Path) -> None:
    """Subprocess (no CUDA): tiny policy in fp32 on the CPU; writes the initial weights, the samples (with μ
    from the model's own log-probs plus fixed noise) and the step's loss, grad norm and updated weights."""
    from megatron_vespo.models.trainable import build_model_and_optimizer
    from megatron_vespo.train.step import PolicyTrainer

    force_local_spec()
    cfg = run_config(tiny_model_config(), "fp32", micro_batch_tokens=256, logprob_chunk=16)
    init(cfg)
    trainable = build_model_and_optimizer(cfg)
    initial = full_state(trainable.model)
    trainer = PolicyTrainer(cfg, trainable)
    samples = make_samples(cfg.model.vocab_size, **REFERENCE_SAMPLES)
    noise = torch.Generator().manual_seed(8)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        s.rollout_logp = (lp + 0.05 * torch.randn(lp.shape, generator=noise)).tolist()
    step = one_step(trainer, samples)
    # Only tensors, numbers, strings and containers of them (no TrainSample objects), so the reader loads
    # with weights_only=True and nothing read back can run code. The reader rebuilds the samples from
    # their seed; only their μ (model log-probs + noise) travels.
    from megatron_vespo.platform import applied_patches

    torch.save({"initial": initial, "weights": full_state(trainable.model), "step": step,
                "rollout_logp": [s.rollout_logp for s in samples], "patches": list(applied_patches())},
               workdir / "cpu_step.pt")


def read_cpu_reference(workdir: Path) -> dict:
    """What :func:`cpu_reference_step` wrote, with the samples rebuilt from their seed and given the written μ."""
    ref = torch.load(workdir / "cpu_step.pt", weights_only=True)
    samples = make_samples(tiny_model_config().vocab_size, **REFERENCE_SAMPLES)
    for sample, logp in zip(samples, ref.pop("rollout_logp"), strict=True):
        sample.rollout_logp = logp
    return {**ref, "samples": samples}


def check_step_parity(args: argparse.Namespace, device: str, workdir: Path) -> dict:
    from megatron_vespo.models.trainable import build_model_and_optimizer
    from megatron_vespo.train.step import PolicyTrainer

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, __file__, "--phase", "cpu-step", "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"CPU reference step failed:\n{proc.stderr[-3000:]}")
    ref = read_cpu_reference(workdir)

    cfg = run_config(tiny_model_config(), "bf16", micro_batch_tokens=256, logprob_chunk=16)
    reset_parallel_state()
    init(cfg)
    trainable = build_model_and_optimizer(cfg, initial_state=ref["initial"])
    got = one_step(PolicyTrainer(cfg, trainable), ref["samples"])
    weights = full_state(trainable.model)
    weight_diff = max(float((weights[k] - v).abs().max()) for k, v in ref["weights"].items())
    loss_rel = abs(got["loss"] - ref["step"]["loss"]) / max(abs(ref["step"]["loss"]), 0.1)
    grad_rel = abs(got["grad_norm"] - ref["step"]["grad_norm"]) / max(ref["step"]["grad_norm"], 1e-12)
    ok = (loss_rel < STEP_LOSS_TOL and grad_rel < STEP_GRAD_TOL and weight_diff < STEP_WEIGHT_TOL
          and not got["skipped"] and bool(ref["patches"]))
    return {"ok": ok, "device": device, "dtype": "bf16", "reference": "cpu fp32 (platform patches: "
            f"{len(ref['patches'])})", "loss": got["loss"], "loss_reference": ref["step"]["loss"],
            "loss_rel_diff": loss_rel, "grad_norm": got["grad_norm"], "grad_norm_reference": ref["step"]["grad_norm"],
            "grad_norm_rel_diff": grad_rel, "max_weight_diff": weight_diff,
            "tolerances": {"loss_rel": STEP_LOSS_TOL, "grad_norm_rel": STEP_GRAD_TOL, "weight_abs": STEP_WEIGHT_TOL}}


# ---- 2. throughput and MFU --------------------------------------------------------------------------------
def peak_flops(args: argparse.Namespace, device: str) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def active_params(model_cfg) -> int:
    from megatron_vespo.planning.params import count_params

    c = count_params(model_cfg)
    return c.active - c.embedding  # the input embedding is a lookup, not a matmul (the output layer is one)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_throughput(args: argparse.Namespace, device: str, state: dict) -> dict:
    from megatron_vespo.models.trainable import build_model_and_optimizer
    from megatron_vespo.planning.params import count_params
    from megatron_vespo.train.step import PolicyTrainer

    model_cfg = larger_model_config(args)
    seq_len, sequences = args.seq_len or (64 if args.dry_run else 2048), args.sequences or (4 if args.dry_run else 8)
    steps = args.steps or (1 if args.dry_run else 5)
    cfg = run_config(model_cfg, "bf16", micro_batch_tokens=seq_len * max(1, sequences // 2), logprob_chunk=4096)
    reset_parallel_state()
    init(cfg)
    t0 = time.perf_counter()
    trainable = build_model_and_optimizer(cfg)
    build_s = time.perf_counter() - t0
    trainer = PolicyTrainer(cfg, trainable)
    samples = make_samples(model_cfg.vocab_size, sequences, prompt_len=seq_len // 4,
                           response_len=seq_len - seq_len // 4, seed=11)
    for s in samples:  # μ of a near-uniform policy (a fresh model's): W near one, not clamped
        s.rollout_logp = [-math.log(model_cfg.vocab_size)] * len(s.response_ids)
    one_step(trainer, samples)  # warm-up: kernels, allocator, optimizer state
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        result = one_step(trainer, samples)
        sync(device)
        times.append(time.perf_counter() - t0)
    tokens = sum(s.num_tokens for s in samples)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_s = tokens / step_s
    q_dim = model_cfg.num_attention_heads * model_cfg.kv_channels
    flops_per_token = 6 * active_params(model_cfg) + 6 * model_cfg.num_hidden_layers * q_dim * seq_len
    peak = peak_flops(args, device)
    state["trainable"], state["model_cfg"] = trainable, model_cfg
    out = {"ok": not result["skipped"] and all(t > 0 for t in times), "params": count_params(model_cfg).total,
           "active_params": count_params(model_cfg).active, "layers": model_cfg.num_hidden_layers,
           "experts": model_cfg.num_experts, "vocab": model_cfg.vocab_size, "tokens_per_step": tokens,
           "seq_len": seq_len, "steps": steps, "step_s_median": step_s, "step_s": times, "build_s": build_s,
           "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
           "achieved_tflops": flops_per_token * tokens_per_s / 1e12, "peak_tflops": peak / 1e12 if peak else None,
           "mfu": flops_per_token * tokens_per_s / peak if peak else None, "last_loss": result["loss"]}
    if device == "cuda":
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- 3. chunked log-prob memory ----------------------------------------------------------------------------
class PeakMemory:
    """Peak memory above a baseline: the CUDA allocator's peak, or on the CPU the process's peak RSS (Linux
    ``clear_refs`` resets it)."""

    def __init__(self, device: str):
        self.device = device

    def now(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def logprob_peak(variant: str, device: str, tokens: int, vocab: int, chunk: int) -> dict:
    from megatron_vespo.train.logprobs import vocab_parallel_logprobs

    mem = PeakMemory(device)
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    advantages = torch.randn(tokens, device=device, generator=gen)
    logits = torch.empty(tokens, vocab, device=device, dtype=torch.bfloat16).normal_(generator=gen).mul_(2.0)
    logits.requires_grad_()
    gc.collect()
    holding = mem.now()
    mem.reset()
    t0 = time.perf_counter()
    if variant == "naive":
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    else:
        logp = vocab_parallel_logprobs(logits, labels, chunk_tokens=chunk)[0]
    loss = -(logp * advantages).sum() / tokens
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    working = mem.peak() - holding
    result = {"working_bytes": working, "seconds": seconds, "loss": float(loss),
              "grad_abs_sum": float(logits.grad.float().abs().sum())}
    del logits, logp, loss, labels, advantages
    gc.collect()
    return result


def check_logprob_memory(args: argparse.Namespace, device: str) -> dict:
    tokens, vocab, chunk = (256, 151936, 64) if args.dry_run else (8192, 151936, 1024)
    naive = logprob_peak("naive", device, tokens, vocab, chunk)
    chunked = logprob_peak("chunked", device, tokens, vocab, chunk)
    same = abs(naive["loss"] - chunked["loss"]) <= 1e-3 * max(1.0, abs(naive["loss"]))
    return {"ok": same and chunked["working_bytes"] < naive["working_bytes"], "tokens": tokens, "vocab": vocab,
            "chunk_tokens": chunk, "logits_bytes": tokens * vocab * 2, "naive": naive, "chunked": chunked,
            "working_ratio": chunked["working_bytes"] / max(1, naive["working_bytes"]),
            "measure": "cuda max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM)"}


# ---- 4. weight export ----------------------------------------------------------------------------------------
def check_weight_export(args: argparse.Namespace, device: str, state: dict, workdir: Path) -> dict:
    from megatron_vespo.checkpoint.export import HFWeightExporter
    from rollout_sglang.weight_sync.disk import write_safetensors

    bucket_bytes = (8 if args.dry_run else 512) << 20
    exporter = HFWeightExporter(state["trainable"].model, state["model_cfg"], bucket_bytes=bucket_bytes)

    def walk(consume: Callable[[int, list], None]) -> tuple[float, int]:
        sync(device)
        t0 = time.perf_counter()
        total = 0
        index = 0
        for bucket in exporter.buckets():
            total += sum(t.numel() * t.element_size() for _, t in bucket)
            consume(index, bucket)
            index += 1
            del bucket
        sync(device)
        return time.perf_counter() - t0, total

    walk(lambda i, b: None)  # warm-up
    assemble_s, total = walk(lambda i, b: None)
    # What a broadcast reads: every bucket materialised as one contiguous device buffer.
    flat_s, _ = walk(lambda i, b: torch.cat([t.reshape(-1).view(torch.uint8) for _, t in b]))
    out_dir = workdir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    disk_s, _ = walk(lambda i, b: write_safetensors(out_dir / f"model-{i:05d}.safetensors", b))
    written = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    shutil.rmtree(out_dir, ignore_errors=True)
    gb = total / 1e9
    return {"ok": total > 0 and written >= total, "bytes": total, "buckets": len(exporter.buckets_plan),
            "bucket_bytes": bucket_bytes, "assemble_s": assemble_s, "assemble_gb_s": gb / assemble_s,
            "flat_buffers_s": flat_s, "flat_buffers_gb_s": gb / flat_s,
            "safetensors_s": disk_s, "safetensors_gb_s": gb / disk_s, "written_bytes": written}


# ---- main ----------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import importlib.util

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
            "sglang": importlib.util.find_spec("sglang") is not None, "python": sys.version.split()[0]}
    try:
        import megatron.core

        info["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except ImportError as exc:
        info["megatron_core"] = f"not importable: {exc}"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.phase == "cpu-step":
        cpu_reference_step(Path(args.workdir))
        return 0
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --dry-run to exercise the check on the CPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    force_local_spec()
    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(device), "checks": {}}
    state: dict = {}
    checks = [("step_parity", lambda: check_step_parity(args, device, workdir)),
              ("throughput", lambda: check_throughput(args, device, state)),
              ("logprob_memory", lambda: check_logprob_memory(args, device)),
              ("weight_export", lambda: check_weight_export(args, device, state, workdir))]
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 -- one failed check must not hide the others' numbers
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - t0
        report["checks"][name] = result
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']:.1f}s)"
              + (f" {result['error']}" if "error" in result else ""), flush=True)
    reset_parallel_state()
    report["seconds"] = time.perf_counter() - started
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    summary = {k: v for k, v in report["checks"].items()}
    t = summary.get("throughput", {})
    lp = summary.get("logprob_memory", {})
    ex = summary.get("weight_export", {})
    print(f"[gpu_check] {'OK' if report['ok'] else 'FAILED'} in {report['seconds']:.0f}s -> {out}")
    if t.get("tokens_per_s"):
        mfu = f"{t['mfu'] * 100:.1f}%" if t.get("mfu") else "n/a (unknown peak)"
        print(f"[gpu_check] {t['params'] / 1e6:.0f}M params: {t['tokens_per_s']:.0f} tokens/s, MFU {mfu}")
    if lp.get("naive"):
        print(f"[gpu_check] log-probs at V={lp['vocab']}: chunked {lp['chunked']['working_bytes'] / 2**20:.0f} MiB vs "
              f"naive {lp['naive']['working_bytes'] / 2**20:.0f} MiB working memory ({lp['working_ratio']:.2f}x)")
    if ex.get("bytes"):
        print(f"[gpu_check] weight export {ex['bytes'] / 1e9:.2f} GB: assemble {ex['assemble_gb_s']:.1f} GB/s, "
              f"flat buffers {ex['flat_buffers_gb_s']:.1f} GB/s, safetensors {ex['safetensors_gb_s']:.2f} GB/s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
