"""The RL driver: rollout through the fleet, scoring, GRPO, policy updates, weight sync."""
from __future__ import annotations

from typing import Optional

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.driver.base import RLDriver
from megatron_vespo.driver.run_state import RunSummary
from megatron_vespo.driver.sync_loop import SyncRLDriver


def run_training(cfg: RunConfig) -> Optional[RunSummary]:
    """The loop ``train.mode`` names (sync: staleness-N batches; async: continuous generation), or with
    ``rollout.replay_dir`` the replay of saved batches (no fleet)."""
    if cfg.rollout.replay_dir:
        from megatron_vespo.driver.replay_loop import ReplayRLDriver

        return ReplayRLDriver.launch(cfg)
    if cfg.train.mode == "async":
        from megatron_vespo.driver.async_loop import AsyncRLDriver

        return AsyncRLDriver.launch(cfg)
    return SyncRLDriver.launch(cfg)


__all__ = ["RLDriver", "RunSummary", "SyncRLDriver", "run_training"]
