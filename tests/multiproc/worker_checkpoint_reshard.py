"""torchrun worker: a training checkpoint written in one parallel layout, loaded in another.

``--phase save``: build the tiny MoE policy (seed 1234), run one VESPO step, save a training
checkpoint (model, optimizer, LR schedule) with :class:`TrainingCheckpointer`, then run a second
step. Rank 0 writes the full weights at the save, the second step's loss / grad norm / lr and the
full weights after it, and the samples (with their μ) to ``--out``.

``--phase load``: build the policy from a *different* seed, load the checkpoint, record the full
weights, then run the same second step on the same samples; rank 0 writes the same report.
Compare the two files: weights at load must equal the saved ones exactly; the second step
(which uses Adam's moments and the scheduler's position from the checkpoint) must agree to
rounding.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_model import make_samples  # noqa: E402

from megatron_vespo.checkpoint.training import TrainingCheckpointer  # noqa: E402
from megatron_vespo.config import load_model_config  # noqa: E402
from megatron_vespo.config.schema import (  # noqa: E402
    CheckpointConfig, OptimizerConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig,
)
from megatron_vespo.distributed import destroy_distributed, init_distributed  # noqa: E402
from megatron_vespo.models.trainable import build_model_and_optimizer  # noqa: E402
from megatron_vespo.train.lr_schedule import build_lr_scheduler  # noqa: E402
from megatron_vespo.train.sample import TrainSample  # noqa: E402
from megatron_vespo.train.step import PolicyTrainer  # noqa: E402
from tests.model_state import gather_full_state_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["save", "load"], required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--ckpt", required=True, help="checkpoint root (save) / step directory (load)")
    p.add_argument("--samples", required=True, help="samples with μ (written by save, read by load)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = RunConfig(
        model=load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml"),
        parallel=ParallelConfig(tensor=args.tp, pipeline=args.pp, expert=args.ep, expert_tensor=1,
                                sequence_parallel=args.sp),
        precision=PrecisionConfig(params_dtype="fp32"),
        optimizer=OptimizerConfig(lr=3e-4, weight_decay=0.1, adam_eps=1e-4, clip_grad=1.0, warmup_steps=3,
                                  distributed=args.distributed_optimizer),
        train=TrainConfig(micro_batch_tokens=72, logprob_chunk_tokens=16),
        checkpoint=CheckpointConfig(dir=args.ckpt if args.phase == "save" else ""),
    )
    seed = 1234 if args.phase == "save" else 99  # the load starts from other weights
    ctx = init_distributed(cfg.parallel, seed, model=cfg.model, precision=cfg.precision)
    trainable = build_model_and_optimizer(cfg)
    scheduler = build_lr_scheduler(trainable.optimizer, cfg.optimizer)
    trainer = PolicyTrainer(cfg, trainable, scheduler)
    checkpointer = TrainingCheckpointer(cfg, trainable.model, trainable.optimizer, scheduler)

    if args.phase == "save":
        samples = make_samples(cfg.model.vocab_size, seed=5)
        noise = torch.Generator().manual_seed(6)
        for s, lp in zip(samples, trainer.compute_logprobs(samples)):
            s.rollout_logp = (lp + 0.05 * torch.randn(lp.shape, generator=noise)).tolist()
        if ctx.rank == 0:  # plain data (the load phase reads it with weights_only)
            torch.save([dataclasses.asdict(s) for s in samples], args.samples)
        trainer.train_mini_batch(samples)
        checkpointer.save(1, {"note": "after one step"})
        report = {"layout": {"world": ctx.world_size, "tp": args.tp, "ep": args.ep}}
    else:
        samples = [TrainSample(**fields) for fields in torch.load(args.samples, weights_only=True)]
        loaded = checkpointer.load(Path(args.ckpt))
        report = {"driver_state": loaded.driver_state, "rng_restored": loaded.rng_restored}
    report["weights_at_checkpoint"] = gather_full_state_dict(trainable.model, dst=0)
    result = trainer.train_mini_batch(samples)
    report.update(loss=result.metrics["loss/policy_loss"], grad_norm=result.grad_norm,
                  lr=result.metrics["train/lr"], weights_after=gather_full_state_dict(trainable.model, dst=0))
    if ctx.rank == 0:
        torch.save(report, args.out)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
