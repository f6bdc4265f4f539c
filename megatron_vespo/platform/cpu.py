"""Make Megatron-Core run on a machine without CUDA (gloo backend, CPU tensors).

Megatron-Core is written for GPUs: a handful of call sites assume CUDA exists even when every
tensor lives on the CPU. This module patches exactly those call sites and nothing else. Each patch
is a small function below with a docstring that says what breaks and why the replacement is
equivalent on the CPU. Everything that can be solved by configuration instead is solved there
(see :mod:`megatron_vespo.models.provider`): ``use_cpu_initialization``, no fused kernels, no
grouped GEMM, sequence parallelism whenever MoE meets TP, no CUDA graphs.

Rules:
- the patches are applied only when CUDA is absent (:func:`should_patch`) and never on a CUDA
  machine, where Megatron-Core works as shipped;
- :func:`apply_cpu_patches` is idempotent (a second call is a no-op) and returns the names of the
  patches in effect; it is called from one place, :func:`megatron_vespo.platform.apply`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Optional

import torch

_APPLIED: list[str] = []


def should_patch(cuda_available: Optional[bool] = None) -> bool:
    """True when the CPU patches are needed: CUDA is not available in this process."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return not cuda_available


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins
# --------------------------------------------------------------------------------------------


class _CpuEvent:
    """A CUDA event stand-in: CPU work is synchronous, so every event is already complete."""

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_CpuEvent") -> float:
        return 0.0


class _CpuStream:
    """A CUDA stream stand-in: CPU kernels run in program order, so streams need no ordering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[_CpuEvent] = None) -> _CpuEvent:
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:  # one logical stream on the CPU
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0


_THE_CPU_STREAM = _CpuStream()


def _defer_torch_compile_during_megatron_import() -> None:
    """Megatron-Core decorates its fused kernels with ``torch.compile`` at import time
    (``megatron.core.jit.jit_fuser``), which imports TorchDynamo and Inductor: ~5-8 s of CPU per
    process, in every trainer rank and tool, although nothing on the CPU path calls those kernels
    (the provider turns the fusions off). While ``megatron.core`` is imported, ``torch.compile`` is
    replaced by a decorator that calls the real ``torch.compile`` on the function's first call, which
    is when ``torch.compile`` itself compiles; the result is the same, only the import is deferred.
    Must run before anything imports Megatron-Core (first in :data:`_PATCHES`); a no-op if it is
    imported already."""
    import sys

    if "megatron.core" in sys.modules:
        return
    real_compile = torch.compile

    def compile_on_first_call(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # decorator with arguments: @torch.compile(...)
            return lambda fn: compile_on_first_call(fn, **kwargs)
        compiled: list[Any] = []

        @functools.wraps(model)
        def call(*args: Any, **call_kwargs: Any) -> Any:
            if not compiled:
                compiled.append(torch.compile(model, **kwargs))  # the real one again by then
            return compiled[0](*args, **call_kwargs)

        return call

    torch.compile = compile_on_first_call
    try:
        importlib.import_module("megatron.core")
    finally:
        torch.compile = real_compile


def _patch_cuda_streams_and_events() -> None:
    """``torch.cuda.Stream/Event/current_stream/stream`` raise without CUDA.

    The MoE all-to-all dispatcher creates a side stream for its device-to-host copies in its
    constructor and records an event on it; DDP and the optimizer query the current stream. On the
    CPU all work is synchronous, so a single no-op stream and always-complete events are exact.
    """
    torch.cuda.Stream = _CpuStream  # type: ignore[misc,assignment]
    torch.cuda.Event = _CpuEvent  # type: ignore[misc,assignment]
    torch.cuda.current_stream = lambda device=None: _THE_CPU_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _THE_CPU_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


def _patch_cuda_device_is_cpu() -> None:
    """``torch.cuda.current_device()`` and ``Tensor.cuda()`` raise without CUDA.

    Megatron passes ``torch.cuda.current_device()`` as ``device=`` when it allocates buffers
    (router, all-to-all outputs, DDP grad buffers, optimizer scalars) and calls ``.cuda()`` to
    move tensors "to the accelerator" (tied embeddings across pipeline stages, distributed
    optimizer checkpoint gathers). Without CUDA the CPU is the accelerator: the device is the CPU
    and ``.cuda()`` leaves a CPU tensor where it is.
    """
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]

    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
        return self.to("cpu", non_blocking=non_blocking)

    torch.Tensor.cuda = cuda  # type: ignore[method-assign]


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class _TorchWithCpuDevice:
    """The ``torch`` module as seen by one Megatron module: ``device="cuda"`` means the CPU.

    Only calls that receive a ``device=`` keyword are touched; every other attribute is torch's.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr) or isinstance(attr, type) or name.startswith("_"):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return call


# Megatron modules that allocate with a literal device="cuda" on the paths we use, and where:
# - transformer.utils: the default causal attention mask (every forward of the local attention);
# - pipeline_parallel.schedules: the token counter of every forward-backward schedule;
# - optimizer.optimizer / optimizer.grad_scaler: found-inf flags and loss-scale scalars;
# - optimizer.clip_grads: the gradient-norm accumulator and all-reduce buffer;
# - transformer.moe.moe_utils: the MoE auxiliary-loss tracker;
# - distributed.param_and_grad_buffer: a warm-up tensor of the bucketed grad reduce;
# - rerun_state_machine: the result-validation flags of the training loop;
# - utils: parameter-hash and L2-norm helpers used by checks across ranks.
_MODULES_WITH_CUDA_LITERALS = [
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
]


def _patch_cuda_device_literals() -> None:
    """Megatron allocates small tensors with a hard-coded ``device="cuda"``.

    Those calls cannot be redirected by ``torch.cuda.current_device``. Each module listed in
    ``_MODULES_WITH_CUDA_LITERALS`` gets its own view of ``torch`` in which a CUDA ``device=``
    keyword becomes the CPU; torch itself and every other module are untouched.
    """
    for module_name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(module_name)
        if isinstance(module.torch, _TorchWithCpuDevice):
            continue
        module.torch = _TorchWithCpuDevice(module.torch)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_report_cuda_type_names():
    """Inside the block, ``tensor.type()`` names CPU float tensors as their CUDA counterparts."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(func: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(func, "_megatron_vespo_cpu", False):
        return func

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cpu_tensors_report_cuda_type_names():
            return func(*args, **kwargs)

    wrapped._megatron_vespo_cpu = True  # type: ignore[attr-defined]
    return wrapped


def _patch_optimizer_tensor_type_checks() -> None:
    """The optimizers and the grad clipper check tensors with ``tensor.type()``.

    They compare it with ``'torch.cuda.FloatTensor'``, ``'torch.cuda.HalfTensor'`` or
    ``'torch.cuda.BFloat16Tensor'`` and raise (``TypeError``/``AssertionError``) for anything
    else, so CPU parameters and grads are rejected: the mixed-precision optimizer's and the
    distributed optimizer's parameter sorting, and ``clip_grad_by_total_norm_fp32``. While those
    functions run, CPU float tensors report the CUDA type names; outside them ``Tensor.type`` is
    torch's own.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    methods = [
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"),
    ]
    for owner, name in methods:
        original = owner.__dict__[name]
        if isinstance(original, staticmethod):
            setattr(owner, name, staticmethod(_with_cuda_type_names(original.__func__)))
        elif isinstance(original, classmethod):
            setattr(owner, name, classmethod(_with_cuda_type_names(original.__func__)))
        else:
            setattr(owner, name, _with_cuda_type_names(original))
    # A module-level function, also bound by name in the optimizer module that calls it.
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip


def _patch_torch_norm_sequence_parallel() -> None:
    """Megatron's torch-norm wrapper asserts ``not config.sequence_parallel``.

    Without Apex or TE, RMSNorm/LayerNorm come from ``WrappedTorchNorm``, which refuses sequence
    parallelism only because torch's norm does not tag its weight. Under sequence parallelism each
    TP rank sees a slice of the sequence, so the norm weight's gradient is a partial sum that
    ``finalize_model_grads`` must all-reduce over TP; it does so for parameters tagged
    ``sequence_parallel=True`` (what the TE and Apex norms do). The replacement builds the same
    torch norm and tags its parameters. MoE with TP > 1 requires sequence parallelism, so this is
    needed for every TP layout of an MoE model.
    """
    import copy

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__
    if getattr(original, "_megatron_vespo_cpu", False):
        return

    @functools.wraps(original)
    def new(cls: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> torch.nn.Module:
        sequence_parallel = bool(config.sequence_parallel)
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original(cls, config, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    new._megatron_vespo_cpu = True  # type: ignore[attr-defined]
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


# --------------------------------------------------------------------------------------------
# RNG tracker
# --------------------------------------------------------------------------------------------


def _patch_rng_tracker() -> None:
    """Megatron's ``CudaRNGStatesTracker`` stores and swaps CUDA generator states.

    ``model_parallel_cuda_manual_seed`` (and every ``get_cuda_rng_tracker().fork()`` around
    dropout and GPU-side initialisation) calls ``torch.cuda.get_rng_state``, which raises without
    CUDA. The replacement tracks the same named states (data-parallel, tensor-parallel, expert
    seeds) on the CPU default generator, where CPU tensors draw their random numbers.
    """
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker
    if getattr(base, "_megatron_vespo_cpu", False):
        return

    class CpuRNGStatesTracker(base):  # type: ignore[valid-type,misc]
        """Named RNG states on the CPU default generator (same API as Megatron's tracker)."""

        _megatron_vespo_cpu = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["use_cudagraphable_rng"] = False  # CUDA graphs do not exist on the CPU
            super().__init__(*args, **kwargs)

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):  # type: ignore[override]
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recomputation saves/restores the "CUDA" state through these two helpers.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # A tracker created before the patch (e.g. by an import-time call) would still be a CUDA one.
    mrandom.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------


def _patch_moe_router_gemm() -> None:
    """``moe_utils.RouterGatingLinearFunction`` tests ``te_general_gemm is not None``.

    The name is only bound when Transformer Engine imports, so without TE the router raises
    ``NameError``. Binding it to ``None`` selects the plain ``torch.matmul`` branch the code
    already has.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_all_to_all_split_sizes() -> None:
    """gloo's ``all_to_all_single`` accepts only Python ``int`` split sizes.

    The MoE all-to-all dispatcher passes numpy arrays (or tensors) of per-rank token counts.
    NCCL accepts them; gloo raises a type error. Converting them to lists of ints carries the same
    numbers.
    """
    from megatron.core.tensor_parallel import mappings

    original = mappings._AllToAll.forward
    if getattr(original, "_megatron_vespo_cpu", False):
        return

    def _as_ints(sizes: Any) -> Optional[list[int]]:
        if sizes is None:
            return None
        if isinstance(sizes, torch.Tensor):
            return [int(s) for s in sizes.tolist()]
        return [int(s) for s in sizes]

    @functools.wraps(original)
    def forward(ctx: Any, group: Any, input: torch.Tensor, output_split_sizes: Any, input_split_sizes: Any,
                *rest: Any):  # 0.19 adds use_nccl_stream
        return original(ctx, group, input, _as_ints(output_split_sizes), _as_ints(input_split_sizes), *rest)

    forward._megatron_vespo_cpu = True  # type: ignore[attr-defined]
    mappings._AllToAll.forward = staticmethod(forward)


# --------------------------------------------------------------------------------------------
# Distributed checkpointing
# --------------------------------------------------------------------------------------------


def _patch_distributed_optimizer_reshardable_load() -> None:
    """Loading the distributed optimizer's ``fully_reshardable`` checkpoint format fails over torch Adam.

    Without Apex or Transformer Engine (always the case on the CPU) the distributed optimizer wraps
    torch's Adam, whose per-parameter state holds a ``step`` tensor. ``load_state_dict`` first
    sets that ``step`` from the saved param groups, then
    ``_set_main_param_and_optimizer_states`` copies every key of the live state from the loaded
    tensors, which carry no ``step`` (the format stores it in the param groups) -> ``KeyError``.
    Skipping keys that the loaded tensors lack keeps the ``step`` that was just set; every other
    key (``param``, ``exp_avg``, ``exp_avg_sq``) is copied as before. Needed for training
    checkpoints of runs with ``optimizer.distributed`` (:mod:`megatron_vespo.checkpoint.training`).
    """
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_vespo_cpu", False):
        return

    @functools.wraps(original)
    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            tensors = {**tensors, "step": state["step"]}  # copy onto itself: unchanged
        original(self, model_param, tensors)

    set_states._megatron_vespo_cpu = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states


# Every entry but the first is needed: with any one removed, at least one of the layouts TP=2+SP, EP=2,
# PP=2 and DP=2 with the distributed optimizer fails (checked by running tests/multiproc/worker_model.py).
# The first only saves import time, and must come before anything imports Megatron-Core.
_PATCHES: list[tuple[str, Callable[[], None]]] = [
    ("torch.compile deferred to first call while Megatron-Core imports", _defer_torch_compile_during_megatron_import),
    ("torch.cuda streams/events -> synchronous no-ops", _patch_cuda_streams_and_events),
    ("torch.cuda.current_device / Tensor.cuda -> cpu", _patch_cuda_device_is_cpu),
    ("hard-coded device='cuda' allocations -> cpu", _patch_cuda_device_literals),
    ("optimizer param.type() checks accept CPU tensors", _patch_optimizer_tensor_type_checks),
    ("torch norm: sequence parallel via tagged weights", _patch_torch_norm_sequence_parallel),
    ("RNG tracker on the CPU generator", _patch_rng_tracker),
    ("MoE router: te_general_gemm = None without TE", _patch_moe_router_gemm),
    ("gloo all_to_all_single: int split sizes", _patch_all_to_all_split_sizes),
    ("distributed optimizer: reshardable checkpoint load over torch Adam",
     _patch_distributed_optimizer_reshardable_load),
]


def apply_cpu_patches() -> list[str]:
    """Apply every patch once (idempotent). Returns the names of the patches in effect."""
    if _APPLIED:
        return list(_APPLIED)
    for name, patch in _PATCHES:
        patch()
        _APPLIED.append(name)
    return list(_APPLIED)


def applied_patches() -> list[str]:
    """Names of the patches applied in this process (empty on a CUDA machine)."""
    return list(_APPLIED)
