"""Routing replay (``train.routing_replay``): config rules, replay rows checked against the model and
laid out through THD packing, Megatron's RouterReplay with partial rows and activation recompute.

The real train step in every layout (r3 zero flips, r2 = the π_old pass's routing):
tests/multiproc/test_routing_flip_layouts.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vespo.config import ConfigError, load_model_config, load_run_config
from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RecomputeConfig, RunConfig, TrainConfig
from megatron_vespo.train.routing_replay import checked_replay_rows, replay_rows
from megatron_vespo.train.sample import TrainSample

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ROOT / "configs/tiny_vespo.yaml"
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")  # 4 MoE layers, 8 experts, top-2


# ---- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, fragment", [
    (["train.routing_replay=r3"], "needs rollout.return_routed_experts: true"),
    (["train.routing_replay=r2"], "needs train.recompute_old_logprobs: true"),
    (["train.routing_replay=r3", "rollout.return_routed_experts=true", "model=models/tiny_dense.yaml"],
     "the model has no experts"),
    (["train.routing_replay=r1"], "must be one of"),
])
def test_replay_needs_what_it_replays(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(TINY_RUN, overrides)
    assert info.value.path == "train.routing_replay"
    assert fragment in str(info.value)


def test_replay_modes_that_have_what_they_need_load():
    assert load_run_config(TINY_RUN, []).train.routing_replay == "none"
    load_run_config(TINY_RUN, ["train.routing_replay=r3", "rollout.return_routed_experts=true"])
    load_run_config(TINY_RUN, ["train.routing_replay=r2", "train.recompute_old_logprobs=true"])


# ---- replay rows ----------------------------------------------------------------------------------------
def sample(prompt_len: int, response_len: int, routed=None, prompt_routed=None) -> TrainSample:
    return TrainSample(prompt_ids=list(range(1, prompt_len + 1)), response_ids=list(range(response_len)),
                       rollout_logp=[0.0] * response_len, advantage=0.0, rollout_routed_experts=routed,
                       rollout_prompt_routed_experts=prompt_routed)


def rows(n: int, layers: int = 4, topk: int = 2, base: int = 0) -> np.ndarray:
    """Distinct experts per (position, layer): (base + position + layer) % 8 and the next one."""
    first = (base + np.arange(n)[:, None] + np.arange(layers)[None, :]) % 8
    return np.stack([first, (first + 1) % 8], axis=-1)[..., :topk].astype(np.uint8)


@pytest.mark.parametrize("edit, field, fragment", [
    (lambda s: setattr(s, "rollout_routed_experts", None), "rollout_routed_experts", "missing"),
    (lambda s: setattr(s, "rollout_routed_experts", rows(4)), "rollout_routed_experts", "expected 3 rows"),
    (lambda s: setattr(s, "rollout_routed_experts", rows(3, topk=1)), "rollout_routed_experts", "top-2"),
    (lambda s: setattr(s, "rollout_routed_experts", rows(3, layers=3)), "rollout_routed_experts", "4 MoE layers"),
    (lambda s: setattr(s, "rollout_routed_experts", rows(3) + 7), "rollout_routed_experts", "8 experts"),
    (lambda s: setattr(s, "rollout_routed_experts", np.zeros((3, 4, 2), np.uint8)), "rollout_routed_experts",
     "repeats an expert"),
    (lambda s: setattr(s, "rollout_prompt_routed_experts", rows(5)), "rollout_prompt_routed_experts",
     "expected 4 rows"),
])
def test_rows_that_do_not_fit_the_model_are_refused_naming_the_field(edit, field, fragment):
    good = sample(5, 3, rows(3), rows(4))
    checked_replay_rows([good], MOE)  # fits
    bad = sample(5, 3, rows(3), rows(4))
    edit(bad)
    with pytest.raises(ValueError) as info:
        checked_replay_rows([good, bad], MOE)
    assert f"TrainSample.{field} of sample 1" in str(info.value)
    assert fragment in str(info.value)


def test_unreported_shape_is_read_as_the_models():
    """An engine that did not say its shape gives [R, 1, layers * topk] (see routing.routed_shape)."""
    flat = rows(3).reshape(3, 1, 8)
    (prompt, response), = checked_replay_rows([sample(2, 3, flat)], MOE)
    assert prompt is None and np.array_equal(response, rows(3))


def test_rows_follow_the_packing_prompt_rows_where_reported():
    """Sequence at offset o with P prompt tokens: prompt row p at o + p (p < P - 1), response row j at
    o + P - 1 + j; the last token of each sequence and padding route themselves (-1)."""
    samples = [sample(3, 2, rows(2, base=10), rows(2, base=20)), sample(4, 3, rows(3, base=30))]
    checked = checked_replay_rows(samples, MOE)
    out = replay_rows(checked, samples, [1, 0], num_tokens=14)  # packed as sample 1, then sample 0, 2 padding
    first = out[:, 0, 0].tolist()
    # (layer 0's first expert of row i of base b is (b + i) % 8)
    # sample 1: no prompt rows (3 x -1), response rows at 3..5, its last token 6
    # sample 0: prompt rows at 7, 8, response rows at 9, 10, its last token 11; padding 12, 13
    assert first == [-1, -1, -1, 30 % 8, 31 % 8, 32 % 8, -1, 20 % 8, 21 % 8, 10 % 8, 11 % 8, -1, -1, -1]
    assert out[9, 3].tolist() == [(10 + 3) % 8, (10 + 4) % 8]  # layer column 3 of response row 0


# ---- Megatron's RouterReplay with the platform extension -----------------------------------------------
def _default_topk(scores, topk, num_groups=None, group_topk=None):
    return torch.topk(scores, k=topk, dim=1)


@pytest.fixture()
def router_replay():
    from megatron_vespo import platform
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    platform.apply()
    replay = RouterReplay()
    yield replay, RouterReplayAction
    RouterReplay.global_router_replay_instances.remove(replay)


def test_rows_of_minus_one_keep_the_routers_choice(router_replay):
    replay, action = router_replay
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.7, 0.0], [0.0, 0.1, 0.2, 0.3]])
    replay.set_router_replay_action(action.REPLAY_FORWARD)
    replay.set_target_indices(torch.tensor([[0, 3], [-1, -1], [1, 0]]))
    probs, idx = replay.get_replay_topk(scores, 2, None, None, _default_topk)
    assert idx.tolist() == [[0, 3], [0, 2], [1, 0]]
    # The gate weights are the current router's scores at the replayed experts.
    assert torch.allclose(probs, torch.tensor([[0.1, 0.2], [0.8, 0.7], [0.1, 0.0]]))


def test_rows_of_the_wrong_shape_are_refused(router_replay):
    replay, action = router_replay
    replay.set_router_replay_action(action.REPLAY_FORWARD)
    replay.set_target_indices(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="sees 3 tokens with top-2"):
        replay.get_replay_topk(torch.rand(3, 4), 2, None, None, _default_topk)


def test_a_recompute_in_the_backward_pass_replays_the_rows_in_forward_order(router_replay):
    """Two micro-batches' forwards, then their backwards (as 1F1B runs them): each recompute gets its
    own micro-batch's rows, though the forward target is by then the second one."""
    replay, action = router_replay
    replay.set_router_replay_action(action.REPLAY_FORWARD)
    seen = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(replay.get_replay_topk(torch.rand(2, 4), 2, None, None, _default_topk)[1].tolist())
            return grad

    outs = []
    for rows_ in ([[0, 1], [2, 3]], [[3, 2], [1, 0]]):
        replay.set_target_indices(torch.tensor(rows_))
        assert replay.get_replay_topk(torch.rand(2, 4), 2, None, None, _default_topk)[1].tolist() == rows_
        outs.append(Recompute.apply(torch.ones(1, requires_grad=True)))
    for out in outs:
        out.sum().backward()
    assert seen == [[[0, 1], [2, 3]], [[3, 2], [1, 0]]]


# ---- a real model: replayed experts, under activation recompute too ------------------------------------
@pytest.fixture(scope="module")
def single_process():
    from megatron_vespo.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _replayed_step(recompute: RecomputeConfig, target: torch.Tensor):
    """Loss, gradients and the routers' top-k sets of one forward + backward with ``target``
    ([T, layers, topk]) replayed, through the provider and RoutingReplay."""
    from megatron.core import tensor_parallel

    from megatron_vespo.models.provider import build_gpt_model
    from megatron_vespo.train.routing import RouterRecorder
    from megatron_vespo.train.routing_replay import RoutingReplay

    cfg = RunConfig(model=MOE, parallel=ParallelConfig(), precision=PrecisionConfig(params_dtype="fp32"),
                    train=TrainConfig(recompute=recompute, routing_replay="r2", recompute_old_logprobs=True))
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = build_gpt_model(cfg)
    replay = RoutingReplay([model], MOE, sequence_parallel=False, tp_size=1, tp_rank=0)
    recorder = RouterRecorder([model], MOE.num_hidden_layers)
    tokens = torch.randint(0, MOE.vocab_size, (1, target.shape[0]), generator=torch.Generator().manual_seed(5))
    with replay.active("replay"), recorder.capture() as records:
        replay.load_rows(model, target)
        logits = model(tokens, torch.arange(target.shape[0])[None], None)
        loss = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).mean().neg()
        loss.backward()
    sets = {layer: m.float().topk(2, dim=-1).indices.sort(-1).values for layer, m in records[:MOE.num_hidden_layers]}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sets


@pytest.mark.parametrize("recompute", [RecomputeConfig(granularity="full"),
                                       RecomputeConfig(granularity="selective", modules=["moe"])],
                         ids=["full", "selective-moe"])
def test_replay_holds_under_activation_recompute(single_process, recompute):
    """The routers take the replayed experts, and the backward's recompute replays the same ones:
    gradients equal those without recompute (a recompute routing itself would change them)."""
    target = torch.rand(48, MOE.num_hidden_layers, MOE.num_experts, generator=torch.Generator().manual_seed(3)
                        ).topk(2, dim=-1).indices
    target[-1] = -1  # a position without a row: the router's own choice
    loss0, grads0, sets0 = _replayed_step(RecomputeConfig(), target)
    for layer, got in sets0.items():
        assert torch.equal(got[:-1], target[:-1, layer].sort(-1).values)
    loss, grads, _ = _replayed_step(recompute, target)
    assert torch.allclose(loss, loss0, rtol=0, atol=1e-6)
    worst = max((grads[n] - grads0[n]).abs().max().item() for n in grads)
    assert worst <= 1e-6, f"gradients differ by {worst}"
    assert grads["decoder.layers.0.mlp.router.weight"].abs().sum() > 0  # gate weights stay in the graph


# ---- r3 against a real bf16 engine: the lag-0 gap it removes -------------------------------------------
def test_r3_lowers_the_lag0_gap_to_a_bf16_engine_on_the_same_samples(single_process, tmp_path):
    """The fp32 trainer's weights are served by the CPU engine in bf16 (in this process, without HTTP),
    which samples 64 responses and returns their log-probs μ and routed experts. One update at lr 0
    (weights unchanged: lag 0 on both sides) is measured without replay and with r3 on the SAME samples:
    bf16-vs-fp32 near-ties flip some routing decisions without replay, r3 replays the engine's choices
    (flip rate exactly 0) and the mean |log π_θ − log μ| per token is lower. A third pass without replay
    repeats the first exactly, so the comparison is paired."""
    import threading

    from megatron.core import tensor_parallel

    from megatron_vespo.checkpoint.export import iter_hf_weights
    from megatron_vespo.checkpoint.hf_io import write_hf_model_dir
    from megatron_vespo.driver.rollout import prompt_routed_experts, response_routed_experts
    from megatron_vespo.models.trainable import build_model_and_optimizer
    from megatron_vespo.train.step import PolicyTrainer
    from rollout_sglang.cpu_server.engine import CpuEngine, Sequence
    from rollout_sglang.cpu_server.sampling import SamplingParams
    from rollout_sglang.types import Sample

    cfg = load_run_config(TINY_RUN, ["train.routing_replay=r3", "rollout.return_routed_experts=true"])
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    trainable = build_model_and_optimizer(cfg)
    for group in trainable.optimizer.param_groups:  # every pass must see the weights the engine serves
        group["lr"] = 0.0
    hf_dir = write_hf_model_dir([t for bucket in iter_hf_weights(trainable.model, cfg.model) for t in bucket],
                                cfg.model, tmp_path / "hf")

    engine = CpuEngine(str(hf_dir), dtype="bf16")
    done = threading.Semaphore(0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.model.vocab_size, (6,), generator=gen).tolist() for _ in range(8)]
    seqs = [Sequence(rid=f"p{p}", index=k, prompt_ids=prompt, params=SamplingParams(max_new_tokens=16),
                     seed=100 * p + k, return_routed_experts=True, on_done=lambda s: done.release())
            for p, prompt in enumerate(prompts) for k in range(8)]
    try:
        engine.submit(seqs)
        for _ in seqs:
            assert done.acquire(timeout=120), "the engine did not finish the batch"
    finally:
        engine.shutdown()
    samples = []
    for s in seqs:
        # What the server returns: one row per position fed forward (the last sampled token is not).
        rows = np.concatenate(s.routed, axis=0)[:len(s.prompt_ids) + len(s.output_ids) - 1]
        out = Sample(rid=s.rid, prompt_ids=s.prompt_ids, output_ids=s.output_ids, output_logprobs=s.logprobs,
                     finish_reason=s.finish, weight_version="0", prompt_tokens=len(s.prompt_ids),
                     completion_tokens=len(s.output_ids), routed_experts=rows)
        samples.append(TrainSample(prompt_ids=s.prompt_ids, response_ids=s.output_ids, rollout_logp=s.logprobs,
                                   advantage=float(torch.randn(1, generator=gen)),
                                   rollout_routed_experts=response_routed_experts(out, len(s.prompt_ids)),
                                   rollout_prompt_routed_experts=prompt_routed_experts(out, len(s.prompt_ids))))

    trainer = PolicyTrainer(cfg, trainable)
    measured = {}
    for mode in ("none", "r3", "none_again"):
        trainer.routing_replay = mode.removesuffix("_again")
        measured[mode] = trainer.train_mini_batch(samples).metrics
    none, r3 = measured["none"], measured["r3"]
    print(f"\nlag-0 log-prob gap to the bf16 engine: without replay {none['mismatch/logp_gap_mean']:.4e} "
          f"(max {none['mismatch/logp_gap_max']:.3e}, {none['mismatch/routing_flipped_pairs']:.0f} of "
          f"{none['mismatch/routing_compared_pairs']:.0f} (token, layer) pairs flipped), with r3 "
          f"{r3['mismatch/logp_gap_mean']:.4e} (max {r3['mismatch/logp_gap_max']:.3e}, "
          f"{r3['mismatch/routing_flipped_pairs']:.0f} flipped)")
    assert measured["none_again"]["mismatch/logp_gap_mean"] == none["mismatch/logp_gap_mean"]  # paired
    assert none["mismatch/routing_compared_pairs"] == r3["mismatch/routing_compared_pairs"] == 64 * 16 * 4
    assert none["mismatch/routing_flipped_pairs"] > 0, "no routing flip: the comparison would be empty"
    assert r3["mismatch/routing_flipped_pairs"] == 0 and r3["mismatch/routing_flip_rate"] == 0.0
    assert 0 < r3["mismatch/logp_gap_mean"] < none["mismatch/logp_gap_mean"]
