"""Colocated placement (``rollout.fleet.placement.colocate``, synchronous mode): the trainer and the rollout
engines time-share the same GPUs, each phase leaving the memory to the other.

One rollout step (:meth:`Colocation.cycle`, called by the synchronous loop after generation):

1. the engines release their memory: rank 0 pauses generation (``retract``: SGLang releases only an idle
   engine) and releases weights, KV cache and CUDA graphs on every engine (``Fleet.release_memory_occupation``);
2. every rank reloads its trainer state (parameters, gradient buffers, optimizer state:
   :class:`~megatron_vespo.models.offload.TrainerOffloader`);
3. the N optimizer steps;
4. every rank offloads its gradients and optimizer state, then all wait for each other;
5. the engines resume their weight memory (its contents are lost on release: the push below loads it);
6. the weights are published as in any run (``rollout.weight_sync``). With ``ipc`` the sending stage's ranks
   each hold the bucket on their own GPU and every engine TP rank gets handles of the copy on its GPU (from
   the engine's ``CUDA_VISIBLE_DEVICES`` / ``--base-gpu-id`` / ``--gpu-id-step``); an engine rank on a GPU
   that no rank of that stage holds (another pipeline stage's GPU) maps the stage source rank's copy
   across devices (``weight_sync/ipc.py``);
7. every rank offloads its parameters, then all wait;
8. the engines resume KV cache and CUDA graphs, and generation continues.

The parameters stay on the device until the publication is done, later than the issue's order puts them:
the export assembles HF tensors from the parameter shards with device collectives (TP and EP pieces sent to
the stage's source rank), so the push reads them where they are instead of streaming host copies back up; the
engines hold only their weights then (no KV cache yet), so the publication's peak is trainer parameters +
engine weights + a bucket.

Around the loop: before the fleet starts the trainer offloads its gradients and optimizer state, and after the
first push its parameters (:meth:`Colocation.booted`); a checkpoint save reloads parameters and optimizer state
beside the engines' weights, their KV cache and graphs released meanwhile (:meth:`Colocation.trainer_resident`).

Metrics per rollout step: ``time/colocate_{release,reload,offload,resume_weights,resume_kv}_s``;
``colocate/trainer_offloaded_mb`` (what the trainer moved to host memory this step); the resident memory of
the engine processes on rank 0's node, ``colocate/engine_rss_mb_{served,released,resumed}`` (after
generation, after the release, after the resume: what CPU servers hold; a GPU engine's memory is on its
GPU); and with CUDA ``colocate/gpu_free_gb_{released,resumed}`` (rank 0's GPU after the engines released,
and once they resumed).
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_vespo.models.offload import GRADS, OPTIMIZER, PARAMS, PARTS, TrainerOffloader
from rollout_sglang import engine_api as api

if TYPE_CHECKING:
    from megatron_vespo.driver.base import RLDriver

MB = float(1 << 20)
KV_AND_GRAPHS = (api.MEMORY_KV_CACHE, api.MEMORY_CUDA_GRAPH)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Colocation:
    """The colocated cycle of one driver (every rank builds one; rank 0 also drives the fleet)."""

    def __init__(self, driver: "RLDriver"):
        self.driver = driver
        trainable = driver.trainer.trainable
        self.offloader = TrainerOffloader(trainable.model, trainable.optimizer)

    # ---- rank 0's side: the engines --------------------------------------------------------------
    def _engines(self, fn: Callable[[Any], dict[str, float]]) -> dict[str, float]:
        """Collective: ``fn(fleet)`` on rank 0 (errors raised everywhere); its metrics on every rank."""
        return self.driver.from_driver(lambda: fn(self.driver.rollout.fleet))

    @staticmethod
    def _memory(fleet: Any, phase: str) -> dict[str, float]:
        out: dict[str, float] = {}
        rss = fleet.resident_memory()
        if rss:
            out[f"colocate/engine_rss_mb_{phase}"] = sum(rss.values()) / MB
        if torch.cuda.is_available() and phase != "served":
            out[f"colocate/gpu_free_gb_{phase}"] = torch.cuda.mem_get_info()[0] / 1e9
        return out

    def _release(self, fleet: Any, tags: tuple[str, ...] = api.MEMORY_TAGS) -> dict[str, float]:
        before = self._memory(fleet, "served")
        t0 = time.monotonic()
        fleet.release_memory_occupation(tags)
        return {**before, "time/colocate_release_s": time.monotonic() - t0, **self._memory(fleet, "released")}

    @staticmethod
    def _resume(fleet: Any, tags: tuple[str, ...], key: str) -> dict[str, float]:
        t0 = time.monotonic()
        fleet.resume_memory_occupation(tags)
        return {key: time.monotonic() - t0}

    def _resume_and_continue(self, fleet: Any) -> dict[str, float]:
        metrics = self._resume(fleet, KV_AND_GRAPHS, "time/colocate_resume_kv_s")
        fleet.continue_generation()
        return {**metrics, **self._memory(fleet, "resumed")}

    # ---- every rank: the trainer -----------------------------------------------------------------
    def _offload(self, parts: tuple[str, ...]) -> tuple[float, float]:
        """Offload ``parts`` on every rank and wait for all (the engines take the memory next); (MB, seconds)."""
        t0 = time.monotonic()
        moved = self.offloader.offload(parts)
        _barrier()
        return moved / MB, time.monotonic() - t0

    # ---- the cycle -------------------------------------------------------------------------------
    def cycle(self, train: Callable[[], list[dict]], publish: Callable[[], float]) -> tuple[list[dict], float]:
        """Collective: engines release -> trainer reload -> ``train()`` -> trainer offload -> engines resume
        weights -> ``publish()`` -> parameters offloaded -> engines resume KV cache and graphs (module
        docstring). The training records, each with the step's colocation metrics, and the push's seconds."""
        metrics = self._engines(self._release)
        t0 = time.monotonic()
        self.offloader.reload(PARTS)
        metrics["time/colocate_reload_s"] = time.monotonic() - t0
        records = train()
        moved_mb, offload_s = self._offload((GRADS, OPTIMIZER))
        metrics.update(self._engines(lambda fleet: self._resume(fleet, (api.MEMORY_WEIGHTS,),
                                                                "time/colocate_resume_weights_s")))
        sync_s = publish()
        params_mb, params_s = self._offload((PARAMS,))
        metrics.update(self._engines(self._resume_and_continue))
        metrics.update({"time/colocate_offload_s": offload_s + params_s,
                        "colocate/trainer_offloaded_mb": moved_mb + params_mb})
        for record in records:
            record.update(metrics)
        return records, sync_s

    def booted(self) -> None:
        """Collective, once the fleet runs with the trainer's weights: the parameters go too (the gradients and
        optimizer state went before the fleet started, :meth:`before_boot`)."""
        self._offload((PARAMS,))

    def before_boot(self) -> None:
        """Collective, before the engines start: gradients and optimizer state leave the device (the first
        push still reads the parameters)."""
        self._offload((GRADS, OPTIMIZER))

    @contextlib.contextmanager
    def trainer_resident(self) -> Iterator[None]:
        """Collective: parameters and optimizer state back on the device for the body (a checkpoint save),
        beside the engines' weights, whose KV cache and graphs are released meanwhile."""
        self._engines(lambda fleet: self._release(fleet, KV_AND_GRAPHS))
        self.offloader.reload((PARAMS, OPTIMIZER))
        yield  # a failure ends the run (the fleet stops): no restore on the way out
        self._offload((PARAMS, OPTIMIZER))
        self._engines(self._resume_and_continue)


def colocation_of(driver: "RLDriver") -> Optional[Colocation]:
    """The driver's colocated cycle when ``rollout.fleet.placement.colocate`` is set, else None."""
    fleet = driver.cfg.rollout.fleet
    return Colocation(driver) if fleet is not None and fleet.placement.colocate else None
