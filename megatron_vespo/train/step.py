"""The policy update: packed micro-batches through Megatron's schedule, the loss in the last stage.

One call of :meth:`PolicyTrainer.train_mini_batch` is one optimizer step on one mini-batch:

1. the mini-batch's samples (every rank receives all of them) are planned into THD micro-batches
   under the token budget, balanced over data-parallel ranks (:mod:`megatron_vespo.train.packing`);
2. the normaliser (valid tokens and sequences of the whole mini-batch: this rank's micro-batches
   summed over data-parallel ranks) is fixed before the step;
3. ``get_forward_backward_func()`` runs the micro-batches through the model chunks with the loss
   closure: in the last pipeline stage, vocab-parallel token log-probs from the ``[T, V/TP]`` logits
   (:mod:`megatron_vespo.train.logprobs`) feed the registered policy loss
   (:mod:`megatron_vespo.losses`);
4. gradients are checked for non-finite values on every rank (a bad step is skipped, counted and
   never reaches the weights), then Megatron's optimizer clips and steps, then the LR schedule.

Routing mismatch (MoE): when the samples carry the rollout engine's routed experts, the training
forward records the trainer's own top-k expert sets (:mod:`megatron_vespo.train.routing`) and the
step reports ``mismatch/routing_flip_rate``. By default nothing is replayed: the trainer routes
itself. With ``train.routing_replay`` r3 the engine's experts are replayed in every forward (update
and log-prob pass), with r2 the update replays what the π_old pass recorded
(:mod:`megatron_vespo.train.routing_replay`); the flip rate then measures the replayed routing.

Loss scaling: every micro-batch loss is already divided by the global normaliser, so the schedule
must neither average over micro-batches nor the gradient reduction over data-parallel ranks. The
provider sets ``calculate_per_token_loss=True`` (no division, DP grads summed) and this module hands
``finalize_model_grads`` no token count (no division there either).

Attention over packed sequences: with Transformer Engine the THD layout goes to TE's varlen kernels
through ``PackedSeqParams``; Megatron's local attention (CPU) does not take ``PackedSeqParams``, so
the same packed row is given a block-diagonal causal mask instead. RoPE only depends on position
differences inside a sequence, so both give the same result.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.losses import Normalizer, PolicyBatch, compute_policy_loss, normalizer_from_masks
from megatron_vespo.metrics import MetricBag
from megatron_vespo.models.provider import te_available
from megatron_vespo.models.trainable import Trainable
from megatron_vespo.train.logprobs import vocab_parallel_logprobs
from megatron_vespo.train.packing import iter_rank_micro_batches, pack_sequences
from megatron_vespo.train.routing import (
    RouterRecorder, count_flips, flip_metrics, reduce_flip_counts, rollout_experts_shape, routed_positions,
    routed_shape,
)
from megatron_vespo.train.routing_replay import RoutingReplay, checked_replay_rows, replay_rows
from megatron_vespo.train.sample import TrainSample


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, T, T]`` bool mask, True where attention is NOT allowed (Megatron's convention):
    token i may attend to j only if both lie in the same packed segment and j <= i."""
    segment = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(total, total, dtype=torch.bool).tril_()
    return ~(same & causal)[None, None]


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float
    skipped: bool
    num_micro_batches: int


class PolicyTrainer:
    """Runs policy-loss updates and forward-only log-prob passes for one parallel Megatron model.

    Every rank of the job constructs it and calls the same methods with the same samples
    (:class:`~megatron_vespo.train.sample.TrainSample`).
    """

    def __init__(self, cfg: RunConfig, trainable: Trainable, scheduler: Any = None, temperature: float = 1.0):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.trainable = trainable
        self.scheduler = scheduler
        self.temperature = temperature
        self.config = trainable.config
        if not self.config.calculate_per_token_loss:
            raise ValueError("the TransformerConfig must have calculate_per_token_loss=True: the policy losses are "
                             "normalised globally and must be summed, not averaged, over micro-batches and DP ranks")
        # Our losses carry their own global normaliser: reduce grads without any token-count scaling.
        finalize = self.config.finalize_model_grads_func
        self.config.finalize_model_grads_func = lambda model, num_tokens=None, **kw: finalize(model, None, **kw)
        self.use_packed_params = te_available()
        if cfg.parallel.context > 1:
            # The losses take a CP all-reduce for their per-sequence sums, but splitting packed
            # sequences over CP ranks (TE's THD partitioning) is not wired into the step yet.
            raise NotImplementedError("parallel.context > 1 is not supported by the train step yet")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        # Sequence parallelism splits the token dimension over TP ranks: pad packed rows to a multiple.
        self.pad_to_multiple = cfg.parallel.tensor if self.config.sequence_parallel else 1
        # The interleaved schedule (virtual pipeline stages) runs micro-batches in groups of
        # microbatch_group_size_per_vp_stage (PP by default) and raises unless their count is a
        # multiple of it: the packer rounds the count up (smaller micro-batches, same gradient).
        self.micro_batch_multiple = 1
        if len(trainable.model) > 1:
            self.micro_batch_multiple = self.config.microbatch_group_size_per_vp_stage or cfg.parallel.pipeline
        self._bag = MetricBag()
        self._collected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.router_recorder: Optional[RouterRecorder] = None
        if cfg.model.is_moe:
            self.router_recorder = RouterRecorder(trainable.model, cfg.model.num_hidden_layers,
                                                  cfg.model.mlp_only_layers)
        self._flip_counts = torch.zeros(2, dtype=torch.float64)
        # Routing replay (r2/r3): per-router rows handed to Megatron's RouterReplay objects.
        self.routing_replay = cfg.train.routing_replay
        self.replay: Optional[RoutingReplay] = None
        if self.routing_replay != "none":
            self.replay = RoutingReplay(trainable.model, cfg.model, sequence_parallel=bool(self.config.sequence_parallel),
                                        tp_size=cfg.parallel.tensor, tp_rank=self.tp_rank)
        # r2: what the π_old pass recorded, per mini-batch (keyed by its samples' identities) and micro-batch.
        self._r2_records: dict[tuple[int, ...], list[dict[int, torch.Tensor]]] = {}
        self._recording: Optional[list[dict[int, torch.Tensor]]] = None

    # ----------------------------------------------------------------------------------------- data
    def _plan(self, samples: Sequence[TrainSample]) -> list[dict[str, Any]]:
        plan = pack_sequences([s.num_tokens for s in samples], self.cfg.train.micro_batch_tokens, self.dp_size,
                              count_multiple=self.micro_batch_multiple)
        # Routed experts are [R, layers, topk] per sample: laid out per micro-batch here, not by the packer.
        shape = routed_shape(samples, *rollout_experts_shape(self.cfg.model)) \
            if self.router_recorder is not None else None
        micro_batches = list(iter_rank_micro_batches(plan, samples, self.dp_rank, pad_to_multiple=self.pad_to_multiple))
        if shape is not None:
            for mb in micro_batches:
                mb["routed_experts"] = routed_positions(samples, mb["sample_index"].tolist(), mb["num_tokens"], *shape)
        for m, mb in enumerate(micro_batches):
            mb["mb_index"] = m
        if self.replay is not None and self.routing_replay == "r3":
            rows = checked_replay_rows(samples, self.cfg.model)
            for mb in micro_batches:
                mb["replay_rows"] = replay_rows(rows, samples, mb["sample_index"].tolist(), mb["num_tokens"])
        return micro_batches

    def _model_inputs(self, mb: Mapping[str, Any]) -> dict[str, Any]:
        total = mb["num_tokens"]
        inputs = {"input_ids": mb["input_ids"][None], "position_ids": mb["position_ids"][None]}
        if self.use_packed_params:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = mb["cu_seqlens"].to(torch.cuda.current_device()) if torch.cuda.is_available() else mb["cu_seqlens"]
            inputs["attention_mask"] = None
            inputs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                max_seqlen_q=mb["max_seqlen"], max_seqlen_kv=mb["max_seqlen"])
        else:
            inputs["attention_mask"] = block_causal_mask(mb["cu_seqlens"], total)
        device = _model_device(self.trainable.model[0])
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    # ------------------------------------------------------------------------------------ schedule
    def _token_logprobs(self, output: torch.Tensor, mb: Mapping[str, Any],
                        entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits = output.reshape(-1, output.shape[-1])  # [1, T, V/TP] -> [T, V/TP]
        labels = mb["labels"].to(logits.device)
        return vocab_parallel_logprobs(
            logits, labels, tp_group=self.tp_group, chunk_tokens=self.cfg.train.logprob_chunk_tokens,
            temperature=self.temperature, compute_entropy=entropy, vocab_size=self.cfg.model.vocab_size)

    def _loss_func(self, mb: Mapping[str, Any], normalizer: Normalizer, output: torch.Tensor):
        # The kernel's entropy is differentiable: with loss.entropy_coef > 0 the bonus's gradient flows
        # through it; otherwise it is only reported (train.compute_entropy).
        logp, entropy = self._token_logprobs(
            output, mb, entropy=self.cfg.train.compute_entropy or self.cfg.loss.entropy_coef > 0)
        device = logp.device
        num_real = mb["num_sequences"]
        # Padding tokens sit in one extra dummy sequence that has no valid token.
        num_seqs = num_real + (1 if mb["num_padding"] else 0)
        advantages = torch.zeros(num_seqs, dtype=torch.float32, device=device)
        advantages[:num_real] = mb["advantage"].to(device, torch.float32)
        rollout = mb["rollout_logp"].to(device)
        recomputed = "old_logp" in mb
        batch = PolicyBatch(
            logp=logp,
            behavior_logp=mb["old_logp"].to(device) if recomputed else rollout,
            mask=mb["loss_mask"].to(device),
            seq_index=mb["seq_index"].to(device),
            advantages=advantages,
            num_seqs=num_seqs,
            rollout_logp=rollout if recomputed else None,
            ref_logp=mb["ref_logp"].to(device) if "ref_logp" in mb else None,
            entropy=entropy,
        )
        out = compute_policy_loss(batch, normalizer, self.cfg.loss, self.cfg.correction)
        if entropy is not None:
            valid = batch.mask > 0
            out.metrics.add_mean("train/entropy_mean", entropy.detach(), valid)
        self._bag.merge(out.metrics)
        # (loss, token count, reported) -- with calculate_per_token_loss the schedule leaves loss as is.
        return out.loss, torch.tensor(1, dtype=torch.int, device=device), {}

    def _forward_step(self, normalizer: Optional[Normalizer], replay: bool, data_iterator: Iterable,
                      model: torch.nn.Module):
        mb = next(data_iterator)
        if replay:
            if "replay_rows" in mb:  # r3, every pass
                self.replay.load_rows(model, mb["replay_rows"])
            elif "replay_recorded" in mb:  # r2, the update
                self.replay.load_recorded(model, mb["replay_recorded"])
        if normalizer is not None and "routed_experts" in mb and self.router_recorder is not None:
            with self.router_recorder.capture() as records:
                output = model(**self._model_inputs(mb))
            flips = count_flips(records, mb["routed_experts"], mb["loss_mask"], self.router_recorder,
                                tp_rank=self.tp_rank)
            self._flip_counts = self._flip_counts.to(flips.device) + flips
        else:
            output = model(**self._model_inputs(mb))
        if self._recording is not None:  # r2, the π_old pass: keep what each router of this chunk chose
            self._recording[mb["mb_index"]].update(self.replay.take_recorded(model))
        if normalizer is None:  # forward-only log-prob pass
            return output, partial(self._collect_logprobs, mb)
        return output, partial(self._loss_func, mb, normalizer)

    def _run_schedule(self, micro_batches: list[dict[str, Any]], normalizer: Optional[Normalizer],
                      forward_only: bool, chunks: Optional[list[torch.nn.Module]] = None) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # Another model (the frozen reference) routes itself: routing replay drives the policy's routers only.
        replay = chunks is None and self.replay is not None
        chunks = chunks or self.trainable.model
        iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
        # Packed lengths differ between micro-batches: the provider sets variable_seq_lengths, so the
        # pipeline exchanges shapes first and seq_length only sizes the first exchange.
        max_tokens = max(mb["num_tokens"] for mb in micro_batches)
        # Replay rows are handed to the routers micro-batch by micro-batch in _forward_step; the
        # action covers the whole schedule, backward included (activation recompute replays too).
        action = None
        if self._recording is not None:
            action = "record"
        elif replay and any("replay_rows" in mb or "replay_recorded" in mb for mb in micro_batches):
            action = "replay"
        with self.replay.active(action) if action else nullcontext():
            get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, normalizer, replay),
                data_iterator=iterators,
                model=chunks,
                num_microbatches=len(micro_batches),
                seq_length=max_tokens,  # p2p shapes; the schedule divides by TP under sequence parallelism
                micro_batch_size=1,
                forward_only=forward_only,
            )

    # -------------------------------------------------------------------------------------- update
    def train_mini_batch(self, samples: Sequence[TrainSample]) -> StepResult:
        """One optimizer step on ``samples`` (the whole mini-batch; identical on every rank)."""
        if not samples:
            raise ValueError("train_mini_batch got an empty mini-batch")
        micro_batches = self._plan(samples)
        if self.routing_replay == "r2":
            self._attach_recorded(samples, micro_batches)
        normalizer = normalizer_from_masks(((mb["loss_mask"], mb["seq_index"]) for mb in micro_batches),
                                           self.cfg.loss.norm_constant, all_reduce_group=self.dp_group)
        for chunk in self.trainable.model:
            chunk.train()
        self.trainable.zero_grad()
        self._bag = MetricBag()
        self._flip_counts = torch.zeros(2, dtype=torch.float64)
        self._run_schedule(micro_batches, normalizer, forward_only=False)

        lr = float(self.trainable.optimizer.param_groups[0]["lr"])  # the lr this update uses
        skipped = not self._grads_finite()
        if skipped:
            self.trainable.zero_grad()
            grad_norm = float("nan")
        else:
            ok, grad_norm, _ = self.trainable.optimizer.step()
            if not ok:
                skipped = True
            if grad_norm is None:
                grad_norm = float("nan")
            if self.scheduler is not None and not skipped:
                self.scheduler.step(increment=1)
        bag = self._reduce_metrics(self._bag)
        bag.add_sum("train/skipped_nonfinite_step", torch.tensor(float(skipped)))
        metrics = self._from_last_stage(bag.compute())
        if "routed_experts" in micro_batches[0]:  # true on all ranks or none (every rank has all samples)
            metrics.update(flip_metrics(reduce_flip_counts(
                self._flip_counts, tp_group=self.tp_group, sequence_parallel=self.config.sequence_parallel,
                pp_group=self.pp_group, dp_group=self.dp_group, device=_model_device(self.trainable.model[0]))))
        metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/micro_batches"] = float(len(micro_batches))
        metrics["train/lr"] = lr
        return StepResult(metrics=metrics, grad_norm=float(grad_norm), skipped=skipped,
                          num_micro_batches=len(micro_batches))

    def _attach_recorded(self, samples: Sequence[TrainSample], micro_batches: list[dict[str, Any]]) -> None:
        """r2: hand each micro-batch the routing its π_old pass recorded (same samples, same packing)."""
        recorded = self._r2_records.pop(_samples_key(samples), None)
        if recorded is None:
            raise RuntimeError("train.routing_replay 'r2': this mini-batch had no π_old pass recording its routing "
                               "(compute_logprobs(samples, record_routing=True) on the same samples first)")
        if len(recorded) != len(micro_batches):
            raise RuntimeError(f"train.routing_replay 'r2': the π_old pass packed {len(recorded)} micro-batches, "
                               f"the update {len(micro_batches)}")
        for mb, rec in zip(micro_batches, recorded):
            mb["replay_recorded"] = rec

    def _grads_finite(self) -> bool:
        """All gradient buffers finite on every rank (one MIN all-reduce over the world)."""
        finite = True
        for chunk in self.trainable.model:
            for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
                finite = finite and bool(torch.isfinite(buffer.grad_data).all())
        flag = torch.tensor([1.0 if finite else 0.0], device=_model_device(self.trainable.model[0]))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _reduce_metrics(self, bag: MetricBag) -> MetricBag:
        # Only last-stage ranks computed the loss; TP ranks hold identical copies, so reduce over DP.
        if self.is_last_stage and dist.is_initialized() and self.dp_size > 1:
            bag.all_reduce(self.dp_group)
        return bag

    def _from_last_stage(self, value: Any) -> Any:
        """The last pipeline stage's ``value`` on every rank of the pipeline (rank 0 logs and drives)."""
        if self.cfg.parallel.pipeline == 1 or not dist.is_initialized():
            return value
        from megatron.core import parallel_state as ps

        box = [value if self.is_last_stage else None]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return box[0]

    # ------------------------------------------------------------------------------ forward only
    def _collect_logprobs(self, mb: Mapping[str, Any], output: torch.Tensor):
        with torch.no_grad():
            logp, _ = self._token_logprobs(output, mb)
        self._collected.append((mb["sample_index"], logp.detach().cpu(), mb))
        return torch.zeros((), device=logp.device), torch.tensor(1, dtype=torch.int), {}

    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[TrainSample], record_routing: bool = False,
                         chunks: Optional[list[torch.nn.Module]] = None) -> list[torch.Tensor]:
        """Per-response-token log-probs of every sample under the current weights (forward only).

        Returns one ``[R]`` CPU tensor per sample, in input order, on every rank: each DP rank's
        last stage computes its share, the shares are gathered over DP, then sent down the pipeline.
        Used to recompute π_old and for evaluation. With r3 the engine's experts are replayed;
        ``record_routing`` (r2's π_old pass) keeps every router's choice for the update of the same
        ``samples``. ``chunks``: run these model chunks instead of the policy's, packed and scheduled
        the same way (the frozen reference model of ``loss.kl``: same layout, it routes itself).
        """
        if chunks is not None and record_routing:
            raise ValueError("compute_logprobs: record_routing records the policy's routing, not another model's")
        micro_batches = self._plan(samples)
        for chunk in chunks or self.trainable.model:
            chunk.eval()
        self._collected = []
        if record_routing:
            if self.routing_replay != "r2":
                raise ValueError("compute_logprobs(record_routing=True) is r2's π_old pass; "
                                 f"train.routing_replay is {self.routing_replay!r}")
            self._recording = [{} for _ in micro_batches]
        try:
            self._run_schedule(micro_batches, None, forward_only=True, chunks=chunks)
            if record_routing:
                self._r2_records[_samples_key(samples)] = self._recording
                # The loops train what they recorded before the next batch; never hold more than a batch.
                while len(self._r2_records) > self.cfg.train.staleness + 1:
                    self._r2_records.pop(next(iter(self._r2_records)))
        finally:
            self._recording = None
        results: list[Optional[torch.Tensor]] = [None] * len(samples)
        for sample_index, logp, mb in self._collected:
            for s, idx in enumerate(sample_index.tolist()):
                take = (mb["seq_index"] == s) & (mb["loss_mask"] > 0)
                results[idx] = logp[take]
        self._collected = []
        if self.is_last_stage and dist.is_initialized() and self.dp_size > 1:
            parts: list = [None] * self.dp_size
            dist.all_gather_object(parts, results, group=self.dp_group)
            results = [next((p[i] for p in parts if p[i] is not None), None) for i in range(len(samples))]
        return self._from_last_stage(results)


def _samples_key(samples: Sequence[TrainSample]) -> tuple[int, ...]:
    """A mini-batch's identity on this rank: its sample objects, in order (r2 pairs passes by it)."""
    return tuple(id(s) for s in samples)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
