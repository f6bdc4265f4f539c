"""Learning-rate (and weight-decay) schedule: Megatron's OptimizerParamScheduler from the config."""
from __future__ import annotations

from typing import Any

from megatron_vespo.config.schema import OptimizerConfig


def build_lr_scheduler(optimizer: Any, cfg: OptimizerConfig) -> Any:
    """Warmup (linear, update k of w gets lr·k/w) then constant, linear or cosine decay to ``min_lr``.

    The scheduler's state goes into training checkpoints so a resumed run continues the curve.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = cfg.decay_steps or 1
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.lr if cfg.lr_schedule == "constant" else cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    # Megatron's scheduler starts at step 0, whose warmup lr is 0: the first update would be wasted.
    # Advance once so that update k uses the lr of step k (the trainer steps it after each update).
    scheduler.step(increment=1)
    return scheduler
