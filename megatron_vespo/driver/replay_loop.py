"""Training on saved rollout batches (``rollout.replay_dir``): the synchronous loop without a fleet.

Each loop step reads the next ``batch_<step>.safetensors`` a run wrote with ``rollout.dump_dir``
(``data/rollout_dump.py``) on rank 0, checks it against this run's model and sampling temperature, and
trains its mini-batches in the saved order and split, one optimizer step each (mini-batch j at lag j),
as :class:`~.sync_loop.SyncRLDriver` does with a fresh batch. Nothing is generated, scored or pushed:
no fleet, router or verifier starts. With the same config and seed the trainer sees exactly the samples
of the run that saved them, so the losses are the same step by step (what the tests check): losses,
corrections or optimizer settings can be compared on identical data, and a failing step debugged
without a fleet.

The rollout metrics saved with each batch (reward, response lengths, ...) are logged again with the
step (their ``time/*`` entries are dropped: they timed the original run), plus ``replay/batch`` (the
file's step) and ``time/replay_load_s``. ``rollout_weight_version`` counts optimizer steps as the
original run's pushes did, and ``lag`` is the saved one (a file of an asynchronous run holds one mini-batch
trained at the lag its metrics say). ``train.recompute_old_logprobs`` recomputes π_old per file, as the
synchronous loop does per rollout batch. The run trains ``min(run.rollout_steps, files)`` batches;
checkpoints and resume work as in the synchronous loop (the data position is the file's step).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.data.rollout_dump import BatchContext, list_batch_files, read_batch
from megatron_vespo.distributed import DistributedContext
from megatron_vespo.driver.sync_loop import SyncRLDriver
from megatron_vespo.train.sample import TrainSample


class ReplayRLDriver(SyncRLDriver):
    """The synchronous loop over saved batches (see the module docstring)."""

    def __init__(self, cfg: RunConfig, ctx: DistributedContext):
        super().__init__(cfg, ctx)
        self._files: list[Path] = []  # rank 0
        self._num_files: Optional[int] = None  # every rank, once boot_fleet ran

    def total_steps(self) -> int:
        if self._num_files is None:  # before boot_fleet (resume checks): as configured
            return self.cfg.run.rollout_steps
        return min(self.cfg.run.rollout_steps, self._num_files)

    def boot_fleet(self) -> None:
        """No fleet: rank 0 lists the saved batches (``check`` and ``train`` have read and checked each)."""
        def files() -> int:
            self._files = list_batch_files(Path(self.cfg.rollout.replay_dir))
            print(f"[replay] {len(self._files)} saved batch(es) in {self.cfg.rollout.replay_dir}; no fleet is "
                  f"started", flush=True)
            return len(self._files)

        self._num_files = self.from_driver(files)

    def restore_restarted_servers(self) -> None:
        pass  # no servers

    def publish_weights(self) -> float:
        # Nothing to push to; the version still follows the optimizer steps, as the original run's pushes did.
        self.publisher.version = str(self.state.optimizer_steps)
        return 0.0

    def _training_batch(self, step: int) -> tuple[list[list[TrainSample]], dict[str, Any]]:
        """Every rank: the saved mini-batches as they are (with ``loss.kl`` mode loss, plus the reference's
        log-probs; the reward mode is refused by the config: the saved advantages are final)."""
        batch = self.from_driver(lambda: self._rollout(step))
        metrics = batch["metrics"]
        if self.reference is not None:
            metrics["time/reference_s"] = self.reference.attach_logprobs(self.trainer, batch["mini_batches"])
        return batch["mini_batches"], metrics

    def _rollout(self, step: int) -> dict[str, Any]:
        """Rank 0: the saved batch of loop step ``step``, as trained by the run that saved it."""
        t0 = time.monotonic()
        path = self._files[step]
        saved = read_batch(path, BatchContext.from_config(self.cfg))
        metrics = {k: v for k, v in saved.metrics.items() if not k.startswith("time/")}
        metrics.update({"replay/batch": float(saved.step), "time/replay_load_s": time.monotonic() - t0})
        if "rollout/reward_mean" not in metrics:  # the stop rule and the summary read it
            rewards = [r for r in saved.rewards if r is not None]
            metrics["rollout/reward_mean"] = sum(rewards) / len(rewards) if rewards else 0.0
        return {"mini_batches": saved.mini_batches, "metrics": metrics}

    def _train(self, mini_batches: list[list[TrainSample]], rollout_metrics: dict[str, Any]) -> list[dict]:
        records = super()._train(mini_batches, rollout_metrics)
        if "lag" in rollout_metrics:  # an asynchronous run's batch: the lag it was trained at, not its index here
            for record in records:
                record["lag"] = rollout_metrics["lag"]
        return records
