"""The synchronous RL loop (staleness N): rollout -> score -> GRPO -> N optimizer steps -> weight push.

Every rollout step:

1. rank 0 takes ``train.mini_batch_prompts * N`` prompts, generates ``rollout.n_samples`` responses
   each through the fleet's router; the returned token log-probs are μ (no recompute by default);
2. rank 0 scores them with the verifier and computes GRPO advantages per prompt group;
3. the batch is split IN ORDER into N mini-batches of whole prompt groups and broadcast to every
   rank (``broadcast_object_list``); with ``train.recompute_old_logprobs`` π_old is computed for the
   whole batch first, under the weights that generated it;
4. every rank runs N :meth:`PolicyTrainer.train_mini_batch` calls: mini-batch j trains at policy lag j;
5. the weights are exported (collective; HF names) and rank 0 pushes them to the fleet with version
   = number of optimizer steps so far, then checks that every server reports that version.

Rank 0 also writes ``metrics.jsonl`` (one line per optimizer step), a progress line per rollout
step and, at the end, ``metrics.png``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.hf_io import SafetensorsWriter, hf_config_from_model
from megatron_vespo.config.schema import RunConfig
from megatron_vespo.config.typed import ConfigError
from megatron_vespo.distributed import DistributedContext, destroy_distributed, init_distributed
from megatron_vespo.driver.rollout import (
    build_rollout_batch, generate_groups, score_groups, split_mini_batches,
)
from megatron_vespo.logging_utils import MetricsWriter, ProgressReporter, format_duration
from megatron_vespo.models.trainable import build_model_and_optimizer
from megatron_vespo.train.lr_schedule import build_lr_scheduler
from megatron_vespo.train.step import PolicyTrainer

NamedTensors = list[tuple[str, torch.Tensor]]

PROGRESS_KEYS = {"rollout/reward_mean": "reward", "rollout/response_len_mean": "len",
                 "rollout/zero_std_fraction": "flat", "vespo/W_mean": "W", "vespo/phi_mean": "phi",
                 "mismatch/logp_gap_mean": "gap", "train/grad_norm": "gnorm"}


@dataclass
class RunSummary:
    """What a finished run reports (rank 0)."""

    rollout_steps: int
    optimizer_steps: int
    weight_version: str
    initial_reward: float
    final_reward: float  # mean of the last (up to) three rollout steps
    best_reward: float
    seconds: float
    seconds_to_target: Optional[float]  # first time a batch reached run.stop_at_reward
    metrics_path: Path
    plot_path: Optional[Path]

    def text(self, target: Optional[float]) -> str:
        lines = [
            f"rollout steps        {self.rollout_steps} ({self.optimizer_steps} optimizer steps, "
            f"fleet at weight version {self.weight_version})",
            f"mean reward          {self.initial_reward:.3f} (first batch) -> {self.final_reward:.3f} "
            f"(last 3 batches), best {self.best_reward:.3f}",
            f"wall time            {format_duration(self.seconds)}",
        ]
        if target is not None:
            reached = (f"reached after {format_duration(self.seconds_to_target)}"
                       if self.seconds_to_target is not None else "not reached")
            lines.append(f"target reward {target:<6} {reached}")
        lines.append(f"metrics              {self.metrics_path}")
        if self.plot_path is not None:
            lines.append(f"plot                 {self.plot_path}")
        return "\n".join(lines)


def gather_hf_weights(exporter: HFWeightExporter) -> NamedTensors:
    """All HF-named tensors on rank 0 (CPU); an empty list elsewhere. Collective over the world.

    Each stage leader holds its stage's tensors after the export; with PP > 1 they are sent to rank
    0 as pickled CPU tensors (fine for small and medium models; very large models want a streaming
    transport from every stage leader instead).
    """
    mine = [(name, t.detach().cpu()) for bucket in exporter.buckets() for name, t in bucket]
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    parts: Optional[list] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return [item for part in parts for item in part] if parts is not None else []


def write_hf_dir(named: NamedTensors, cfg: RunConfig, directory: Path) -> Path:
    """An HF model directory (config.json + safetensors) holding exactly the trainer's weights."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    dtype = named[0][1].dtype
    hf = hf_config_from_model(cfg.model, dtype, extra={"bos_token_id": None, "eos_token_id": None,
                                                       "pad_token_id": None})
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    writer = SafetensorsWriter(directory, {name: (t.dtype, tuple(t.shape)) for name, t in named})
    for name, t in named:
        writer.write(name, t)
    writer.close()
    return directory


class SyncRLDriver:
    """Owns the trainer on every rank and, on rank 0, the data, verifier, fleet and weight sync."""

    def __init__(self, cfg: RunConfig, ctx: DistributedContext):
        self.cfg = cfg
        self.ctx = ctx
        self.is_driver = ctx.rank == 0
        self.staleness = cfg.train.staleness
        self.trainable = build_model_and_optimizer(cfg)
        self.scheduler = build_lr_scheduler(self.trainable.optimizer, cfg.optimizer)
        self.trainer = PolicyTrainer(cfg, self.trainable, self.scheduler, temperature=cfg.rollout.temperature)
        self.exporter = HFWeightExporter(self.trainable.model, cfg.model,
                                         bucket_bytes=cfg.rollout.weight_sync.bucket_bytes)
        self.output_dir = Path(cfg.run.output_dir)
        self.optimizer_steps = 0
        self.version = "0"
        self.fleet = None
        self.weight_sync = None
        self._latest: NamedTensors = []

    # ------------------------------------------------------------------------------ rank 0 setup
    def _setup_driver(self, initial: NamedTensors) -> None:
        from megatron_vespo.data.dataset import PromptSampler, load_prompt_dataset, load_tokenizer
        from megatron_vespo.rewards.registry import get_verifier
        from rollout_sglang.config import FleetConfig, ServerConfig
        from rollout_sglang.fleet import Fleet

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(cfg.data)
        dataset = load_prompt_dataset(cfg.data, cfg.rollout.max_prompt_len, self.tokenizer)
        self.dataset_stats = {"data/prompts": float(len(dataset.rows)),
                              "data/filtered_too_long": float(dataset.num_filtered_too_long)}
        print(f"[data] {dataset.source}: {len(dataset.rows)} prompts "
              f"({dataset.num_filtered_too_long} longer than {cfg.rollout.max_prompt_len} dropped)", flush=True)
        self.sampler = PromptSampler(dataset, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        try:
            self.verifier = get_verifier(cfg.reward.verifier)
        except KeyError as exc:
            raise ConfigError("reward.verifier", str(exc.args[0]).split(": ", 1)[-1]) from None

        initial_dir: Optional[Path] = None
        if cfg.rollout.fleet is None:
            # Servers boot from a directory holding exactly the trainer's initial weights.
            initial_dir = write_hf_dir(initial, cfg, self.output_dir / "initial_hf")
            server = ServerConfig(kind="cpu", model_path=str(initial_dir), dtype="float32",
                                  extra_args=["--weight-version", self.version])
            fleet_cfg = FleetConfig(servers=[server] * cfg.rollout.cpu_servers,
                                    log_dir=str(self.output_dir / "fleet_logs"))
        else:
            fleet_cfg = cfg.rollout.fleet
        t0 = time.monotonic()
        self.fleet = Fleet(fleet_cfg).start()
        print(f"[fleet] {len(fleet_cfg.servers)} server(s) behind {self.fleet.router_url} "
              f"({time.monotonic() - t0:.1f}s)", flush=True)
        self.weight_sync = self._make_weight_sync(initial_dir or Path(fleet_cfg.servers[0].model_path))
        if cfg.rollout.fleet is not None:
            self._push(initial, "0")  # the given servers' checkpoint need not be the trainer's init

    def _make_weight_sync(self, config_dir: Path):
        from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync

        ws = self.cfg.rollout.weight_sync
        if ws.transport == "disk":
            if not ws.disk_dir:
                ws = dataclasses.replace(ws, disk_dir=str(self.output_dir / "weights"))
            return DiskWeightSync(self.fleet, ws, config_dir=str(config_dir) if config_dir.is_dir() else None)
        return DistributedWeightSync(self.fleet, ws, state_provider=lambda: self._latest)

    # ------------------------------------------------------------------------------ weight sync
    def _push(self, named: NamedTensors, version: str) -> None:
        """Send ``named`` to every server as ``version`` and check that each one reports it."""
        self._latest = named
        self.weight_sync.push(named, version)
        reported = [data.get("weight_version") if isinstance(data, dict) else None
                    for _, data in self.fleet.call_all("GET", "/get_weight_version")]
        if not reported or any(v != version for v in reported):
            raise RuntimeError(f"weight sync: pushed version {version}, servers report {reported}")
        self.version = version

    # ----------------------------------------------------------------------------- one rollout
    def _rollout(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        num_prompts = cfg.train.mini_batch_prompts * self.staleness
        rows = self.sampler.next_batch(num_prompts)
        t0 = time.monotonic()
        groups = generate_groups(self.fleet.router_url, rows, cfg.rollout, rid_prefix=f"s{cfg.train.seed}-step{step}")
        t1 = time.monotonic()
        rewards, reward_stats = score_groups(groups, self.verifier, cfg.reward, self.tokenizer)
        batch = build_rollout_batch(groups, rewards, cfg.advantage)
        metrics = {**batch.metrics, **reward_stats, **self.dataset_stats,
                   "rollout/epoch": float(self.sampler.epoch),
                   "rollout/stale_version_responses": float(sum(
                       1 for g in groups for r in g.responses if r.weight_version != self.version)),
                   "time/generate_s": t1 - t0, "time/score_s": time.monotonic() - t1}
        return {"mini_batches": split_mini_batches(batch.groups, self.staleness), "metrics": metrics}

    def _broadcast(self, payload: Any) -> Any:
        if self.ctx.world_size == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _recompute_old_logprobs(self, mini_batches: list[list[dict]]) -> None:
        """π_old for the whole rollout batch under the weights that generated it (before any step)."""
        flat = [s for mb in mini_batches for s in mb]
        logprobs = self.trainer.compute_logprobs(flat)
        for sample, lp in zip(flat, logprobs):
            sample["old_logp"] = lp.tolist()

    # ------------------------------------------------------------------------------------ loop
    def run(self) -> Optional[RunSummary]:
        cfg = self.cfg
        start = time.monotonic()
        initial = gather_hf_weights(self.exporter)
        error: Optional[BaseException] = None
        writer = progress = None
        rewards: list[float] = []
        seconds_to_target: Optional[float] = None
        step = 0
        try:
            if self.is_driver:
                try:
                    self._setup_driver(initial)
                except BaseException as exc:
                    self._broadcast({"error": f"{type(exc).__name__}: {exc}"})
                    raise
                writer = MetricsWriter(self.output_dir / "metrics.jsonl")
                progress = ProgressReporter(cfg.run.rollout_steps, PROGRESS_KEYS)
            del initial
            for step in range(cfg.run.rollout_steps):
                payload = None
                if self.is_driver:
                    try:
                        payload = self._rollout(step)
                    except BaseException as exc:
                        self._broadcast({"error": f"{type(exc).__name__}: {exc}"})
                        raise
                payload = self._broadcast(payload if self.is_driver else None)
                if "error" in payload:
                    raise RuntimeError(f"rank 0 failed: {payload['error']}")
                mini_batches, step_metrics = payload["mini_batches"], payload["metrics"]
                records = self._train(mini_batches, step, step_metrics)
                t0 = time.monotonic()
                named = gather_hf_weights(self.exporter)
                if self.is_driver:
                    try:
                        self._push(named, str(self.optimizer_steps))
                        self._log_step(step, records, step_metrics, writer, progress, rewards, time.monotonic() - t0,
                                       start)
                        if seconds_to_target is None and cfg.run.stop_at_reward is not None \
                                and rewards[-1] >= cfg.run.stop_at_reward:
                            seconds_to_target = time.monotonic() - start
                    except BaseException as exc:
                        self._broadcast({"error": f"{type(exc).__name__}: {exc}"})
                        raise
                del named
                verdict = self._broadcast({"stop": seconds_to_target is not None} if self.is_driver else None)
                if "error" in verdict:
                    raise RuntimeError(f"rank 0 failed: {verdict['error']}")
                stop = verdict["stop"]
                if stop:
                    break
        except BaseException as exc:
            error = exc
            raise
        finally:
            if writer is not None:
                writer.close()
            self._shutdown(quiet=error is not None)
        if not self.is_driver:
            return None
        plot_path = None
        if cfg.run.plot:
            from megatron_vespo.plotting import plot_metrics

            plot_path = plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "metrics.png")
        return RunSummary(rollout_steps=step + 1, optimizer_steps=self.optimizer_steps, weight_version=self.version,
                          initial_reward=rewards[0], final_reward=sum(rewards[-3:]) / len(rewards[-3:]),
                          best_reward=max(rewards), seconds=time.monotonic() - start,
                          seconds_to_target=seconds_to_target, metrics_path=self.output_dir / "metrics.jsonl",
                          plot_path=plot_path)

    @staticmethod
    def _log_step(step: int, records: list[dict], step_metrics: dict, writer: MetricsWriter,
                  progress: ProgressReporter, rewards: list[float], sync_s: float, start: float) -> None:
        for record in records:
            record["time/weight_sync_s"] = sync_s
            record["time/elapsed_s"] = time.monotonic() - start
            writer.write(step, record)
        progress.report(step, records[-1])
        rewards.append(step_metrics["rollout/reward_mean"])

    def _train(self, mini_batches: list[list[dict]], step: int, rollout_metrics: dict[str, float]) -> list[dict]:
        """N optimizer steps, mini-batch j at policy lag j; one metrics record per step."""
        records = []
        version_used = self.version
        t0 = time.monotonic()
        if self.cfg.train.recompute_old_logprobs:
            self._recompute_old_logprobs(mini_batches)
        recompute_s = time.monotonic() - t0
        for lag, samples in enumerate(mini_batches):
            t0 = time.monotonic()
            if samples:
                result = self.trainer.train_mini_batch(samples)
                metrics = dict(result.metrics)
                self.optimizer_steps += 1
            else:  # every response of the mini-batch was empty: nothing to learn from
                metrics = {"train/skipped_empty_mini_batch": 1.0}
            records.append({**rollout_metrics, **metrics, "train_step": self.optimizer_steps, "lag": lag,
                            "rollout_weight_version": version_used, "train/samples": float(len(samples)),
                            "time/train_s": time.monotonic() - t0, "time/recompute_s": recompute_s})
        return records

    def _shutdown(self, quiet: bool) -> None:
        if not self.is_driver:
            return
        for closer in (getattr(self.weight_sync, "close", None), getattr(self.fleet, "stop", None)):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 -- cleanup must not hide the run's own error
                if not quiet:
                    raise
                print(f"[shutdown] {type(exc).__name__}: {exc}", flush=True)


def check_run_config(cfg: RunConfig) -> None:
    """Rules that only matter for training runs (``megatron-vespo check`` accepts partial configs)."""
    longest = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
    if longest > cfg.model.max_position_embeddings:
        raise ConfigError("rollout.max_response_len",
                          f"max_prompt_len + max_response_len = {longest} exceeds the model's "
                          f"max_position_embeddings={cfg.model.max_position_embeddings}")
    if cfg.rollout.n_samples < 2:
        raise ConfigError("rollout.n_samples", "GRPO needs at least 2 responses per prompt")


def run_sync_training(cfg: RunConfig) -> Optional[RunSummary]:
    """Initialise (torchrun or single process), run the loop, tear down. Returns the summary on rank 0."""
    check_run_config(cfg)
    ctx = init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    try:
        return SyncRLDriver(cfg, ctx).run()
    finally:
        destroy_distributed()
