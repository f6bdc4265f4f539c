"""Platform layer: what Megatron-Core needs to run where it was not written to run (the CPU).

Call :func:`apply` once per process before building a model (``distributed.init_distributed``
does). On a CUDA machine it changes nothing.
"""
from __future__ import annotations

from megatron_vespo.platform.cpu import applied_patches, apply_cpu_patches, should_patch


def apply() -> list[str]:
    """Apply the CPU patches if and only if CUDA is absent; returns the patches in effect."""
    if should_patch():
        return apply_cpu_patches()
    return []


__all__ = ["applied_patches", "apply", "should_patch"]
