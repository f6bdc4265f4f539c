"""torchrun worker (1 process): the train step's guards against bad numbers, and its LR schedule.

Writes a JSON report to ``--out``:
- ``nan_mu``: a sample whose rollout log-probs contain NaN is counted as bad and contributes
  nothing; the step still happens and every weight stays finite;
- ``nan_grad``: a NaN injected into one gradient makes the step skip, and no weight changes;
- ``lr``: the learning rate after each step under warmup + cosine decay;
- ``entropy``: the entropy diagnostic is reported when train.compute_entropy is on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_model import make_samples  # noqa: E402

from megatron_vespo.config import load_run_config  # noqa: E402
from megatron_vespo.distributed import destroy_distributed, init_distributed  # noqa: E402
from megatron_vespo.models.trainable import build_model_and_optimizer  # noqa: E402
from megatron_vespo.train.lr_schedule import build_lr_scheduler  # noqa: E402
from megatron_vespo.train.step import PolicyTrainer  # noqa: E402
from tests.model_state import gather_full_state_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = load_run_config(REPO_ROOT / "configs/tiny_vespo.yaml", [
        "optimizer.lr=1e-3", "optimizer.lr_schedule=cosine", "optimizer.warmup_steps=2",
        "optimizer.decay_steps=6", "optimizer.min_lr=1e-4", "train.compute_entropy=true",
        "train.micro_batch_tokens=128"])
    init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    trainable = build_model_and_optimizer(cfg)
    trainer = PolicyTrainer(cfg, trainable, scheduler=build_lr_scheduler(trainable.optimizer, cfg.optimizer))
    samples = make_samples(cfg.model.vocab_size, seed=5)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        s.rollout_logp = lp.tolist()
    report: dict = {"lr": []}

    samples[3].rollout_logp[1] = float("nan")
    before = gather_full_state_dict(trainable.model)
    result = trainer.train_mini_batch(samples)
    after = gather_full_state_dict(trainable.model)
    report["lr"].append(result.metrics["train/lr"])
    report["nan_mu"] = {
        "bad_seqs": result.metrics["loss/bad_seqs"], "valid_seqs": result.metrics["loss/valid_seqs"],
        "skipped": result.skipped, "loss_finite": math.isfinite(result.metrics["loss/policy_loss"]),
        "weights_finite": all(bool(torch.isfinite(t).all()) for t in after.values()),
        "weights_changed": sum(int(not torch.equal(before[k], after[k])) for k in after), "num_weights": len(after),
    }
    report["entropy"] = result.metrics.get("train/entropy_mean")
    samples[3].rollout_logp[1] = -1.0

    # A NaN gradient on one parameter (through a tensor hook, before DDP accumulates it).
    param = next(p for name, p in trainable.model[0].named_parameters() if "linear_qkv" in name)
    handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = gather_full_state_dict(trainable.model)
    result = trainer.train_mini_batch(samples)
    after = gather_full_state_dict(trainable.model)
    handle.remove()
    report["nan_grad"] = {"skipped": result.skipped, "flag": result.metrics["train/skipped_nonfinite_step"],
                          "weights_changed": sum(int(not torch.equal(before[k], after[k])) for k in after)}
    for _ in range(5):
        report["lr"].append(trainer.train_mini_batch(samples).metrics["train/lr"])
    Path(args.out).write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    main()
