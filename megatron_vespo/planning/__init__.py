"""Pre-launch planning: parameter counts, per-GPU memory estimates and the GPU split of a run."""
from megatron_vespo.planning.memory import (
    ColocatedEstimate, FleetEstimate, PlanError, RunPlan, ServerEstimate, TrainerEstimate, format_plan, minimal_world_size, plan_run,
)
from megatron_vespo.planning.params import ParamCount, count_params

__all__ = ["ColocatedEstimate", "FleetEstimate", "ParamCount", "PlanError", "RunPlan", "ServerEstimate", "TrainerEstimate",
           "count_params", "format_plan", "minimal_world_size", "plan_run"]
