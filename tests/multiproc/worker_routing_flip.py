"""torchrun worker: the train step's routing flip rate against known rollout experts.

``--make-reference`` (one process): record the trainer's own top-k experts of every response
position (forward only) and write them as the samples' ``rollout_routed_experts``, with the
weights. Every run (any layout) then loads both files, edits a few entries (three real flips, one
reordered set that is not a flip) and runs one optimizer step with lr set to 0 under the given
layout; the report holds the step's metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_model import make_samples  # noqa: E402

from megatron_vespo.config import load_run_config  # noqa: E402
from megatron_vespo.distributed import destroy_distributed, init_distributed  # noqa: E402
from megatron_vespo.models.full_state import load_full_state_dict  # noqa: E402
from megatron_vespo.models.trainable import build_model_and_optimizer  # noqa: E402
from megatron_vespo.train.sample import TrainSample  # noqa: E402
from megatron_vespo.train.step import PolicyTrainer  # noqa: E402
from tests.model_state import gather_full_state_dict  # noqa: E402

FLIPPED = [(0, 1, 0), (0, 1, 1), (5, 3, 0)]  # (sample, layer, response position) given another expert set
REORDERED = (1, 0, 0)  # same set, other order: not a flip


def own_routing(trainer: PolicyTrainer, samples: list[TrainSample]) -> list[np.ndarray]:
    """[R, layers, topk] expert ids the trainer itself picks at each response position (1 process)."""
    micro_batches = trainer._plan(samples)
    with trainer.router_recorder.capture() as records:
        trainer.compute_logprobs(samples)
    layers, topk = trainer.cfg.model.num_hidden_layers, trainer.cfg.model.num_experts_per_tok
    out: list = [None] * len(samples)
    per_mb = len(records) // len(micro_batches)
    for m, mb in enumerate(micro_batches):
        maps = sorted(records[m * per_mb:(m + 1) * per_mb], key=lambda r: r[0])
        ids = torch.stack([rm.float().topk(topk, dim=-1).indices for _, rm in maps], dim=1)  # [T, layers, topk]
        offset = 0
        for i in mb["sample_index"].tolist():
            p, r = len(samples[i].prompt_ids), len(samples[i].response_ids)
            out[i] = ids[offset + p - 1:offset + p - 1 + r].numpy().astype(np.int64)
            offset += p + r
    assert all(o is not None and o.shape[1:] == (layers, topk) for o in out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_run_config(REPO_ROOT / "configs/tiny_vespo.yaml", ["train.micro_batch_tokens=96",
                                                                  *args.overrides])
    init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    trainable = build_model_and_optimizer(cfg)
    for group in trainable.optimizer.param_groups:  # both steps must route with the same weights
        group["lr"] = 0.0
    weights = Path(args.reference).with_suffix(".pt")
    if args.make_reference:
        torch.save(gather_full_state_dict(trainable.model, dst=0), weights)
    else:  # the reference's weights, whatever this layout initialised
        load_full_state_dict(trainable.model, torch.load(weights))
        trainable.optimizer.reload_model_params()
    trainer = PolicyTrainer(cfg, trainable)
    samples = make_samples(cfg.model.vocab_size, seed=5)
    for s, lp in zip(samples, trainer.compute_logprobs(samples)):
        s.rollout_logp = lp.tolist()
    if args.make_reference:
        routed = own_routing(trainer, samples)
        Path(args.reference).write_text(json.dumps([r.tolist() for r in routed]))
    routed = [np.asarray(r, dtype=np.uint8) for r in json.loads(Path(args.reference).read_text())]
    for i, r in enumerate(routed):
        samples[i].rollout_routed_experts = r.copy()
    baseline = trainer.train_mini_batch(samples).metrics
    num_experts = cfg.model.num_experts
    for s, layer, pos in FLIPPED:
        chosen = set(samples[s].rollout_routed_experts[pos, layer].tolist())
        other = [e for e in range(num_experts) if e not in chosen][:len(chosen)]
        samples[s].rollout_routed_experts[pos, layer] = other
    s, layer, pos = REORDERED
    samples[s].rollout_routed_experts[pos, layer] = samples[s].rollout_routed_experts[pos, layer][::-1]
    edited = trainer.train_mini_batch(samples).metrics
    keys = ("mismatch/routing_flipped_pairs", "mismatch/routing_compared_pairs", "mismatch/routing_flip_rate")
    report = {"baseline": {k: baseline.get(k) for k in keys}, "edited": {k: edited.get(k) for k in keys},
              "response_tokens": sum(len(x.response_ids) for x in samples), "layers": cfg.model.num_hidden_layers}
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    main()
