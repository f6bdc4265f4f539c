"""torchrun worker: the train step's routing flip rate against known rollout experts.

``--make-reference`` (one process): record the trainer's own top-k experts of every response
position (forward only) and write them as the samples' ``rollout_routed_experts``, with the
weights. Every run (any layout) then loads both files, edits a few entries (three real flips, one
reordered set that is not a flip) and runs one optimizer step with lr set to 0 under the given
layout; the report holds the step's metrics.

Routing replay (same launch, same weights; the model is built with ``train.routing_replay`` hooks and the
mode is switched on the trainer between phases):

- r3: random engine experts (prompt and response rows, no relation to the trainer's router) are
  replayed; the routers' top-k sets must equal them at every (position, MoE layer) with a row, in the
  log-prob pass and in the update (flip rate exactly 0), while the same rows without replay flip;
  the replayed log-probs go in the report (every layout must match the one-process ones).
- r2: the π_old pass records the routing, the routers' weights are then perturbed (without replay a
  forward now routes differently), and the update must route exactly as recorded.
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


def random_rows(rows: int, layers: int, topk: int, num_experts: int, gen: torch.Generator) -> np.ndarray:
    """[rows, layers, topk] distinct random experts per (position, layer)."""
    scores = torch.rand(rows, layers, num_experts, generator=gen)
    return scores.topk(topk, dim=-1).indices.numpy().astype(np.uint8)


def routers(trainable):
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in trainable.model for m in chunk.modules() if isinstance(m, TopKRouter)]


def world_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


class Peek:
    """An iterator that remembers the micro-batch it handed out last."""

    def __init__(self, it):
        self.it, self.last = it, None

    def __iter__(self):
        return self

    def __next__(self):
        self.last = next(self.it)
        return self.last


def r3_flips(trainer: PolicyTrainer, samples: list[TrainSample]) -> dict[str, float]:
    """(flipped, compared) pairs over every position with a replay row (prompt and response) in a
    log-prob pass, summed over ranks, and the replayed log-probs. Counted per forward call (under
    virtual pipeline stages a micro-batch's chunks do not run back to back)."""
    from megatron_vespo.train.routing import count_flips
    from megatron_vespo.train.routing_replay import checked_replay_rows, replay_rows

    checked = checked_replay_rows(samples, trainer.cfg.model)
    counts = torch.zeros(2, dtype=torch.float64)
    original = trainer._forward_step

    def counting_forward_step(normalizer, replay, data_iterator, model):
        nonlocal counts
        peek = Peek(data_iterator)
        with trainer.router_recorder.capture() as records:
            out = original(normalizer, replay, peek, model)
        mb = peek.last
        rows = mb.get("replay_rows")
        if rows is None:  # replay off (the control): the same rows, laid out the same way
            rows = replay_rows(checked, samples, mb["sample_index"].tolist(), mb["num_tokens"])
        counts += count_flips(list(records), rows.long(), torch.ones(mb["num_tokens"]), trainer.router_recorder,
                              tp_rank=trainer.tp_rank)
        return out

    trainer._forward_step = counting_forward_step
    try:
        logp = trainer.compute_logprobs(samples)
    finally:
        del trainer._forward_step
    flipped, compared = world_sum(counts.tolist())
    return {"flipped": flipped, "compared": compared, "logp": [lp.tolist() for lp in logp]}


def routing_differences(a, b) -> list[float]:
    """(router calls, token rows whose top-k set differs) between two recordings of the same passes."""
    assert len(a) == len(b), (len(a), len(b))
    rows = 0
    for (la, ma), (lb, mb) in zip(a, b):
        assert la == lb and ma.shape == mb.shape
        rows += int((ma.bool() != mb.bool()).any(-1).sum())
    return world_sum([float(len(a)), float(rows)])


def replay_phases(trainer: PolicyTrainer, trainable, samples: list[TrainSample]) -> dict:
    cfg = trainer.cfg
    layers, topk, experts = cfg.model.num_hidden_layers, cfg.model.num_experts_per_tok, cfg.model.num_experts
    gen = torch.Generator().manual_seed(11)
    for s in samples:
        s.rollout_routed_experts = random_rows(len(s.response_ids), layers, topk, experts, gen)
        s.rollout_prompt_routed_experts = random_rows(len(s.prompt_ids) - 1, layers, topk, experts, gen)
    report: dict = {}
    trainer.routing_replay = "none"
    report["r3_control"] = {k: v for k, v in r3_flips(trainer, samples).items() if k != "logp"}
    trainer.routing_replay = "r3"
    report["r3_logprob_pass"] = r3_flips(trainer, samples)
    keys = ("mismatch/routing_flipped_pairs", "mismatch/routing_compared_pairs", "mismatch/routing_flip_rate")
    metrics = trainer.train_mini_batch(samples).metrics
    report["r3_update"] = {k: metrics.get(k) for k in keys}

    # r2: record in the π_old pass, perturb the routers, the update must still route as recorded.
    trainer.routing_replay = "r2"
    for s in samples:
        s.rollout_routed_experts = s.rollout_prompt_routed_experts = None
    with trainer.router_recorder.capture() as recorded:
        trainer.compute_logprobs(samples, record_routing=True)
    recorded = list(recorded)
    with torch.no_grad():
        for router in routers(trainable):
            g = torch.Generator().manual_seed(100 + int(router.layer_number))
            router.weight.add_(torch.randn(router.weight.shape, generator=g) * router.weight.abs().mean())
    trainer.routing_replay = "none"  # control: a forward without replay now routes differently
    with trainer.router_recorder.capture() as free:
        trainer.compute_logprobs(samples)
    report["r2_control"] = routing_differences(recorded, list(free))
    trainer.routing_replay = "r2"
    with trainer.router_recorder.capture() as replayed:
        trainer.train_mini_batch(samples)
    report["r2_update"] = routing_differences(recorded, list(replayed))
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # Built with the replay hooks (r3 needs returned experts); each phase sets the trainer's mode.
    cfg = load_run_config(REPO_ROOT / "configs/tiny_vespo.yaml", ["train.micro_batch_tokens=96",
                                                                  "train.routing_replay=r3",
                                                                  "rollout.return_routed_experts=true",
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
    trainer.routing_replay = "none"  # the flip measurements first: the trainer routes itself
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
              "response_tokens": sum(len(x.response_ids) for x in samples), "layers": cfg.model.num_hidden_layers,
              "prompt_rows": sum(len(x.prompt_ids) - 1 for x in samples)}
    report.update(replay_phases(trainer, trainable, samples))
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    main()
