"""The synchronous RL loop (staleness N): rollout -> score -> GRPO -> N optimizer steps -> weight push.

Every rollout step:

1. rank 0 takes ``train.mini_batch_prompts * N`` prompts, generates ``rollout.n_samples`` responses
   each through the fleet's router; the returned token log-probs are μ (no recompute by default);
2. rank 0 scores them with the verifier and computes GRPO advantages per prompt group; with
   ``rollout.dynamic_sampling`` groups without reward variance are dropped and more prompts generated,
   on the same weights, until the batch is full (``dynamic_sampling.py``);
3. the batch is broadcast to every rank and split IN ORDER into N mini-batches of whole prompt groups;
   with ``loss.kl`` the frozen reference model's log-probs are computed (and in its reward mode the
   advantages recomputed from the KL-penalised rewards); with ``train.recompute_old_logprobs`` π_old
   is computed for the whole batch first, under the weights that generated it (per mini-batch with
   ``train.routing_replay: r2``, which records each mini-batch's routing in that pass and replays it
   in its update);
4. every rank runs N optimizer steps: mini-batch j trains at policy lag j;
5. the weights are published (collective: each pipeline stage's source rank streams its own HF-named
   buckets to the servers, see ``publisher.py``) with version = number of optimizer steps so far, then
   rank 0 checks that every server reports that version.

With colocated placement (``rollout.fleet.placement.colocate``) steps 4 and 5 run inside the GPUs'
time-sharing cycle (``colocation.py``): the engines release their memory, the trainer reloads its state,
trains, hands it back to host memory around the publication, and the engines take their memory back.

Before each rollout, servers the fleet restarted since the last push (they wait outside the router, no
copy of the weights being kept) get the current version from the live model, which still is it there.

Rank 0 also writes ``metrics.jsonl`` (one line per optimizer step), a progress line per rollout
step and, at the end, ``metrics.png``.

Checkpoints (``checkpoint.*``): the run resumes from the latest training checkpoint before the
fleet boots (the servers start from the resumed weights at the resumed version), saves one every
``checkpoint.save_every_steps`` rollout steps and at the end; ``metrics.jsonl`` keeps the lines of
the steps before the resumed one and continues after them.
"""
from __future__ import annotations

import time
from typing import Any

from megatron_vespo.driver.base import RLDriver
from megatron_vespo.driver.dynamic_sampling import collect_groups, merge_reward_stats
from megatron_vespo.driver.rollout import (
    RolloutBatch, RolloutGroup, build_rollout_batch, generate_groups, score_groups,
)
from megatron_vespo.train.routing import unreported_experts_shape
from megatron_vespo.train.sample import TrainSample


class SyncRLDriver(RLDriver):
    """Generate a batch, train N mini-batches on it, push, repeat."""

    def total_steps(self) -> int:
        return self.cfg.run.rollout_steps

    def run_step(self, step: int) -> bool:
        # A server restarted since the last push waits for weights: the live model still is that version here.
        self.restore_restarted_servers()
        mini_batches, metrics = self._training_batch(step)
        steps_before = self.state.optimizer_steps
        if self.colocation is None:
            records = self._train(mini_batches, metrics)
            sync_s = self.publish_weights()
        else:  # the engines leave the GPUs to the trainer for the steps, and take them back for the push
            records, sync_s = self.colocation.cycle(lambda: self._train(mini_batches, metrics), self.publish_weights)
        last = step == self.total_steps() - 1
        records[-1].update(self.maybe_evaluate(steps_before, final=last))

        def log_and_decide() -> bool:
            for record in records:
                record["time/weight_sync_s"] = sync_s
                record["time/elapsed_s"] = self.state.elapsed_s()
                self.metrics_writer.write(step, record)
            self.progress.report(step, records[-1])
            return self.state.reached_target(metrics["rollout/reward_mean"], window=1,
                                             target=self.cfg.run.stop_at_reward)

        stop = self.from_driver(log_and_decide)
        if stop and not last:  # stopped early: the final evaluation still happens
            final_eval = self.maybe_evaluate(self.state.optimizer_steps, final=True)
            if final_eval and self.is_driver:
                self.metrics_writer.write(step, {**final_eval, "train_step": self.state.optimizer_steps})
        self.maybe_save(step, final=stop or last)
        return stop

    def _training_batch(self, step: int) -> tuple[list[list[TrainSample]], dict[str, Any]]:
        """Every rank: this step's N mini-batches (reference log-probs and KL penalty included, see
        :meth:`RLDriver.prepare_mini_batches`) and the rollout metrics."""
        batch = self.from_driver(lambda: self._rollout(step))
        metrics = batch["metrics"]
        return self.prepare_mini_batches(step, batch["groups"], metrics, self.cfg.train.staleness), metrics

    def _rollout(self, step: int) -> dict[str, Any]:
        """Rank 0: one rollout batch, scored, as the prompt groups to train (training samples), and its metrics."""
        cfg, side = self.cfg, self.rollout
        need = cfg.train.mini_batch_prompts * cfg.train.staleness
        seconds = {"generate": 0.0, "score": 0.0}  # summed over the generation rounds

        def generate_and_score(prompts: int, extra_round: int) -> tuple[list[RolloutGroup], list[float], dict]:
            rows = side.sampler.next_batch(prompts)
            t0 = time.monotonic()
            # Extra rounds get request ids of their own (sampling seeds derive from them).
            prefix = f"s{cfg.train.seed}-step{step}" + (f"-r{extra_round}" if extra_round else "")
            groups = generate_groups(side.fleet.router_url, rows, cfg.rollout, rid_prefix=prefix,
                                     routed_experts_shape=unreported_experts_shape(cfg.model),
                                     one_request_per_sample=side.fleet.one_request_per_sample,
                                     tokenizer=side.tokenizer)
            t1 = time.monotonic()
            rewards, reward_stats = score_groups(groups, side.verifier, cfg.reward, side.tokenizer)
            seconds["generate"] += t1 - t0
            seconds["score"] += time.monotonic() - t1
            return groups, rewards, reward_stats

        def build(groups: list[RolloutGroup], rewards: list[float]) -> RolloutBatch:
            return build_rollout_batch(groups, rewards, cfg.advantage, cfg.rollout.overlong,
                                       cfg.rollout.max_response_len,
                                       keep_prompt_routed=cfg.train.routing_replay == "r3")

        if cfg.rollout.dynamic_sampling.enabled:
            collected = collect_groups(need, generate_and_score, lambda g, r: build(g, r).flat,
                                       cfg.rollout.dynamic_sampling)
            groups, reward_stats = collected.groups, merge_reward_stats(collected.reward_stats)
            batch = build(groups, collected.rewards)  # rollout/* describe every generated response
            trained_groups = [batch.groups[i] for i in collected.chosen]
            chosen_rewards = [r for i in collected.chosen for r in collected.rewards[
                i * cfg.rollout.n_samples:(i + 1) * cfg.rollout.n_samples]]
            extra = {**collected.metrics, "dynsamp/trained_reward_mean": sum(chosen_rewards) / len(chosen_rewards)}
        else:
            groups, rewards, reward_stats = generate_and_score(need, 0)
            batch = build(groups, rewards)
            trained_groups, extra = batch.groups, {}
        metrics = {**batch.metrics, **reward_stats, **side.dataset_stats, **extra,
                   "rollout/epoch": float(side.sampler.epoch),
                   "rollout/stale_version_responses": float(sum(
                       1 for g in groups for r in g.responses if r.weight_version != self.publisher.version)),
                   "time/generate_s": seconds["generate"], "time/score_s": seconds["score"]}
        self.guard.observe(metrics)
        return {"groups": trained_groups, "metrics": metrics}

    def _train(self, mini_batches: list[list[TrainSample]], rollout_metrics: dict[str, float]) -> list[dict]:
        """N optimizer steps, mini-batch j at policy lag j; one metrics record per step."""
        version_used = self.publisher.version
        recompute_s = 0.0
        if self.cfg.train.recompute_old_logprobs and self.cfg.train.routing_replay == "r2":
            # r2 replays, in each update, the routing its π_old pass recorded on this rank: the pass
            # must pack exactly the update's mini-batch, so it runs per mini-batch.
            recompute_s = sum(self.recompute_old_logprobs(mb) for mb in mini_batches)
        elif self.cfg.train.recompute_old_logprobs:
            recompute_s = self.recompute_old_logprobs([s for mb in mini_batches for s in mb])
        records = []
        for lag, samples in enumerate(mini_batches):
            records.append(self.train_step(samples, {**rollout_metrics, "lag": lag,
                                                     "rollout_weight_version": version_used,
                                                     "time/recompute_s": recompute_s}))
            self.check_train_inference_gate(records[-1])  # lag 0: trainer and engine held the same weights
        return records
