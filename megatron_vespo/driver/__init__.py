"""The RL driver: rollout through the fleet, scoring, GRPO, policy updates, weight sync."""
from megatron_vespo.driver.sync_loop import RunSummary, SyncRLDriver, run_sync_training

__all__ = ["RunSummary", "SyncRLDriver", "run_sync_training"]
