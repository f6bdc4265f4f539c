"""Process-group set-up for the trainer: torch.distributed from the torchrun environment, then
Megatron-Core's model-parallel groups and RNG seeds.

Order matters: the platform layer is applied first (CPU patches, before Megatron allocates
anything), the layout is validated against the real world size before any group exists (a clear
``ConfigError`` on every rank instead of a hang or an assertion deep in Megatron), then groups.

Rendezvous: torch's TCPStore server listens on every interface whatever address it is given. The
store this process hosts (a single process without torchrun; rank 0 of a launch that sets
MASTER_ADDR to a loopback address itself) is bound to loopback instead (:func:`trainer_store`).
Under torchrun the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE) and these processes are only
its clients: how it binds is torchrun's choice, not this module's.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_vespo import platform
from megatron_vespo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vespo.models.layout import megatron_parallel_sizes, validate_layout
from megatron_vespo.platform.pipeline_p2p import apply_pipeline_p2p_fix
from rollout_sglang.process_group import create_store, loopback_address


@dataclass(frozen=True)
class DistributedContext:
    """What the caller needs to know about this process after :func:`init_distributed`."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    data_parallel_size: int
    platform_patches: tuple[str, ...]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def init_distributed(
    parallel: ParallelConfig,
    seed: int,
    *,
    model: ModelConfig | None = None,
    precision: PrecisionConfig | None = None,
) -> DistributedContext:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and Megatron's parallel state.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` as set by
    torchrun; without them it runs as a single process (rank 0 of 1, a free local port). When
    ``model`` is given the layout is checked against the real world size first. Every group (the
    default one and Megatron's) gives up on a stuck or dead peer after
    ``parallel.collective_timeout_minutes``.
    """
    patches = tuple(platform.apply())
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if model is not None:
        parallel.check_world_size(world_size)  # names the size at fault (validate_layout names the product)
        validate_layout(model, parallel, precision or PrecisionConfig(), world_size)

    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=parallel.collective_timeout_minutes)
        store = trainer_store(rank, world_size, timeout)
        # store None: torch's env:// rendezvous (MASTER_ADDR/MASTER_PORT: torchrun's agent store, or a
        # non-loopback master that other machines must reach).
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    from megatron.core import parallel_state

    # Not a CPU patch: Megatron-Core swaps activation and gradient between two pipeline ranks under
    # the interleaved schedule on every backend (see the module).
    apply_pipeline_p2p_fix()
    parallel_state.initialize_model_parallel(
        **megatron_parallel_sizes(parallel),
        distributed_timeout_minutes=parallel.collective_timeout_minutes,
    )
    seed_everything(seed)
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        platform_patches=patches,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch alike on every rank, then Megatron's tracked RNG states
    (data-parallel, tensor-parallel and expert-parallel streams; on the CPU generator after the
    platform patch)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def trainer_store(rank: int, world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """The store this process hosts, bound to loopback, or None to leave the rendezvous to torch (env://).

    - no MASTER_ADDR (a single process without torchrun): a loopback store on a free port, passed
      directly rather than through the environment, so that processes this one starts (servers, a
      nested run) do not inherit a port it holds;
    - under torchrun (TORCHELASTIC_USE_AGENT_STORE=True): None, the agent already hosts the store;
    - rank 0 with a loopback MASTER_ADDR set by another launcher: a loopback store at MASTER_PORT.
    """
    addr = os.environ.get("MASTER_ADDR")
    if addr is None:
        return create_store("127.0.0.1", 0, world_size, is_master=True, timeout=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    if rank == 0 and loopback_address(addr) is not None:
        return create_store(addr, _env_int("MASTER_PORT", 29500), world_size, is_master=True, timeout=timeout)
    return None
