"""The frozen reference model of ``loss.kl``: π_ref, sharded like the policy, forward only.

Built only when ``loss.kl.coef > 0``, from ``loss.kl.reference`` or else ``checkpoint.init_from``, read
the way ``init_from`` is (a Hugging Face directory converted once into ``<checkpoint root>/init``, or
``/reference`` for a reference of its own, or a converted Megatron checkpoint; every rank loads its own
shards), also when the run resumes (the
reference stays the initial weights, whatever the policy has become). Its chunks are the policy's
model in the same TP/PP/EP layout and precision (``Float16Module`` for bf16/fp16, no DDP wrapper, no
optimizer, no gradients), always in eval mode, without routing replay or activation recompute: it
routes its own MoE tokens. Megatron's RNG states are left as they were before it was built.

Once per rollout batch, before the updates, :meth:`ReferencePolicy.attach_logprobs` runs it through the
trainer's own forward-only log-prob pass (:meth:`PolicyTrainer.compute_logprobs`, same packing, kernel
and temperature as the update) and stores ``TrainSample.ref_logp``. The pass goes mini-batch by
mini-batch, so each is packed exactly as its update packs it: with the reference equal to the policy,
the KL of the first update is exactly 0.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_vespo.config.schema import RecomputeConfig, RunConfig
from megatron_vespo.train.sample import TrainSample
from megatron_vespo.train.step import PolicyTrainer


class ReferencePolicy:
    """Forward-only model chunks of π_ref in the policy's layout (see the module docstring)."""

    def __init__(self, cfg: RunConfig, checkpoint: Path):
        from megatron_vespo.checkpoint.init_weights import load_model_weights
        from megatron_vespo.checkpoint.training import capture_rng_state, restore_rng_state
        from megatron_vespo.models.trainable import build_model_chunks

        # The policy's model without the policy's training machinery.
        ref_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, routing_replay="none", recompute=RecomputeConfig()))
        rng = capture_rng_state()  # random initialisation (overwritten by the load) must not shift the run's RNG
        try:
            chunks = build_model_chunks(ref_cfg)
        finally:
            restore_rng_state(rng)
        load_model_weights(chunks, checkpoint, cfg.model)
        config = chunks[0].config
        if config.bf16 or config.fp16:
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(config, chunk) for chunk in chunks]
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.chunks: list[torch.nn.Module] = chunks
        self.checkpoint = checkpoint

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Optional["ReferencePolicy"]:
        """The reference of ``cfg.loss.kl`` (None while its coef is 0). Collective: an HF directory is
        converted once by rank 0 (:func:`~megatron_vespo.checkpoint.init_weights.resolve_init_checkpoint`)."""
        if not cfg.loss.kl.enabled:
            return None
        from megatron_vespo.checkpoint.init_weights import resolve_init_checkpoint
        from megatron_vespo.checkpoint.training import checkpoint_root

        path, field = cfg.kl_reference
        # The initial weights share the policy's conversion; other weights get a cache of their own, so that
        # an initial HF directory of the same name never stands in for them.
        cache = checkpoint_root(cfg) / ("init" if path == cfg.checkpoint.init_from else "reference")
        return cls(cfg, resolve_init_checkpoint(path, cfg.model, cache, field=field))

    def attach_logprobs(self, trainer: PolicyTrainer, mini_batches: Sequence[Sequence[TrainSample]]) -> float:
        """``ref_logp`` of every sample, one forward-only pass per mini-batch (packed as its update will
        be). Collective: every rank, the same mini-batches. Seconds taken."""
        t0 = time.monotonic()
        for samples in mini_batches:
            if samples:
                for sample, lp in zip(samples, trainer.compute_logprobs(samples, chunks=self.chunks)):
                    sample.ref_logp = lp.tolist()
        return time.monotonic() - t0
