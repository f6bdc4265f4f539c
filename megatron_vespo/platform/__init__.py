"""Platform layer: every change the project makes to Megatron-Core's behaviour, applied in one place.

- :mod:`~megatron_vespo.platform.pipeline_p2p`: a Megatron-Core bug fix needed on every platform (the
  pipeline exchange between two stages that are each other's previous and next);
- :mod:`~megatron_vespo.platform.router_replay`: Megatron-Core's routing replay with rows that may be
  left to the router (``-1``) and served again to activation recompute (every platform);
- :mod:`~megatron_vespo.platform.cpu`: what Megatron-Core needs to run where it was not written to run
  (the CPU), applied only when CUDA is absent.

Call :func:`apply` once per process before building a model (``distributed.init_distributed``
does). On a CUDA machine only the bug fix and the replay extension are applied.
"""
from __future__ import annotations

from megatron_vespo.platform.cpu import applied_patches, apply_cpu_patches, should_patch
from megatron_vespo.platform.pipeline_p2p import apply_pipeline_p2p_fix
from megatron_vespo.platform.router_replay import apply_router_replay_patch


def apply() -> list[str]:
    """Apply the pipeline p2p fix and the routing-replay extension, and the CPU patches if and only if
    CUDA is absent; returns the CPU patches in effect."""
    # The CPU patches first: one of them has to run before Megatron-Core is imported.
    patches = apply_cpu_patches() if should_patch() else []
    apply_pipeline_p2p_fix()
    apply_router_replay_patch()
    return patches


__all__ = ["applied_patches", "apply", "should_patch"]
