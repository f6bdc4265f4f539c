"""The RL driver: rollout through the fleet, scoring, GRPO, policy updates, weight sync."""
from megatron_vespo.driver.base import RLDriver, RunSummary
from megatron_vespo.driver.sync_loop import SyncRLDriver, run_sync_training

__all__ = ["RLDriver", "RunSummary", "SyncRLDriver", "run_sync_training"]
