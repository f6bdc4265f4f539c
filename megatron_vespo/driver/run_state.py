"""A run's progress: counters, reward history, wall clock; what a training checkpoint carries of the
driver; when to save one; and the summary at the end.

:class:`RunState` is kept on every rank (the reward history only on rank 0, which saves it).
:class:`RunCheckpoints` decides when to save (``checkpoint.save_every_steps``, the end of the run)
and resumes the latest checkpoint before the fleet boots, so the servers start from the resumed
weights at the resumed version. Everything about the resume is checked before the fleet boots: the
checkpoint (files, hashes, model; see ``checkpoint/training.py``), whether the run had already
finished (then :class:`RunAlreadyFinished`: a message and exit status 0, nothing started), and the
run's ``metrics.jsonl`` (a torn last line is tolerated, a corrupt line elsewhere is an error naming
the file and line; see :class:`~megatron_vespo.logging_utils.MetricsWriter` for what is kept).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_vespo.checkpoint.hf_io import CheckpointError
from megatron_vespo.checkpoint.training import TrainingCheckpointer
from megatron_vespo.config.schema import RunConfig
from megatron_vespo.logging_utils import METRICS_FILE, MetricsFileError, check_metrics_file, format_duration


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


@dataclass
class RunState:
    """Counters and history of a run; :meth:`to_checkpoint` / :meth:`restore` carry them across a resume."""

    optimizer_steps: int = 0
    next_rollout_step: int = 0  # the loop step a resumed run starts at
    rewards: list[float] = field(default_factory=list)  # rank 0: mean reward per rollout batch
    seconds_to_target: Optional[float] = None
    elapsed_before_resume_s: float = 0.0  # wall time of the run segments before the last resume
    clock_start: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        """Wall time of the whole run, earlier segments (before a resume) included."""
        return self.elapsed_before_resume_s + time.monotonic() - self.clock_start

    def reached_target(self, reward: float, window: int, target: Optional[float]) -> bool:
        """Rank 0: record a rollout batch's mean reward; true once the mean of the last ``window`` of them
        has reached ``target`` (``run.stop_at_reward``; the time it first did is kept for the summary)."""
        self.rewards.append(reward)
        recent = self.rewards[-window:]
        if self.seconds_to_target is None and target is not None and len(recent) == window \
                and sum(recent) / window >= target:
            self.seconds_to_target = self.elapsed_s()
        return self.seconds_to_target is not None

    def to_checkpoint(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "rollout_step": self.next_rollout_step,
                "rewards": list(self.rewards), "seconds_to_target": self.seconds_to_target,
                "elapsed_s": self.elapsed_s()}

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        self.next_rollout_step = int(state["rollout_step"])
        self.rewards = list(state["rewards"])
        self.seconds_to_target = state["seconds_to_target"]
        self.elapsed_before_resume_s = float(state["elapsed_s"])
        self.clock_start = time.monotonic()

    def summary(self, steps_done: int, first_step: int, weight_version: str, output_dir: Path,
                plot: bool) -> RunSummary:
        """Rank 0, after the loop: the plot (``run.plot``) and the run summary."""
        if not self.rewards:
            raise RuntimeError(f"nothing to do: the run resumed at step {first_step}, past its last step")
        plot_path = None
        if plot:
            from megatron_vespo.plotting import plot_metrics

            plot_path = plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
        rewards = self.rewards
        return RunSummary(rollout_steps=steps_done, optimizer_steps=self.optimizer_steps, weight_version=weight_version,
                          initial_reward=rewards[0], final_reward=sum(rewards[-3:]) / len(rewards[-3:]),
                          best_reward=max(rewards), seconds=self.elapsed_s(),
                          seconds_to_target=self.seconds_to_target, metrics_path=output_dir / "metrics.jsonl",
                          plot_path=plot_path)


class RunAlreadyFinished(SystemExit):
    """A relaunch of a run whose last checkpoint is its end: nothing to train. A SystemExit with status
    0, raised on every rank before anything starts, so that ``megatron-vespo train`` (and torchrun)
    exit successfully after the message; code that embeds the driver can catch it."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


def loop_steps(cfg: RunConfig) -> int:
    """Loop steps of the whole run as configured (the unit of ``rollout_step`` in the driver state):
    rollout steps, or mini-batches in async mode (as ``SyncRLDriver`` / ``AsyncRLDriver.total_steps``)."""
    if cfg.rollout.replay_dir:  # a replay's step is one saved batch, whatever mode generated it
        return cfg.run.rollout_steps
    return cfg.run.rollout_steps * (cfg.train.staleness if cfg.train.mode == "async" else 1)


def finished_reason(state: dict[str, Any], cfg: RunConfig) -> Optional[str]:
    """Why a checkpoint's driver state is the end of the run configured by ``cfg`` (None: it is not).

    Every step done (a larger ``run.rollout_steps`` continues the run), or the save at the end of a
    run that reached ``run.stop_at_reward`` (``run.stop_at_reward=null`` continues it)."""
    total = loop_steps(cfg)
    if int(state["rollout_step"]) >= total:
        return f"all {total} steps done"
    if state.get("finished") and state.get("seconds_to_target") is not None and cfg.run.stop_at_reward is not None:
        return f"it reached run.stop_at_reward={cfg.run.stop_at_reward}"
    return None


def check_metrics_for_resume(path: Path) -> None:
    """Rank 0, before the fleet boots: ``metrics.jsonl`` can be continued (CheckpointError naming the file
    and line otherwise; a torn last line is fine, the writer drops it)."""
    try:
        check_metrics_file(path)
    except MetricsFileError as exc:
        raise CheckpointError(f"{exc}; the run was not resumed, nothing was changed") from None


class RunCheckpoints:
    """When to save a training checkpoint, and resuming one (collective calls, every rank)."""

    def __init__(self, checkpointer: TrainingCheckpointer, save_every_steps: int, is_driver: bool):
        self.checkpointer = checkpointer
        self.save_every_steps = save_every_steps
        self.is_driver = is_driver
        self.last_saved_step: Optional[int] = None

    def resume(self) -> Optional[dict[str, Any]]:
        """Load the checkpoint ``checkpoint.resume`` / ``load_dir`` name (model, optimizer, scheduler, RNG);
        the driver state it carries, or None for a fresh start. Collective; before the fleet boots.

        Raises :class:`RunAlreadyFinished` (exit status 0) when the checkpoint is the end of the run
        as configured, and a CheckpointError naming the file and line when ``metrics.jsonl`` is
        corrupt before its last line (on every rank, so none is left waiting)."""
        directory = self.checkpointer.resume_directory()
        if directory is None:
            return None
        cfg = self.checkpointer.cfg
        state = dict(self.checkpointer.driver_state(directory))
        reason = finished_reason(state, cfg)
        if reason is not None:
            message = (f"the run already finished at step {state['rollout_step']} ({reason}); its last checkpoint is "
                       f"{directory} (checkpoint.dir {self.checkpointer.root}). Nothing to do. To train further "
                       "raise run.rollout_steps; to start over use another run.output_dir or checkpoint.resume=never")
            if self.is_driver:
                print(f"[checkpoint] {message}", flush=True)
            raise RunAlreadyFinished(message)
        metrics = Path(cfg.run.output_dir) / METRICS_FILE
        self.checkpointer.on_rank0(lambda: check_metrics_for_resume(metrics))
        t0 = time.monotonic()
        loaded = self.checkpointer.load(directory)
        self.last_saved_step = loaded.step
        state = dict(loaded.driver_state)
        if self.is_driver:
            print(f"[checkpoint] resumed from {loaded.directory} (rollout step {state['rollout_step']}, "
                  f"{state['optimizer_steps']} optimizer steps, weight version {state['weight_version']}, "
                  f"{time.monotonic() - t0:.1f}s)", flush=True)
        return state

    def due(self, step: int, final: bool) -> bool:
        """Whether :meth:`maybe_save` saves after loop step ``step``."""
        every, done = self.save_every_steps, step + 1
        return not (every == 0 or done == self.last_saved_step or (not final and done % every))

    def maybe_save(self, step: int, final: bool, driver_state: Callable[[int], dict[str, Any]]) -> None:
        """After loop step ``step`` (0-based) save a checkpoint when ``save_every_steps`` says so, or when
        ``final`` (the end of the run); never twice for the same step. ``driver_state(next_step)`` gives
        the driver's part (rank 0's is saved)."""
        if not self.due(step, final):
            return
        done = step + 1
        t0 = time.monotonic()
        # "finished": the run ends with this step (its last one, or run.stop_at_reward reached), so
        # that a relaunch says so instead of training on (see finished_reason).
        path = self.checkpointer.save(done, {**driver_state(done), "finished": bool(final)})
        self.last_saved_step = done
        if self.is_driver:
            print(f"[checkpoint] saved {path} ({time.monotonic() - t0:.1f}s)", flush=True)
