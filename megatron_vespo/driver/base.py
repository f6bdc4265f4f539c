"""What every RL loop shares: the trainer on every rank, and on rank 0 the data, verifier, fleet and
weight sync; rank-0-to-all broadcasting with error propagation; N optimizer steps over mini-batches.

The loops (``sync_loop.SyncRLDriver``, ``async_loop.AsyncRLDriver``) only decide *when* to generate,
train and push. Rank 0 drives; the other ranks follow the payloads it broadcasts, so a failure on
rank 0 is broadcast as ``{"error": ...}`` and raised everywhere instead of leaving ranks hanging in
a collective.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.hf_io import SafetensorsWriter, hf_config_from_model
from megatron_vespo.checkpoint.training import TrainingCheckpointer
from megatron_vespo.config.schema import RunConfig
from megatron_vespo.config.typed import ConfigError
from megatron_vespo.distributed import DistributedContext, destroy_distributed, init_distributed
from megatron_vespo.logging_utils import format_duration
from megatron_vespo.models.trainable import build_model_and_optimizer
from megatron_vespo.train.lr_schedule import build_lr_scheduler
from megatron_vespo.train.routing import rollout_experts_shape
from megatron_vespo.train.step import PolicyTrainer

NamedTensors = list[tuple[str, torch.Tensor]]

PROGRESS_KEYS = {"rollout/reward_mean": "reward", "rollout/response_len_mean": "len",
                 "rollout/zero_std_fraction": "flat", "vespo/W_mean": "W", "vespo/phi_mean": "phi",
                 "mismatch/logp_gap_mean": "gap", "mismatch/routing_flip_rate": "flip", "train/grad_norm": "gnorm"}


class RankZeroError(RuntimeError):
    """Raised on ranks > 0 when rank 0 failed (its error message is included)."""


@dataclass
class RunSummary:
    """What a finished run reports (rank 0)."""

    rollout_steps: int
    optimizer_steps: int
    weight_version: str
    initial_reward: float
    final_reward: float  # mean of the last (up to) three rollout batches
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


class RLDriver:
    """The trainer on every rank; on rank 0 the data, verifier, fleet and weight sync."""

    def __init__(self, cfg: RunConfig, ctx: DistributedContext):
        self.cfg = cfg
        self.ctx = ctx
        self.is_driver = ctx.rank == 0
        self.trainable = build_model_and_optimizer(cfg, init_checkpoint=self._init_checkpoint())
        self.scheduler = build_lr_scheduler(self.trainable.optimizer, cfg.optimizer)
        self.trainer = PolicyTrainer(cfg, self.trainable, self.scheduler, temperature=cfg.rollout.temperature)
        self.exporter = HFWeightExporter(self.trainable.model, cfg.model,
                                         bucket_bytes=cfg.rollout.weight_sync.bucket_bytes)
        self.output_dir = Path(cfg.run.output_dir)
        self.optimizer_steps = 0
        self.version = "0"  # the fleet's weight version (= optimizer steps at the last push)
        self.fleet = None
        self.weight_sync = None
        self._latest: NamedTensors = []
        # Run progress that a training checkpoint carries (see checkpoint_state).
        self.checkpointer = TrainingCheckpointer(cfg, self.trainable.model, self.trainable.optimizer, self.scheduler)
        self.next_rollout_step = 0
        self.rewards: list[float] = []  # rank 0: mean reward per rollout batch (the summary's history)
        self.seconds_to_target: Optional[float] = None
        self.elapsed_before_resume_s = 0.0  # wall time of the run segments before the last resume
        self.run_clock_start = time.monotonic()
        self._last_saved_step: Optional[int] = None
        self._pending_sampler_state: Optional[dict] = None  # restored once setup_driver made the sampler
        self.evaluator = None  # rank 0, when eval.sets and eval.every_steps are set
        self.metrics_writer = None  # rank 0, from open_metrics; closed by shutdown
        self.progress = None  # rank 0, from open_metrics: the progress line printer
        self._last_eval_step: Optional[int] = None

    @property
    def rollout_experts_shape(self) -> Optional[tuple[int, int]]:
        """(MoE layers, top-k) of the routed experts the fleet returns, for servers that do not report it.

        None for a dense model, and for an MoE model with dense layers: an engine may then give rows
        for the MoE layers (the CPU server) or for every layer, and the train step tells them apart
        from a complete response (``train.routing.routed_shape``)."""
        m = self.cfg.model
        return rollout_experts_shape(m) if m.num_experts and not m.mlp_only_layers else None

    def _init_checkpoint(self) -> Optional[Path]:
        """The dist checkpoint named by ``checkpoint.init_from`` (an HF directory is converted once)."""
        ck = self.cfg.checkpoint
        if not ck.init_from:
            return None
        from megatron_vespo.checkpoint.init_weights import resolve_init_checkpoint
        from megatron_vespo.checkpoint.training import checkpoint_root, find_resume_checkpoint

        if find_resume_checkpoint(self.cfg) is not None:
            return None  # the training checkpoint replaces these weights anyway
        return resolve_init_checkpoint(ck.init_from, self.cfg.model, checkpoint_root(self.cfg) / "init")

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

    # ------------------------------------------------------------------------------ rank 0 setup
    def setup_driver(self, initial: NamedTensors) -> None:
        """Data, verifier, fleet (booted from ``initial`` when it is the default CPU fleet), weight sync."""
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
        if self._pending_sampler_state is not None:  # resumed: continue at the checkpoint's data position
            self.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        try:
            self.verifier = get_verifier(cfg.reward.verifier)
        except KeyError as exc:
            raise ConfigError("reward.verifier", str(exc.args[0]).split(": ", 1)[-1]) from None
        if cfg.eval.sets and cfg.eval.every_steps:
            from megatron_vespo.driver.evaluation import Evaluator

            self.evaluator = Evaluator(cfg, self.tokenizer)

        initial_dir: Optional[Path] = None
        if cfg.rollout.fleet is None:
            # Servers boot from a directory holding exactly the trainer's initial weights.
            initial_dir = write_hf_dir(initial, cfg, self.output_dir / "initial_hf")
            extra = ["--weight-version", self.version]
            if cfg.rollout.cpu_server_deterministic:  # one sequence per forward: results independent of timing
                extra += ["--max-batch-size", "1"]
            server = ServerConfig(kind="cpu", model_path=str(initial_dir), dtype=cfg.rollout.cpu_server_dtype,
                                  extra_args=extra)
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
            # The given servers' checkpoint need not be the trainer's weights (initial or resumed).
            self.push_weights(initial, self.version)

    def _make_weight_sync(self, config_dir: Path):
        from rollout_sglang.weight_sync import make_weight_sync

        ws = self.cfg.rollout.weight_sync
        if ws.transport == "disk" and not ws.disk_dir:
            ws = dataclasses.replace(ws, disk_dir=str(self.output_dir / "weights"))
        return make_weight_sync(self.fleet, ws, config_dir=str(config_dir) if config_dir.is_dir() else None,
                                state_provider=lambda: self._latest)

    # ------------------------------------------------------------------------------ weight sync
    def push_weights(self, named: NamedTensors, version: str) -> None:
        """Rank 0: send ``named`` to every server as ``version`` and check that each one reports it."""
        self._latest = named
        self.weight_sync.push(named, version)
        reported = [data.get("weight_version") if isinstance(data, dict) else None
                    for _, data in self.fleet.call_all("GET", "/get_weight_version")]
        if not reported or any(v != version for v in reported):
            raise RuntimeError(f"weight sync: pushed version {version}, servers report {reported}")
        self.version = version

    def export_and_push(self) -> float:
        """Collective: gather the current weights and push them as version = optimizer steps. Seconds taken."""
        t0 = time.monotonic()
        named = gather_hf_weights(self.exporter)
        self.from_driver(lambda: self.push_weights(named, str(self.optimizer_steps)))
        return time.monotonic() - t0

    # ------------------------------------------------------------------------------------ train
    def recompute_old_logprobs(self, samples: list[dict]) -> float:
        """π_old under the current weights (before any step on these samples). Seconds taken."""
        t0 = time.monotonic()
        for sample, lp in zip(samples, self.trainer.compute_logprobs(samples)):
            sample["old_logp"] = lp.tolist()
        return time.monotonic() - t0

    def train_step(self, samples: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step on ``samples`` (every rank); the metrics record, ``extra`` included."""
        t0 = time.monotonic()
        if samples:
            metrics = dict(self.trainer.train_mini_batch(samples).metrics)
            self.optimizer_steps += 1
        else:  # every response of the mini-batch was empty: nothing to learn from
            metrics = {"train/skipped_empty_mini_batch": 1.0}
        return {**extra, **metrics, "train_step": self.optimizer_steps, "train/samples": float(len(samples)),
                "time/train_s": time.monotonic() - t0}

    # ------------------------------------------------------------------------- eval and logging
    def maybe_evaluate(self, steps_before: int, final: bool = False) -> dict[str, float]:
        """Collective: evaluate through the router when a multiple of ``eval.every_steps`` lies in
        ``(steps_before, optimizer_steps]``, or at the end of the run if the last step was not
        evaluated. The ``eval/*`` metrics (empty when nothing ran), on every rank."""
        if not (self.cfg.eval.sets and self.cfg.eval.every_steps):
            return {}  # known on every rank: no broadcast per step when evaluation is off

        def run() -> dict[str, float]:
            ev, now = self.evaluator, self.optimizer_steps
            if ev is None or now == self._last_eval_step:
                return {}
            if not (ev.due(now, previous=steps_before) or final):
                return {}
            t0 = time.monotonic()
            metrics = ev.run(self.fleet.router_url, now)
            self._last_eval_step = now
            metrics["time/eval_s"] = time.monotonic() - t0
            print("[eval] step " + str(now) + ": " + ", ".join(
                f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k.endswith("/accuracy")), flush=True)
            return metrics

        return self.from_driver(run)

    def open_metrics(self, first_step: int) -> None:
        """Rank 0: the metrics logger (JSONL + configured sinks; continues the file after a resume) and
        the progress line printer."""
        from megatron_vespo.logging_utils import MetricsLogger, ProgressReporter

        self.metrics_writer = MetricsLogger.from_config(self.cfg, resume_step=first_step or None)
        self.progress = ProgressReporter(self.total_steps(), self.progress_keys, first_step=first_step)

    def reached_target(self, reward: float, window: int) -> bool:
        """Rank 0: record a rollout batch's mean reward; true once the mean of the last ``window`` of
        them has reached ``run.stop_at_reward`` (the time it first did is kept for the summary)."""
        self.rewards.append(reward)
        recent = self.rewards[-window:]
        target = self.cfg.run.stop_at_reward
        if self.seconds_to_target is None and target is not None and len(recent) == window \
                and sum(recent) / window >= target:
            self.seconds_to_target = self.elapsed_s()
        return self.seconds_to_target is not None

    def summary(self, steps_done: int, first_step: int) -> RunSummary:
        """Rank 0, after the loop: the plot (``run.plot``) and the run summary."""
        if not self.rewards:
            raise RuntimeError(f"nothing to do: the run resumed at step {first_step}, past its last step")
        plot_path = None
        if self.cfg.run.plot:
            from megatron_vespo.plotting import plot_metrics

            plot_path = plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "metrics.png")
        rewards = self.rewards
        return RunSummary(rollout_steps=steps_done, optimizer_steps=self.optimizer_steps, weight_version=self.version,
                          initial_reward=rewards[0], final_reward=sum(rewards[-3:]) / len(rewards[-3:]),
                          best_reward=max(rewards), seconds=self.elapsed_s(),
                          seconds_to_target=self.seconds_to_target, metrics_path=self.output_dir / "metrics.jsonl",
                          plot_path=plot_path)

    # ------------------------------------------------------------------------------- checkpoints
    def elapsed_s(self) -> float:
        """Wall time of the whole run, earlier segments (before a resume) included."""
        return self.elapsed_before_resume_s + time.monotonic() - self.run_clock_start

    def checkpoint_state(self) -> dict[str, Any]:
        """The driver's part of a training checkpoint (rank 0's is saved). Subclasses extend it via super()."""
        sampler = getattr(self, "sampler", None)
        return {"optimizer_steps": self.optimizer_steps, "weight_version": self.version,
                "rollout_step": self.next_rollout_step, "rewards": list(self.rewards),
                "seconds_to_target": self.seconds_to_target, "elapsed_s": self.elapsed_s(),
                "sampler": sampler.state_dict() if sampler is not None else None}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` (every rank; the sampler part applies on rank 0)."""
        self.optimizer_steps = int(state["optimizer_steps"])
        self.version = str(state["weight_version"])
        self.next_rollout_step = int(state["rollout_step"])
        self.rewards = list(state["rewards"])
        self.seconds_to_target = state["seconds_to_target"]
        self.elapsed_before_resume_s = float(state["elapsed_s"])
        self.run_clock_start = time.monotonic()
        if self.is_driver and state.get("sampler") is not None:
            if getattr(self, "sampler", None) is not None:
                self.sampler.load_state_dict(state["sampler"])
            else:
                self._pending_sampler_state = state["sampler"]

    def maybe_resume(self) -> Optional[int]:
        """Collective: load the checkpoint that ``checkpoint.resume``/``load_dir`` name, if any.

        Call at the start of ``run()`` before the fleet boots, so the servers start from the resumed
        weights at the resumed version. Returns the next rollout step, or None for a fresh start.
        """
        directory = self.checkpointer.resume_directory()
        if directory is None:
            return None
        t0 = time.monotonic()
        loaded = self.checkpointer.load(directory)
        self.restore_checkpoint_state(loaded.driver_state)
        self._last_saved_step = loaded.step
        if self.is_driver:
            print(f"[checkpoint] resumed from {loaded.directory} (rollout step {self.next_rollout_step}, "
                  f"{self.optimizer_steps} optimizer steps, weight version {self.version}, "
                  f"{time.monotonic() - t0:.1f}s)", flush=True)
        return self.next_rollout_step

    def maybe_save(self, step: int, final: bool = False) -> None:
        """Collective: after rollout step ``step`` (0-based) save a checkpoint when ``checkpoint.save_every_steps``
        says so, or when ``final`` (the end of the run); never twice for the same step."""
        every = self.cfg.checkpoint.save_every_steps
        done = step + 1
        if every == 0 or done == self._last_saved_step or (not final and done % every):
            return
        t0 = time.monotonic()
        self.next_rollout_step = done
        path = self.checkpointer.save(done, self.checkpoint_state())
        self._last_saved_step = done
        if self.is_driver:
            print(f"[checkpoint] saved {path} ({time.monotonic() - t0:.1f}s)", flush=True)

    # ------------------------------------------------------------------------------------ end
    def shutdown(self, quiet: bool) -> None:
        """Rank 0: close the metrics sinks and the weight-sync group, stop the fleet (errors only
        printed when ``quiet``, i.e. when the run is already failing)."""
        if not self.is_driver:
            return
        if self.metrics_writer is not None:
            self.metrics_writer.close()
        for closer in (getattr(self.weight_sync, "close", None), getattr(self.fleet, "stop", None)):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 -- cleanup must not hide the run's own error
                if not quiet:
                    raise
                print(f"[shutdown] {type(exc).__name__}: {exc}", flush=True)


    # ------------------------------------------------------------------------------ the loop
    progress_keys: dict[str, str] = PROGRESS_KEYS  # metrics shown on the progress line

    def total_steps(self) -> int:
        """Loop steps of the whole run (a subclass's unit: rollout steps or mini-batches)."""
        raise NotImplementedError

    def start_generation(self) -> None:
        """Rank 0, once the fleet has the initial weights and the metrics are open (async: the generator)."""

    def run_step(self, step: int) -> bool:
        """One loop step on every rank (checkpoint included); true when the run should stop."""
        raise NotImplementedError

    def run(self) -> Optional[RunSummary]:
        """Resume, boot the fleet with the trained weights, loop, shut down; the summary on rank 0."""
        first_step = self.maybe_resume() or 0
        initial = gather_hf_weights(self.exporter)
        error: Optional[BaseException] = None
        step = first_step - 1
        try:
            self.from_driver(lambda: self.setup_driver(initial))
            del initial
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
        return self.summary(step + 1, first_step) if self.is_driver else None

    # ---------------------------------------------------------------------------------- launch
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Rules this loop needs beyond the schema's; runs before any process group exists."""
        check_run_config(cfg)

    @classmethod
    def launch(cls, cfg: RunConfig) -> Optional[RunSummary]:
        """Check, initialise (torchrun or single process), run the loop (:meth:`run`), tear down.
        The summary on rank 0."""
        cls.check_config(cfg)
        ctx = init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
        try:
            return cls(cfg, ctx).run()
        finally:
            destroy_distributed()


def check_run_config(cfg: RunConfig) -> None:
    """Rules that only matter for training runs (``megatron-vespo check`` accepts partial configs)."""
    longest = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
    if longest > cfg.model.max_position_embeddings:
        raise ConfigError("rollout.max_response_len",
                          f"max_prompt_len + max_response_len = {longest} exceeds the model's "
                          f"max_position_embeddings={cfg.model.max_position_embeddings}")
    if cfg.rollout.n_samples < 2:
        raise ConfigError("rollout.n_samples", "GRPO needs at least 2 responses per prompt")
