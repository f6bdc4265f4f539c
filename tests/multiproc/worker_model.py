"""torchrun worker: VESPO training steps of the tiny MoE policy in a given parallel layout.

Every layout starts from the same full weights (``--init``; written by the run given
``--save-init``, which builds them from ``--seed``) and sees the same mini-batch of packed
responses. The worker

1. computes the responses' token log-probs with the forward-only pass (packed, chunked,
   vocab-parallel) and, on the single-process reference run, also one sequence at a time with a
   full-vocabulary ``log_softmax`` (the direct reference computation);
2. sets the rollout log-probs μ to those log-probs plus fixed noise, so W and φ vary around 1;
3. runs ``--steps`` VESPO updates through :class:`PolicyTrainer` (Megatron's schedule, the loss in
   the last stage, Adam with weight decay and clipping),

and rank 0 writes per-step loss, gradient norm and metrics, the reduced gradients of the first
step, and the final full weights to ``--out``. Compare the files of two layouts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.config import load_model_config
from megatron_vespo.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig
from megatron_vespo.distributed import destroy_distributed, init_distributed
from megatron_vespo.models.trainable import build_model_and_optimizer, build_model_chunks
from megatron_vespo.train.sample import TrainSample
from megatron_vespo.train.step import PolicyTrainer
from tests.model_state import gather_full_state_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_PROMPTS, SAMPLES_PER_PROMPT = 6, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank (interleaved)")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--micro-batch-tokens", type=int, default=72, help="token budget; small -> several micro-batches")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", default=str(REPO_ROOT / "configs/models/tiny_moe.yaml"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--init", required=True, help="full initial weights (read, or written with --save-init)")
    p.add_argument("--save-init", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args()


def make_samples(vocab_size: int, seed: int) -> list[TrainSample]:
    """Prompts of 3-8 tokens, responses of 2-12, advantages of both signs; μ log-probs 0 (callers set them
    from the model's own log-probs)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(NUM_PROMPTS):
        prompt = torch.randint(0, vocab_size, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        rewards = torch.rand(SAMPLES_PER_PROMPT, generator=gen)
        # Off-centre advantages (both signs, mean ~0.25): a group-centred batch makes the loss a
        # near-cancelling sum, whose relative error says little about the layout.
        adv = rewards - 0.25
        for k in range(SAMPLES_PER_PROMPT):
            n = int(torch.randint(2, 13, (1,), generator=gen))
            samples.append(TrainSample(prompt_ids=prompt.tolist(),
                                       response_ids=torch.randint(0, vocab_size, (n,), generator=gen).tolist(),
                                       rollout_logp=[0.0] * n, advantage=float(adv[k])))
    return samples


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, samples: list[TrainSample]) -> list[torch.Tensor]:
    """One sequence at a time, default causal mask, full log_softmax: no packing, no chunking."""
    out = []
    for s in samples:
        tokens = torch.tensor(s.prompt_ids + s.response_ids)[None]
        logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        p = len(s.prompt_ids)
        out.append(logp[p - 1:-1].gather(-1, tokens[0, p:, None])[:, 0])
    return out


def gather_full_grads(model) -> dict | None:
    """The reduced gradients (``main_grad``) as a full state dict, by viewing each parameter's
    gradient in place of its data while the shards are gathered."""
    params = [p for chunk in model for p in chunk.parameters()]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.main_grad.view_as(p.data)
    try:
        return gather_full_state_dict(model, dst=0)
    finally:
        for p, data in zip(params, saved):
            p.data = data


def main() -> None:
    args = parse_args()
    cfg = RunConfig(
        model=load_model_config(args.model),
        parallel=ParallelConfig(tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vpp, expert=args.ep,
                                expert_tensor=args.etp, sequence_parallel=args.sp),
        precision=PrecisionConfig(params_dtype=args.dtype),
        # adam_eps well above fp32 noise in the gradients: the first Adam step is ~lr*sign(g), which
        # would turn rounding-level differences of near-zero gradients into lr-sized updates.
        optimizer=OptimizerConfig(lr=3e-4, weight_decay=0.1, adam_eps=1e-4, clip_grad=1.0,
                                  distributed=args.distributed_optimizer),
        train=TrainConfig(micro_batch_tokens=args.micro_batch_tokens, logprob_chunk_tokens=16),
    )
    ctx = init_distributed(cfg.parallel, args.seed, model=cfg.model, precision=cfg.precision)

    if args.save_init:
        full = gather_full_state_dict(build_model_chunks(cfg), dst=0)
        if ctx.rank == 0:
            torch.save(full, args.init)
        dist.barrier()
    trainable = build_model_and_optimizer(cfg, initial_state=torch.load(args.init))
    trainer = PolicyTrainer(cfg, trainable)

    samples = make_samples(cfg.model.vocab_size, args.seed + 1)
    logprobs = trainer.compute_logprobs(samples)
    direct = None
    if ctx.world_size == 1:
        direct = reference_logprobs(trainable.model[0].module, samples)
    assert all(lp is not None for lp in logprobs), "compute_logprobs must return every sample on every rank"
    noise = torch.Generator().manual_seed(args.seed + 2)
    for s, lp in zip(samples, logprobs):
        s.rollout_logp = (lp + 0.05 * torch.randn(lp.shape, generator=noise)).tolist()

    steps, grads = [], None
    for step in range(args.steps):
        result = trainer.train_mini_batch(samples)
        if step == 0:
            grads = gather_full_grads(trainable.model) if not args.distributed_optimizer else None
        steps.append({"loss": result.metrics["loss/policy_loss"], "grad_norm": result.grad_norm,
                      "micro_batches": result.num_micro_batches, "metrics": result.metrics})
    full = gather_full_state_dict(trainable.model, dst=0)
    if ctx.rank == 0:
        torch.save({"steps": steps, "weights": full, "grads": grads, "logprobs": logprobs, "direct": direct,
                    "world_size": ctx.world_size, "patches": list(ctx.platform_patches)}, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
