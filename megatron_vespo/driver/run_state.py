"""A run's progress: counters, reward history, wall clock; what a training checkpoint carries of the
driver; when to save one; and the summary at the end.

:class:`RunState` is kept on every rank (the reward history only on rank 0, which saves it).
:class:`RunCheckpoints` decides when to save (``checkpoint.save_every_steps``, the end of the run)
and resumes the latest checkpoint before the fleet boots, so the servers start from the resumed
weights at the resumed version.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_vespo.checkpoint.training import TrainingCheckpointer
from megatron_vespo.logging_utils import format_duration


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


class RunCheckpoints:
    """When to save a training checkpoint, and resuming one (collective calls, every rank)."""

    def __init__(self, checkpointer: TrainingCheckpointer, save_every_steps: int, is_driver: bool):
        self.checkpointer = checkpointer
        self.save_every_steps = save_every_steps
        self.is_driver = is_driver
        self.last_saved_step: Optional[int] = None

    def resume(self) -> Optional[dict[str, Any]]:
        """Load the checkpoint ``checkpoint.resume`` / ``load_dir`` name (model, optimizer, scheduler, RNG);
        the driver state it carries, or None for a fresh start."""
        directory = self.checkpointer.resume_directory()
        if directory is None:
            return None
        t0 = time.monotonic()
        loaded = self.checkpointer.load(directory)
        self.last_saved_step = loaded.step
        state = dict(loaded.driver_state)
        if self.is_driver:
            print(f"[checkpoint] resumed from {loaded.directory} (rollout step {state['rollout_step']}, "
                  f"{state['optimizer_steps']} optimizer steps, weight version {state['weight_version']}, "
                  f"{time.monotonic() - t0:.1f}s)", flush=True)
        return state

    def maybe_save(self, step: int, final: bool, driver_state: Callable[[int], dict[str, Any]]) -> None:
        """After loop step ``step`` (0-based) save a checkpoint when ``save_every_steps`` says so, or when
        ``final`` (the end of the run); never twice for the same step. ``driver_state(next_step)`` gives
        the driver's part (rank 0's is saved)."""
        every = self.save_every_steps
        done = step + 1
        if every == 0 or done == self.last_saved_step or (not final and done % every):
            return
        t0 = time.monotonic()
        path = self.checkpointer.save(done, driver_state(done))
        self.last_saved_step = done
        if self.is_driver:
            print(f"[checkpoint] saved {path} ({time.monotonic() - t0:.1f}s)", flush=True)
