"""The RL driver's scaffold: the trainer on every rank, rank 0 drives, a loop on top.

An :class:`RLDriver` is composed of small parts, each its own module:

- the trainer on every rank: :class:`~megatron_vespo.train.step.PolicyTrainer` over the Megatron
  model, optimizer and LR schedule;
- :class:`~.publisher.WeightPublisher`: the trainer's weights to the fleet, version checked;
- :class:`~.run_state.RunState` and :class:`~.run_state.RunCheckpoints`: progress, checkpoints, summary;
- :class:`~.rollout_side.RolloutSide` (rank 0): data, verifier, evaluator, the fleet and its weight sync;
- with ``loss.kl`` on, the frozen reference model on every rank
  (:class:`~megatron_vespo.train.reference.ReferencePolicy`).

The loops (``sync_loop.SyncRLDriver``, ``async_loop.AsyncRLDriver``) decide *when* to generate, train
and push: :meth:`RLDriver.total_steps`, :meth:`RLDriver.run_step` and, for background generation,
:meth:`RLDriver.start_generation` / :meth:`RLDriver.stop_generation`. Rank 0 drives; the other ranks
follow the payloads it broadcasts, so a failure on rank 0 is broadcast as ``{"error": ...}`` and
raised everywhere instead of leaving ranks hanging in a collective.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.init_weights import run_init_checkpoint
from megatron_vespo.checkpoint.training import TrainingCheckpointer
from megatron_vespo.config.schema import RunConfig
from megatron_vespo.distributed import DistributedContext, destroy_distributed, init_distributed
from megatron_vespo.driver.publisher import WeightPublisher
from megatron_vespo.driver.rollout import split_mini_batches
from megatron_vespo.driver.rollout_side import RolloutSide
from megatron_vespo.driver.run_health import LearningGuard, TrainInferenceGate
from megatron_vespo.driver.run_state import RunCheckpoints, RunState, RunSummary
from megatron_vespo.driver.signals import sigterm_raises
from megatron_vespo.models.trainable import build_model_and_optimizer
from megatron_vespo.rewards.kl_penalty import apply_kl_penalty
from megatron_vespo.train.lr_schedule import build_lr_scheduler
from megatron_vespo.train.reference import ReferencePolicy
from megatron_vespo.train.sample import TrainSample
from megatron_vespo.train.step import PolicyTrainer

PROGRESS_KEYS = {"rollout/reward_mean": "reward", "rollout/response_len_mean": "len",
                 "rollout/zero_std_fraction": "flat", "vespo/W_mean": "W", "vespo/phi_mean": "phi",
                 "mismatch/logp_gap_mean": "gap", "mismatch/routing_flip_rate": "flip", "train/grad_norm": "gnorm",
                 "dynsamp/generation_cost": "gen_x", "loss/kl": "kl"}  # absent keys (e.g. features off) are not shown


class RankZeroError(RuntimeError):
    """Raised on ranks > 0 when rank 0 failed (its error message is included)."""


class RLDriver:
    """The trainer on every rank; on rank 0 the rollout side; the loop scaffold (see the module docstring)."""

    progress_keys: dict[str, str] = PROGRESS_KEYS  # metrics shown on the progress line

    def __init__(self, cfg: RunConfig, ctx: DistributedContext):
        self.cfg = cfg
        self.ctx = ctx
        self.is_driver = ctx.rank == 0
        self.output_dir = Path(cfg.run.output_dir)
        trainable = build_model_and_optimizer(cfg, init_checkpoint=run_init_checkpoint(cfg))
        scheduler = build_lr_scheduler(trainable.optimizer, cfg.optimizer)
        self.trainer = PolicyTrainer(cfg, trainable, scheduler, temperature=cfg.rollout.temperature)
        self.reference = ReferencePolicy.from_config(cfg)  # loss.kl's π_ref; None while its coef is 0
        bucket_bytes = cfg.rollout.weight_sync.bucket_bytes
        self.publisher = WeightPublisher(HFWeightExporter(trainable.model, cfg.model, bucket_bytes=bucket_bytes),
                                         cfg.rollout.weight_sync)
        self.state = RunState()
        self.guard = LearningGuard(cfg.run.max_failed_steps)  # rank 0: stops a run that cannot learn
        self.gate = TrainInferenceGate(cfg.run.train_inference_gate)  # rank 0: trainer vs engine log-probs
        self.checkpoints = RunCheckpoints(TrainingCheckpointer(cfg, trainable.model, trainable.optimizer, scheduler),
                                          cfg.checkpoint.save_every_steps, self.is_driver)
        self.rollout: Optional[RolloutSide] = None  # rank 0, once the fleet runs
        from megatron_vespo.driver.colocation import colocation_of  # (it refers back to this class)

        self.colocation = colocation_of(self)  # rollout.fleet.placement.colocate: the GPUs' time-sharing cycle
        self.metrics_writer = None  # rank 0: JSONL + configured sinks
        self.progress = None  # rank 0: the progress line printer
        self._resumed_sampler: Optional[dict] = None  # a checkpoint's data position, applied when the sampler exists

    # ------------------------------------------------------------------------- rank 0 -> all
    def broadcast(self, payload: Any) -> Any:
        """Rank 0's ``payload`` on every rank (pickled; small control messages and token lists)."""
        if self.ctx.world_size == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_driver(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and return its result on every rank. Collective.

        If ``fn`` raises, rank 0 broadcasts the error before re-raising, and every other rank raises
        :class:`RankZeroError`, so no rank waits forever in the next collective.
        """
        result = None
        if self.is_driver:
            try:
                result = {"ok": fn()}
            except BaseException as exc:
                self.broadcast({"error": f"{type(exc).__name__}: {exc}"})
                raise
        box = self.broadcast(result)
        if "error" in box:
            raise RankZeroError(f"rank 0 failed: {box['error']}")
        return box["ok"]

    # ------------------------------------------------------------------ what the loops call
    def recompute_old_logprobs(self, samples: list[TrainSample]) -> float:
        """π_old under the current weights (before any step on these samples). Seconds taken. With
        ``train.routing_replay: r2`` the pass also records the routing the update of ``samples`` replays."""
        t0 = time.monotonic()
        if not samples:
            return 0.0
        record = self.cfg.train.routing_replay == "r2"
        for sample, lp in zip(samples, self.trainer.compute_logprobs(samples, record_routing=record)):
            sample.old_logp = lp.tolist()
        return time.monotonic() - t0

    def prepare_mini_batches(self, step: int, groups: list[list[TrainSample]], metrics: dict[str, Any],
                             num: int) -> list[list[TrainSample]]:
        """Every rank: the trained prompt ``groups`` (identical on every rank) as ``num`` in-order mini-batches
        (:func:`split_mini_batches`). With ``loss.kl`` on, the reference's log-probs of every sample, before any
        update (``time/reference_s``), and in mode reward the advantages recomputed from the KL-penalised
        rewards (``kl/*``); then, with ``rollout.dump_dir``, rank 0 saves the batch as it will be trained.
        Adds to ``metrics``."""
        mini_batches = split_mini_batches(groups, num)
        if self.reference is not None:
            metrics["time/reference_s"] = self.reference.attach_logprobs(self.trainer, mini_batches)
            if self.cfg.loss.kl.mode == "reward":  # every rank: the same samples give the same advantages
                metrics.update(apply_kl_penalty(groups, self.cfg.loss.kl, self.cfg.advantage))
        if self.cfg.rollout.dump_dir:
            metrics.update(self.from_driver(lambda: self.dump_batch(step, mini_batches, metrics)))
        return mini_batches

    def train_step(self, samples: list[TrainSample], extra: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step on ``samples`` (every rank); the metrics record, ``extra`` included."""
        t0 = time.monotonic()
        if samples:
            metrics = dict(self.trainer.train_mini_batch(samples).metrics)
            self.state.optimizer_steps += 1
        else:  # every response of the mini-batch was empty: nothing to learn from
            metrics = {"train/skipped_empty_mini_batch": 1.0}
        return {**extra, **metrics, "train_step": self.state.optimizer_steps, "train/samples": float(len(samples)),
                "time/train_s": time.monotonic() - t0}

    def check_train_inference_gate(self, record: dict[str, Any]) -> None:
        """Collective when the gate is on: rank 0 checks a training record (:class:`TrainInferenceGate`) and a
        failure stops every rank, before the weights of that step reach the fleet; adds ``gate/checked``."""
        if self.cfg.run.train_inference_gate.enabled:  # known on every rank: no broadcast when off
            record.update(self.from_driver(lambda: self.gate.observe(record)))

    def dump_batch(self, step: int, mini_batches: list[list[TrainSample]], metrics: dict[str, Any]) -> dict[str, float]:
        """Rank 0: with ``rollout.dump_dir``, the scored batch as it will be trained (its mini-batches, with the
        rollout ``metrics``) written to ``batch_<step>.safetensors`` (``data/rollout_dump.py``); the dump's
        metrics (``dump/bytes``, ``time/dump_s``), {} without a dump directory."""
        if not self.cfg.rollout.dump_dir:
            return {}
        from megatron_vespo.data.rollout_dump import BatchContext, write_batch

        t0 = time.monotonic()
        path = write_batch(Path(self.cfg.rollout.dump_dir), step, mini_batches, metrics,
                           BatchContext.from_config(self.cfg))
        return {"dump/bytes": float(path.stat().st_size), "time/dump_s": time.monotonic() - t0}

    def publish_weights(self) -> float:
        """Collective: the current weights to the fleet as version = optimizer steps, each pipeline stage
        streaming its own buckets (see ``publisher.py``). Seconds taken."""
        return self.publisher.publish(str(self.state.optimizer_steps)).seconds

    def restore_restarted_servers(self) -> None:
        """Collective: servers restarted since the last push get the fleet's version from the live model (call
        it only where the model still is that version: before the next optimizer step). Colocated runs skip it:
        the parameters are in host memory then, and every step's push includes the waiting servers."""
        if self.colocation is None:
            self.publisher.catch_up()

    def maybe_evaluate(self, steps_before: int, final: bool = False) -> dict[str, float]:
        """Collective: the ``eval/*`` metrics when an evaluation is due (:meth:`Evaluator.maybe_run`), else {}."""
        if not (self.cfg.eval.sets and self.cfg.eval.every_steps):
            return {}  # known on every rank: no broadcast per step when evaluation is off
        fleet = self.rollout.fleet if self.rollout is not None else None
        return self.from_driver(lambda: self.rollout.evaluator.maybe_run(
            fleet.router_url, self.state.optimizer_steps, previous=steps_before, final=final,
            one_request_per_sample=fleet.one_request_per_sample))

    def maybe_save(self, step: int, final: bool = False) -> None:
        """Collective: a training checkpoint after loop step ``step`` when one is due (see RunCheckpoints)."""
        def state_at(next_step: int) -> dict[str, Any]:
            self.state.next_rollout_step = next_step
            return self.checkpoint_state()

        if self.colocation is not None and self.checkpoints.due(step, final):
            with self.colocation.trainer_resident():  # the trainer's state is in host memory between cycles
                self.checkpoints.maybe_save(step, final, state_at)
        else:
            self.checkpoints.maybe_save(step, final, state_at)

    # ------------------------------------------------------------------------- checkpoint state
    def checkpoint_state(self) -> dict[str, Any]:
        """The driver's part of a training checkpoint (rank 0's is saved)."""
        sampler = self.rollout.sampler if self.rollout is not None else None
        return {**self.state.to_checkpoint(), "weight_version": self.publisher.version,
                "sampler": sampler.state_dict() if sampler is not None else None}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` (every rank; the data position applies on rank 0)."""
        self.state.restore(state)
        self.publisher.version = str(state["weight_version"])
        self._resumed_sampler = state.get("sampler")

    # ------------------------------------------------------------------------------ the loop
    def total_steps(self) -> int:
        """Loop steps of the whole run (a loop's unit: rollout steps or mini-batches)."""
        raise NotImplementedError

    def run_step(self, step: int) -> bool:
        """One loop step on every rank (checkpoint included); true when the run should stop."""
        raise NotImplementedError

    def start_generation(self) -> None:
        """Rank 0, once the fleet has the initial weights and the metrics are open (async: the generator)."""

    def stop_generation(self) -> None:
        """Rank 0, before the metrics sinks close and the fleet goes away."""

    def open_rollout(self, initial_dir: Optional[Path]) -> None:
        """Rank 0: data, verifier, evaluator, the fleet (CPU servers boot from ``initial_dir``, the trainer's
        weights) and its weight sync."""
        self.rollout = RolloutSide.open(self.cfg, initial_dir, self.publisher.version,
                                        sampler_state=self._resumed_sampler)
        self.publisher.connect(self.rollout.fleet, self.rollout.weight_sync)

    def boot_fleet(self) -> None:
        """Collective: start the fleet with the trainer's current weights. CPU servers boot from an HF
        directory every pipeline stage writes its own shards of; a configured fleet boots from its own
        checkpoint and is then given the trainer's weights by a push."""
        initial_dir = None
        if self.colocation is not None:  # the engines are about to take the GPUs
            self.colocation.before_boot()
        # Non-finite weights are refused as they stream out: each stage checks the HF tensors it sends.
        source = (f"the {'resumed' if self.state.next_rollout_step else 'initial'} weights"
                  f" ({self.cfg.checkpoint.init_from or 'random init'})")
        if self.cfg.rollout.fleet is None:
            from megatron_vespo.checkpoint.hf_io import CONFIG_FILE, hf_config_from_model

            def write_config(directory: Path) -> None:
                hf = hf_config_from_model(self.cfg.model, self.publisher.exporter.hf_dtype,
                                          extra={"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
                (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")

            initial_dir = self.publisher.export_hf_dir(self.output_dir / "initial_hf", write_config,
                                                       check_finite=source)
        self.from_driver(lambda: self.open_rollout(initial_dir))
        if self.cfg.rollout.fleet is not None:
            # The given servers' checkpoint need not be the trainer's weights (initial or resumed).
            self.publisher.publish(self.publisher.version, check_finite=source)
        if self.colocation is not None:
            self.colocation.booted()

    def open_metrics(self, first_step: int) -> None:
        """Rank 0: the metrics logger (JSONL + configured sinks; continues the file after a resume) and
        the progress line printer."""
        from megatron_vespo.logging_utils import MetricsLogger, ProgressReporter

        self.metrics_writer = MetricsLogger.from_config(self.cfg, resume_step=first_step or None)
        self.progress = ProgressReporter(self.total_steps(), self.progress_keys, first_step=first_step)

    def run(self) -> Optional[RunSummary]:
        """Resume, boot the fleet with the trained weights, loop, shut down; the summary on rank 0."""
        resumed = self.checkpoints.resume()
        if resumed is not None:
            self.restore_checkpoint_state(resumed)
        first_step = self.state.next_rollout_step
        error: Optional[BaseException] = None
        step = first_step - 1
        try:
            self.boot_fleet()
            if self.is_driver:
                self.open_metrics(first_step)
                self.start_generation()
            for step in range(first_step, self.total_steps()):
                if self.run_step(step):
                    break
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.shutdown(quiet=error is not None)
        if not self.is_driver:
            return None
        return self.state.summary(step + 1, first_step, self.publisher.version, self.output_dir, self.cfg.run.plot)

    def shutdown(self, quiet: bool) -> None:
        """Rank 0: stop generating, close the metrics sinks, the weight sync and the fleet (errors only
        printed when ``quiet``, i.e. when the run is already failing)."""
        self.publisher.close()
        if not self.is_driver:
            return
        self.stop_generation()
        if self.metrics_writer is not None:
            self.metrics_writer.close()
        if self.rollout is not None:
            self.rollout.close(quiet)

    @classmethod
    def launch(cls, cfg: RunConfig) -> Optional[RunSummary]:
        """Check, initialise (torchrun or single process), run the loop (:meth:`run`), tear down
        (on SIGTERM too). The summary on rank 0."""
        cfg.check_trainable()
        with sigterm_raises():
            ctx = init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
            try:
                return cls(cfg, ctx).run()
            finally:
                destroy_distributed()
