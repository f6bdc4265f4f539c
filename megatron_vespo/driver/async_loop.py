"""The fully asynchronous RL loop (``train.mode: async``): the fleet generates while the trainer trains.

- Rank 0 runs a :class:`BackgroundGenerator` thread that keeps the fleet busy and puts scored prompt
  groups into a :class:`RolloutBuffer`, each tagged with the policy versions behind its tokens.
- Every rank runs the trainer. Per optimizer step rank 0 takes one mini-batch
  (``train.mini_batch_prompts`` groups; waiting is trainer idle time), computes GRPO advantages per
  group and broadcasts the samples; every rank trains on them.
- Every ``asynchronous.push_every_steps`` steps the weights are exported and pushed (version =
  optimizer steps). With partial rollouts the generator aborts what is in flight around the push and
  continues each aborted response from its prefix under the new weights.
- With ``rollout.dynamic_sampling`` the generator marks groups whose rewards have zero variance and the
  buffer filters them (see rollout_buffer); ``dynsamp/*`` metrics per mini-batch.
- Lag of a sample = optimizer steps done when it is trained - the oldest version behind any of its
  tokens; it never exceeds ``asynchronous.max_staleness`` (groups past it are dropped and counted,
  or generation is throttled so that none gets there; see rollout_buffer).

The run trains ``run.rollout_steps * train.staleness`` mini-batches: the same number of samples as
the synchronous run of the same config. Per step ``metrics.jsonl`` gets the trainer's metrics, the
mini-batch's rollout metrics, and ``async/*`` (lag mean/max and every sample's lag, buffer size,
drops, resumed partial responses) and ``time/trainer_idle_s`` / ``time/fleet_idle_s``.

Checkpoints (``checkpoint.save_every_steps`` counts mini-batches in this mode) carry the buffer's
finished groups and the prompts still being generated; a resumed run puts the groups back and
regenerates those prompts first (their partial outputs are not kept).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator, Optional

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.distributed import DistributedContext
from megatron_vespo.driver.base import PROGRESS_KEYS, RLDriver
from megatron_vespo.driver.generator import BackgroundGenerator, GroupPayload
from megatron_vespo.driver.rollout import (
    RolloutGroup, build_rollout_batch, score_groups, verifier_metrics,
)
from megatron_vespo.driver.rollout_buffer import RolloutBuffer, TakeResult
from megatron_vespo.train.routing import unreported_experts_shape

ASYNC_PROGRESS_KEYS = {**PROGRESS_KEYS, "async/lag_mean": "lag", "async/buffer_groups": "buf",
                       "time/trainer_idle_s": "t_idle", "time/fleet_idle_s": "f_idle"}


def lag_metrics(lags: list[int]) -> dict[str, Any]:
    """Mean, max and the histogram of per-sample lags (``async/lag_count_<k>``), plus the raw list."""
    if not lags:
        return {"async/lag_mean": None, "async/lag_max": None, "async/sample_lags": []}
    out: dict[str, Any] = {"async/lag_mean": sum(lags) / len(lags), "async/lag_max": float(max(lags)),
                           "async/lag_min": float(min(lags)), "async/sample_lags": list(lags)}
    for lag, count in sorted(Counter(lags).items()):
        out[f"async/lag_count_{lag}"] = float(count)
    return out


class AsyncRLDriver(RLDriver):
    """Continuous generation into a version-tagged buffer; one mini-batch per optimizer step."""

    progress_keys = ASYNC_PROGRESS_KEYS

    def __init__(self, cfg: RunConfig, ctx: DistributedContext):
        super().__init__(cfg, ctx)
        self.buffer: Optional[RolloutBuffer] = None
        self.generator: Optional[BackgroundGenerator] = None
        self._push_drain_s = 0.0
        self._fleet_idle_mark = 0.0
        self._resumed_async_state: Optional[dict[str, Any]] = None
        self._steps_at_last_eval_check = 0  # optimizer steps at the previous push (the eval window's start)

    def total_steps(self) -> int:
        return self.cfg.run.rollout_steps * self.cfg.train.staleness  # in this mode a step is one mini-batch

    def run_step(self, step: int) -> bool:
        cfg = self.cfg
        batch = self.from_driver(lambda: self._mini_batch(step))
        metrics = batch["metrics"]
        [samples] = self.prepare_mini_batches(step, batch["groups"], metrics, 1)
        recompute_s = 0.0
        if cfg.train.recompute_old_logprobs:
            recompute_s = self.recompute_old_logprobs(samples)
        record = self.train_step(samples, {**metrics, "time/recompute_s": recompute_s})
        self.check_train_inference_gate(record)  # only mini-batches whose every sample has lag 0
        sync_s = 0.0
        last = step == self.total_steps() - 1
        if (step + 1) % cfg.asynchronous.push_every_steps == 0 or last:
            steps_before_push = self._steps_at_last_eval_check
            sync_s = self.publish_weights()  # generation is held around it (_generation_held)
            # Evaluated right after a push, so the fleet serves exactly the trained weights.
            record.update(self.maybe_evaluate(steps_before_push, final=last))
            self._steps_at_last_eval_check = self.state.optimizer_steps

        def log_and_decide() -> bool:
            record["time/weight_sync_s"] = sync_s
            record["time/elapsed_s"] = self.state.elapsed_s()
            record["weight_version_after"] = self.publisher.version
            self.metrics_writer.write(step, record)
            self.progress.report(step, record)
            # The stop rule averages as many mini-batches as a sync rollout batch has.
            return self.state.reached_target(metrics["rollout/reward_mean"], window=cfg.train.staleness,
                                             target=cfg.run.stop_at_reward)

        stop = self.from_driver(log_and_decide)
        self.maybe_save(step, final=stop or last)
        return stop

    # ------------------------------------------------------------------------------ rank 0
    def start_generation(self) -> None:
        cfg = self.cfg
        dynamic = cfg.rollout.dynamic_sampling
        self.buffer = RolloutBuffer(cfg.train.mini_batch_prompts, cfg.asynchronous.max_staleness,
                                    cfg.asynchronous.over_staleness, cfg.asynchronous.capacity(cfg.train.mini_batch_prompts),
                                    filter_flat=dynamic.enabled,
                                    max_filtered=dynamic.max_extra_rounds * cfg.train.mini_batch_prompts,
                                    on_exhausted=dynamic.on_exhausted)
        self.generator = BackgroundGenerator(
            self.rollout.fleet.router_url, self.rollout.sampler, cfg.rollout, self.buffer, self._score,
            partial_rollouts=cfg.asynchronous.partial_rollouts, abort_all=self.rollout.fleet.abort_all,
            version=int(self.publisher.version), rid_prefix=f"s{cfg.train.seed}-async-{self.state.optimizer_steps}",
            routed_experts_shape=unreported_experts_shape(cfg.model),
            one_request_per_sample=self.rollout.fleet.one_request_per_sample,
            is_flat=self._is_flat if dynamic.enabled else None, tokenizer=self.rollout.tokenizer)
        if self._resumed_async_state is not None:
            resumed = self._resumed_async_state
            self.buffer.restore(resumed["finished_groups"])
            self.buffer.dropped_total = int(resumed["dropped_total"])
            self.generator.replay(resumed["in_flight_rows"])
            print(f"[async] resumed {len(resumed['finished_groups'])} finished group(s); regenerating "
                  f"{len(resumed['in_flight_rows'])} prompt(s) that were in flight", flush=True)
            self._resumed_async_state = None
        self.publisher.around_push = self._generation_held
        self.generator.start()
        self._fleet_idle_mark = self.generator.fleet_idle_seconds()

    def stop_generation(self) -> None:
        if self.generator is not None:
            self.generator.stop()

    @contextlib.contextmanager
    def _generation_held(self) -> Iterator[None]:
        """Around every push: generation held (and, with partial rollouts, in-flight requests aborted);
        afterwards it continues at the version the fleet then holds."""
        self._push_drain_s += self.generator.hold_for_push(timeout_s=self.cfg.rollout.request_timeout_s)
        try:
            yield
        finally:
            self.generator.release_after_push(int(self.publisher.version))

    def _score(self, group: RolloutGroup) -> tuple[list[float], dict[str, float]]:
        return score_groups([group], self.rollout.verifier, self.cfg.reward, self.rollout.tokenizer)

    def _is_flat(self, group: RolloutGroup, rewards: list[float]) -> bool:
        """Zero reward variance as the advantage sees it (overlong penalty included): no learning signal."""
        cfg = self.cfg
        return build_rollout_batch([group], rewards, cfg.advantage, cfg.rollout.overlong,
                                   cfg.rollout.max_response_len).flat[0]

    def _dynamic_sampling_metrics(self, taken: TakeResult, payloads: list[GroupPayload],
                                  metrics: dict[str, Any]) -> dict[str, float]:
        """``dynsamp/*`` of one mini-batch; ``rollout/reward_mean`` becomes the mean over the groups trained and
        the flat ones filtered since the previous mini-batch (what the policy scores, not only what is kept)."""
        completed = taken.flat_completed + taken.varied_completed
        generated = [r for p in payloads if not p.flat for r in p.rewards] + taken.flat_rewards
        out = {"dynsamp/flat_groups": float(taken.flat_completed),
               "dynsamp/filtered_fraction": taken.flat_completed / completed if completed else 0.0,
               "dynsamp/filled_groups": float(taken.filled),
               "dynsamp/extra_groups": float(taken.flat_completed - taken.filled),
               "dynsamp/generation_cost": completed / self.cfg.train.mini_batch_prompts,
               "dynsamp/trained_reward_mean": metrics["rollout/reward_mean"]}
        if generated:
            out["rollout/reward_mean"] = sum(generated) / len(generated)
        return out

    def _mini_batch(self, step: int) -> dict[str, Any]:
        """Rank 0: the next mini-batch from the buffer as prompt groups of training samples, and its metrics."""
        cfg = self.cfg
        taken: TakeResult = self.buffer.take(self.state.optimizer_steps, should_stop=lambda: self.generator.error)
        payloads: list[GroupPayload] = [g.payload for g in taken.groups]
        batch = build_rollout_batch([p.group for p in payloads], [r for p in payloads for r in p.rewards],
                                    cfg.advantage, cfg.rollout.overlong, cfg.rollout.max_response_len,
                                    keep_prompt_routed=cfg.train.routing_replay == "r3")
        fleet_idle = self.generator.fleet_idle_seconds()
        metrics: dict[str, Any] = {
            **batch.metrics, **self.rollout.dataset_stats, **self.buffer.snapshot(), **self.generator.counters(),
            **lag_metrics(taken.sample_lags()),
            "reward/verifier_errors": sum(p.reward_stats.get("reward/verifier_errors", 0.0) for p in payloads),
            "reward/verifier_timeouts": sum(p.reward_stats.get("reward/verifier_timeouts", 0.0) for p in payloads),
            **verifier_metrics(self.rollout.verifier),
            "rollout/epoch": float(self.rollout.sampler.epoch),
            "rollout_weight_version": self.publisher.version,
            "async/max_staleness": float(cfg.asynchronous.max_staleness),
            "async/oldest_version": float(min(g.oldest_version for g in taken.groups)),
            "async/newest_version": float(max(g.newest_version for g in taken.groups)),
            "async/dropped_stale_groups": float(len(taken.dropped)),
            "async/partial_resumed_responses": float(sum(p.resumed_responses for p in payloads)),
            "time/trainer_idle_s": taken.waited_s,
            "time/fleet_idle_s": fleet_idle - self._fleet_idle_mark,
            "time/push_drain_s": self._push_drain_s,
        }
        metrics["lag"] = metrics["async/lag_max"]
        if cfg.rollout.dynamic_sampling.enabled:
            metrics.update(self._dynamic_sampling_metrics(taken, payloads, metrics))
        errors = [p.reward_stats["reward/first_error"] for p in payloads if "reward/first_error" in p.reward_stats]
        if errors:
            metrics["reward/first_error"] = errors[0]
        self.guard.observe(metrics)
        self._fleet_idle_mark = fleet_idle
        self._push_drain_s = 0.0
        return {"groups": batch.groups, "metrics": metrics}

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """The base state plus, on rank 0, the buffer's finished groups and the prompts still generating
        (replayed first on resume; their partial outputs are not kept)."""
        if self.generator is None:
            return super().checkpoint_state()
        with self.generator.lock:  # the sampler position and the drawn-but-unfinished prompts agree
            state = super().checkpoint_state()
            rows = self.generator.in_flight_rows()
        # Read after the rows: a group finishing in between is in both lists (one prompt twice), never in neither.
        state["async"] = {"finished_groups": self.buffer.finished_groups(), "in_flight_rows": rows,
                          "dropped_total": self.buffer.dropped_total}
        return state

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().restore_checkpoint_state(state)
        self._resumed_async_state = state.get("async")
        self._steps_at_last_eval_check = self.state.optimizer_steps
