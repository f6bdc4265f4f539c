"""torchrun worker: training with the trainer's state offloaded and reloaded between every phase equals
training without, bitwise (``megatron_vespo/models/offload.py``).

For one layout (``--layout``) two trainables start from the same weights; one trains 3 mini-batches as is, the other the
same mini-batches the way a colocated run does: everything offloaded at start, then per step reload ->
train -> offload gradients and optimizer state -> weights exported from the resident parameters (the
publication) -> parameters offloaded. Each rank writes ``<out>.rank<r>.json``: metrics of every step
(equal, timings aside), what was left in device memory after each offload, the exported weights' equality,
and the final weights and optimizer state's equality.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_model import make_samples  # noqa: E402

from megatron_vespo.checkpoint.export import HFWeightExporter  # noqa: E402
from megatron_vespo.config import load_run_config  # noqa: E402
from megatron_vespo.distributed import destroy_distributed, init_distributed  # noqa: E402
from megatron_vespo.models.offload import GRADS, OPTIMIZER, PARAMS, PARTS, TrainerOffloader, torch_optimizers  # noqa: E402
from megatron_vespo.models.trainable import build_model_and_optimizer  # noqa: E402
from megatron_vespo.train.lr_schedule import build_lr_scheduler  # noqa: E402
from megatron_vespo.train.step import PolicyTrainer  # noqa: E402
from tests.model_state import gather_full_state_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {
    # DP=2, bf16 with the distributed optimizer: contiguous parameter buffer, sharded fp32 main params.
    "dp2_distopt_bf16": ["optimizer.distributed=true", "precision.params_dtype=bf16"],
    # EP=2, fp32: expert-parallel buffers, a chained optimizer (dense + expert Adam).
    "ep2_fp32": ["parallel.expert=2"],
}


def exported(trainable, cfg) -> list[tuple[str, torch.Tensor]]:
    exporter = HFWeightExporter(trainable.model, cfg.model, bucket_bytes=1 << 16)
    return [(name, t.detach().clone()) for bucket in exporter.buckets() for name, t in bucket]


def storages_left(trainable) -> dict[str, int]:
    """Device bytes still held by parameters, main_grads and optimizer tensors (0 when all offloaded)."""
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
              for c in trainable.model for p in c.parameters()}
    grads = {p.main_grad.untyped_storage().data_ptr(): p.main_grad.untyped_storage().nbytes()
             for c in trainable.model for p in c.parameters() if getattr(p, "main_grad", None) is not None}
    opt = {}
    for o in torch_optimizers(trainable.optimizer):
        for state in o.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    opt[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        for group in o.param_groups:
            for p in group["params"]:
                opt[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    opt = {ptr: n for ptr, n in opt.items() if ptr not in params}  # fp32 without sharding: the model's own
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(opt.values())}


def optimizer_state(trainable) -> list[torch.Tensor]:
    out = []
    for o in torch_optimizers(trainable.optimizer):
        for group in o.param_groups:
            out += [p.detach().clone() for p in group["params"]]
            for p in group["params"]:
                out += [v.detach().clone() for _, v in sorted(o.state.get(p, {}).items()) if isinstance(v, torch.Tensor)]
    return out


def run_layout(name: str) -> dict:
    cfg = load_run_config(REPO_ROOT / "configs/tiny_vespo.yaml", ["train.micro_batch_tokens=128", *LAYOUTS[name]])
    init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    plain = build_model_and_optimizer(cfg)
    start = gather_full_state_dict(plain.model, dst=None)
    moved = build_model_and_optimizer(cfg, initial_state=start)
    trainers = [PolicyTrainer(cfg, t, scheduler=build_lr_scheduler(t.optimizer, cfg.optimizer)) for t in (plain, moved)]
    batches = [make_samples(cfg.model.vocab_size, seed=11 + k) for k in range(3)]
    for samples in batches:
        for s, lp in zip(samples, trainers[0].compute_logprobs(samples)):
            s.rollout_logp = (lp + 0.05).tolist()  # μ a little off π: W != 1
    offloader = TrainerOffloader(moved.model, moved.optimizer)
    report: dict = {"metrics_equal": [], "left_after_offload": [], "left_after_training_offload": [],
                    "export_equal": [], "offloaded_bytes": []}
    report["offloaded_bytes"].append(offloader.offload())  # at boot: before the engines start
    report["left_after_offload"].append(storages_left(moved))
    for samples in batches:
        a = trainers[0].train_mini_batch(samples).metrics
        offloader.reload()
        b = trainers[1].train_mini_batch(samples).metrics
        report["metrics_equal"].append({k: a[k] == b.get(k) for k in a if not k.startswith("time/")})
        report["loss"] = [a["loss/policy_loss"], b["loss/policy_loss"]]
        offloader.offload([GRADS, OPTIMIZER])  # before the engines take their weights back
        left = storages_left(moved)
        report["left_after_training_offload"].append(left)
        report["device_bytes"] = {p: offloader.device_bytes(p) for p in PARTS}
        # The publication reads the resident parameters.
        report["export_equal"].append(all(n1 == n2 and torch.equal(t1, t2) for (n1, t1), (n2, t2)
                                          in zip(exported(plain, cfg), exported(moved, cfg))))
        report["offloaded_bytes"].append(offloader.offload([PARAMS]))
        report["left_after_offload"].append(storages_left(moved))
    offloader.reload()
    final = [gather_full_state_dict(t.model, dst=None) for t in (plain, moved)]
    report["weights_equal"] = sorted(final[0]) == sorted(final[1]) and all(
        torch.equal(final[0][k], final[1][k]) for k in final[0])
    report["weights_changed"] = any(not torch.equal(start[k], final[0][k]) for k in start)
    states = [optimizer_state(t) for t in (plain, moved)]
    report["optimizer_tensors"] = len(states[0])
    report["optimizer_equal"] = len(states[0]) == len(states[1]) and all(
        torch.equal(x, y) for x, y in zip(*states))
    destroy_distributed()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    report = run_layout(args.layout)
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
