"""loss.kl's frozen reference model in real Megatron steps (one process, CPU, the tiny MoE, bf16).

The run starts from an HF directory (``checkpoint.init_from``, converted once like any run's) and the
reference defaults to it. The driver is the synchronous loop's own (built without a fleet: nothing here
generates); a rollout batch of 2 mini-batches goes through ``prepare_mini_batches`` (the reference pass,
in reward mode the penalty) and ``train_step``, as ``run_step`` does. Checked:

- at the first update the policy is the reference: the KL is exactly 0 (k1, k2 and k3), and positive (k2,
  k3; k1 nonzero) once the policy has moved (the second mini-batch, lag 1);
- the reference's weights never change, it holds no gradient and stays in eval mode;
- in reward mode the advantages are GRPO's of reward − coef · Σ_t (log μ_t − log π_ref,t).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_vespo.advantages import grpo_advantages
from megatron_vespo.config import load_run_config
from megatron_vespo.losses.kl import kl_estimate
from megatron_vespo.train.sample import TrainSample

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SAMPLES = 4, 4


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """One process's distributed state, and a random tiny MoE saved as an HF directory (the run's init_from)."""
    from megatron_vespo.checkpoint.export import iter_hf_weights
    from megatron_vespo.checkpoint.hf_io import write_hf_model_dir
    from megatron_vespo.distributed import destroy_distributed, init_distributed
    from megatron_vespo.models.trainable import build_model_chunks

    tmp = tmp_path_factory.mktemp("reference")
    cfg = run_config(tmp)
    ctx = init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    named = [pair for bucket in iter_hf_weights(build_model_chunks(cfg), cfg.model, dtype=torch.float32)
             for pair in bucket]
    write_hf_model_dir(named, cfg.model, tmp / "init_hf")
    yield tmp, ctx
    destroy_distributed()


def run_config(tmp: Path, *overrides: str):
    return load_run_config(ROOT / "configs/tiny_vespo.yaml", [
        "precision.params_dtype=bf16", "optimizer.lr=1e-2", "train.micro_batch_tokens=64", "train.staleness=2",
        f"rollout.n_samples={SAMPLES}", f"train.mini_batch_prompts={PROMPTS // 2}", f"run.output_dir={tmp / 'out'}",
        f"checkpoint.init_from={tmp / 'init_hf'}", "loss.kl.coef=0.05", *overrides])


def driver_for(initial_weights, *overrides: str):
    from megatron_vespo.driver.sync_loop import SyncRLDriver

    tmp, ctx = initial_weights
    return SyncRLDriver(run_config(tmp, *overrides), ctx)


def rollout_groups(driver) -> list[list[TrainSample]]:
    """4 prompt groups of 4 responses (random tokens), rewards in [0, 1); μ = the policy's own log-probs plus
    noise (a mismatched engine); advantages off-centre (mean ~0.25), so the first update raises the log-probs
    of the sampled tokens on the whole."""
    gen = torch.Generator().manual_seed(7)
    vocab = driver.cfg.model.vocab_size
    groups = []
    for _ in range(PROMPTS):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
        rewards = torch.rand(SAMPLES, generator=gen).tolist()
        groups.append([TrainSample(prompt_ids=prompt, advantage=r - 0.25, reward=r, shaped_reward=r,
                                   response_ids=torch.randint(0, vocab, (n,), generator=gen).tolist(),
                                   rollout_logp=[0.0] * n)
                       for r, n in zip(rewards, torch.randint(2, 9, (SAMPLES,), generator=gen).tolist())])
    samples = [s for g in groups for s in g]
    for s, lp in zip(samples, driver.trainer.compute_logprobs(samples)):
        s.rollout_logp = (lp + 0.1 * torch.randn(lp.shape, generator=gen)).tolist()
    return groups


def reference_state(driver) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for chunk in driver.reference.chunks for name, p in chunk.named_parameters()}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_exactly_zero_at_the_first_update_and_positive_after_it(initial_weights, estimator):
    driver = driver_for(initial_weights, f"loss.kl.estimator={estimator}")
    reference = driver.reference
    assert reference is not None and reference.checkpoint.parent.name == "init"  # init_from's own conversion
    before = reference_state(driver)
    metrics: dict = {}
    mini_batches = driver.prepare_mini_batches(0, rollout_groups(driver), metrics, 2)
    assert "time/reference_s" in metrics and "kl/reward_penalty_mean" not in metrics  # mode loss: no penalty
    # The stored reference log-probs are the (identical) initial policy's, bit for bit, packed as the update.
    for samples in mini_batches:
        for s, lp in zip(samples, driver.trainer.compute_logprobs(samples)):
            assert s.ref_logp == lp.tolist()
    first = driver.train_step(mini_batches[0], {})
    second = driver.train_step(mini_batches[1], {})
    assert first["loss/kl"] == 0.0
    # Lag 1: the policy moved, the reference did not. k2 and k3 are positive wherever π_θ ≠ π_ref; k1 is the
    # mean log-ratio of tokens π_θ did not sample (it is a KL only in expectation under π_θ): any sign.
    assert (abs(second["loss/kl"]) if estimator == "k1" else second["loss/kl"]) > 1e-6, second["loss/kl"]
    assert first["loss/policy_loss"] != 0.0 and first["train/grad_norm"] > 0
    after = reference_state(driver)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for chunk in reference.chunks:
        assert not any(p.requires_grad or p.grad is not None for p in chunk.parameters())
        assert not any(m.training for m in chunk.modules())
    # The moved policy against the reference, over every token: away from 0 (k2, k3: above it).
    samples = [s for mb in mini_batches for s in mb]
    logp = torch.cat(driver.trainer.compute_logprobs(samples))
    ref = torch.tensor([x for s in samples for x in s.ref_logp])
    kl = float(kl_estimate(logp, ref, estimator).mean())
    assert (abs(kl) if estimator == "k1" else kl) > 1e-6


def test_reward_mode_lowers_each_reward_by_coef_times_its_sequence_kl(initial_weights):
    coef = 0.5
    driver = driver_for(initial_weights, "loss.kl.mode=reward", f"loss.kl.coef={coef}")
    groups = rollout_groups(driver)
    metrics: dict = {}
    mini_batches = driver.prepare_mini_batches(0, groups, metrics, 2)
    samples = [s for g in groups for s in g]
    seq_kl = torch.tensor([sum(m - r for m, r in zip(s.rollout_logp, s.ref_logp)) for s in samples],
                          dtype=torch.float64)  # k1 of μ against π_ref, summed over the response
    assert seq_kl.abs().min() > 0  # μ is the policy plus noise: every response has a KL to the reference
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    expected, _ = grpo_advantages(rewards - coef * seq_kl, torch.arange(PROMPTS).repeat_interleave(SAMPLES))
    unpenalised, _ = grpo_advantages(rewards, torch.arange(PROMPTS).repeat_interleave(SAMPLES))
    got = torch.tensor([s.advantage for s in samples])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (got - unpenalised).abs().max() > 1e-3
    assert metrics["kl/reward_penalty_mean"] == pytest.approx(coef * float(seq_kl.mean()), rel=1e-9)
    record = driver.train_step(mini_batches[0], metrics)
    assert record["loss/kl"] == 0.0  # reported (k1 of π_θ), not in the loss: the reference is still the policy
    assert record["kl/reward_penalty_mean"] == metrics["kl/reward_penalty_mean"]
