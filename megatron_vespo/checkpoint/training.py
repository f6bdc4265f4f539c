"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One checkpoint is a directory ``<checkpoint.dir>/step_<k>`` (k = rollout steps done) holding:

- ``dist/`` — model and optimizer through Megatron-Core distributed checkpointing (torch_dist):
  every tensor is stored under its layout-independent key and global shape, so a checkpoint saved
  in one TP/PP/EP/DP layout loads into another. The plain optimizer's Adam moments follow the
  parameters' keys (without the ChainedOptimizer prefix, so EP=1 and EP>1 layouts agree); the
  distributed optimizer uses Megatron's ``fully_reshardable`` format;
- ``rng/rank_<r>.pt`` — per-rank RNG states (Python, NumPy, torch CPU, CUDA when present and
  Megatron's model-parallel RNG tracker); restored only when the layout is unchanged (another
  layout re-seeds, as a fresh run would);
- ``state.pt`` — rank 0: the LR scheduler and the driver's state (optimizer steps, weight version,
  next rollout step, data position, reward history, ...);
- ``model_config.yaml`` and ``checkpoint.json`` — the model the weights belong to, the layout that
  wrote them, and a manifest of every file with its size (written last: a checkpoint whose manifest
  does not match its files is rejected with the file named).

Atomicity: everything is written into ``<dir>/.tmp-step_<k>-<nonce>``, fsynced, renamed to
``step_<k>``, and only then does ``<dir>/latest`` (a one-line text file naming the step
directory) move, through a temporary file and ``os.replace``. Older step directories beyond
``keep_last`` are deleted after that. A process killed at any moment therefore leaves ``latest``
naming a complete checkpoint; temporary directories left by a crash are ignored and removed by the
next save or load.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.hf_io import CheckpointError
from megatron_vespo.config.schema import ModelConfig, ParallelConfig, RunConfig

FORMAT_VERSION = 1
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-step_"
MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "state.pt"
MODEL_CONFIG_FILE = "model_config.yaml"
DIST_DIR = "dist"
RNG_DIR = "rng"

# Model fields that decide the weights' shapes or the function: a checkpoint must agree on all of them.
MODEL_FIELDS_CHECKED = (
    "architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "kv_channels", "intermediate_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias",
    "qk_layernorm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers",
)
LAYOUT_FIELDS = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor", "context", "sequence_parallel")


# ------------------------------------------------------------------------------------------------
# Directory protocol (no torch.distributed: unit-testable on its own)
# ------------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to stable storage."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    """``checkpoint.json``: ``info`` plus every file under ``directory`` with its size (written last)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            files[str(path.relative_to(directory))] = path.stat().st_size
    manifest = {"format_version": FORMAT_VERSION, **info, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; :class:`CheckpointError` naming the file otherwise."""
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a complete training checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is corrupt") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    for name, size in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST_FILE} but missing; the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_FILE} says {size}; "
                                  "the checkpoint is corrupt")
    return manifest


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (temporary file, fsync, ``os.replace``, fsync dir)."""
    tmp = root / f".{LATEST_FILE}.{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_path(root)


def read_latest(root: Path) -> Optional[Path]:
    """The directory ``root/latest`` names, or None when there is no ``latest``."""
    path = root / LATEST_FILE
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not name.startswith(STEP_PREFIX) or "/" in name:
        raise CheckpointError(f"{path}: names {name!r}, expected '{STEP_PREFIX}<k>'")
    return root / name


def checkpoint_root(cfg: RunConfig) -> Path:
    """``checkpoint.dir``, or ``<run.output_dir>/checkpoints`` when it is empty."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.output_dir) / "checkpoints"


def find_resume_checkpoint(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint a run resumes from per ``checkpoint.resume`` / ``load_dir`` (None: a fresh start)."""
    ck = cfg.checkpoint
    if ck.resume == "never":
        return None
    if ck.load_dir:
        return Path(ck.load_dir)
    root = checkpoint_root(cfg)
    found = read_latest(root)
    if found is None and ck.resume == "must":
        raise CheckpointError(f"{root / LATEST_FILE}: not found and checkpoint.resume is 'must'")
    return found


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-by-name step directories under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            suffix = path.name[len(STEP_PREFIX):]
            if path.is_dir() and path.name.startswith(STEP_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def remove_stale_tmp_dirs(root: Path) -> list[Path]:
    """Delete temporary directories (and ``latest`` temp files) left by a save that never finished."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) or path.name.startswith(f".{LATEST_FILE}."):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def new_tmp_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TMP_PREFIX}{step}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def publish(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """Make ``tmp`` the checkpoint of ``step``: fsync, rename, move ``latest``, prune. Returns the step dir."""
    fsync_tree(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # the same step saved again (e.g. after a resume): the new one replaces it
        old = root / f"{TMP_PREFIX}{step}-replaced-{secrets.token_hex(4)}"
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
        write_latest(root, final.name)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_path(root)
        write_latest(root, final.name)
    for _, path in step_dirs(root)[:-keep_last]:
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch CPU, CUDA (if any) and Megatron's tracker."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency of the trainer
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


def model_config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    return [f"{name}: checkpoint {getattr(saved, name)!r} vs run {getattr(current, name)!r}"
            for name in MODEL_FIELDS_CHECKED if getattr(saved, name) != getattr(current, name)]


def layout_of(parallel: ParallelConfig, world_size: int) -> dict[str, Any]:
    return {"world_size": world_size, **{name: getattr(parallel, name) for name in LAYOUT_FIELDS}}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers down to the model that owns ``sharded_state_dict``."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def _fill_tensors(target: Any, loaded: Any) -> Any:
    """``target`` (a sharded optimizer state of this layout) with every sharded tensor replaced by
    the tensor loaded at the same place; non-tensor entries stay this layout's own (unwrapped)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(target, ShardedBase):
        return loaded
    if isinstance(target, LocalNonpersistentObject):
        return target.unwrap()
    if isinstance(target, dict):
        return {k: _fill_tensors(v, loaded[k] if _holds_sharded(v) else None) for k, v in target.items()}
    if isinstance(target, (list, tuple)):
        return type(target)(_fill_tensors(v, loaded[i] if _holds_sharded(v) else None) for i, v in enumerate(target))
    return target


def _holds_sharded(value: Any) -> bool:
    """Whether ``value`` holds sharded tensors, i.e. the loaded state has a counterpart to descend into."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(value, ShardedBase):
        return True
    if isinstance(value, dict):
        return any(_holds_sharded(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_sharded(v) for v in value)
    return False


def _find_common_steps(value: Any, found: list) -> list:
    """Adam's step counts in a saved optimizer state: Megatron's ``common_step`` entries (plain
    optimizer) and the param groups' ``step`` (distributed optimizer without Apex/TE)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "common_step":
                found.append(v)
            elif k == "param_groups" and isinstance(v, list):
                found.extend(g["step"] for g in v if isinstance(g, dict) and "step" in g)
            else:
                _find_common_steps(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _find_common_steps(v, found)
    return found


def _common_step(common: dict) -> Any:
    """Adam's step count saved with the optimizer (one for all parameters; chained optimizers agree)."""
    steps = _find_common_steps(common.get("optimizer", {}), [])
    if not steps:
        return None
    if any(not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])) for s in steps[1:]):
        raise CheckpointError(f"optimizer step counts differ between the saved optimizers: {steps}")
    return steps[0]


def _set_common_step(value: Any, step: Any) -> None:
    """Put Adam's step count into every per-parameter optimizer state of ``value`` (Megatron's
    ``common_step`` entry, which a freshly initialised optimizer of this layout may lack)."""
    if isinstance(value, dict):
        state = value.get("state")
        if isinstance(state, dict) and any(isinstance(v, dict) and "exp_avg" in v for v in state.values()):
            state["common_step"] = step
        for group in value.get("param_groups", []) if isinstance(value.get("param_groups"), list) else []:
            if isinstance(group, dict) and "step" in group:
                group["step"] = step
        for k, v in value.items():
            if k not in ("state", "param_groups"):
                _set_common_step(v, step)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _set_common_step(v, step)


def _allocate_distributed_optimizer_state(optimizer: Any) -> None:
    """A fresh distributed optimizer over torch Adam (no Apex/TE) has no per-parameter state, and
    its ``sharded_state_dict`` then fails (it reads the step from that state). Allocate it the way
    Megatron does for loading (one step on zero gradients); every value is replaced by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor.

    Megatron's ``DistributedOptimizer.load_state_dict`` (without Apex/TE: torch Adam) puts *one*
    step tensor into the state of every parameter; torch Adam increments each parameter's step in
    place, so the shared tensor would advance once per parameter per update and the bias
    correction would be wrong from the first update after a resume.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state, dict) and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


# ------------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    directory: Path
    step: int
    driver_state: dict[str, Any]
    rng_restored: bool


def on_every_rank(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on every rank; if it raised on any rank, every rank raises a CheckpointError naming
    them (instead of the healthy ranks waiting at the next collective for one that left)."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 -- reported to every rank below
        result, error = None, f"{type(exc).__name__}: {exc}"
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): " + "; ".join(failed))
    return result


class TrainingCheckpointer:
    """Saves and loads training checkpoints. ``save`` and ``load`` are collective over the world.

    ``model`` are the (wrapped) model chunks of this rank, ``optimizer`` Megatron's optimizer,
    ``scheduler`` Megatron's ``OptimizerParamScheduler``. Every rank must see the same checkpoint
    directory (a shared filesystem across nodes).
    """

    def __init__(self, cfg: RunConfig, model: Sequence[torch.nn.Module], optimizer: Any, scheduler: Any):
        self.cfg = cfg
        self.root = checkpoint_root(cfg)
        self.model = list(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    # ---- collectives -------------------------------------------------------------------------
    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result (or its error, raised everywhere) on every rank."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
                box[0] = ("error", exc)
        if self.world_size > 1:
            if self.rank == 0 and box[0][0] == "error":
                message = [("error", CheckpointError(f"rank 0: {type(box[0][1]).__name__}: {box[0][1]}"))]
                dist.broadcast_object_list(message, src=0)
            else:
                dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def _sharded_state_dict(self, is_loading: bool) -> dict[str, Any]:
        """Megatron's layout-independent description of model and optimizer (Megatron-LM's keys)."""
        state: dict[str, Any] = {}
        if len(self.model) == 1:
            state["model"] = _unwrap(self.model[0]).sharded_state_dict()
        else:
            from megatron.core import parallel_state

            for vp_stage, chunk in enumerate(self.model):
                parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
                state[f"model{vp_stage}"] = _unwrap(chunk).sharded_state_dict()
            parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        # Keys without the ChainedOptimizer's "chained_<i>." prefix: whether the dense and expert
        # parameters get separate optimizers depends on the layout (EP > 1), the keys must not.
        state["optimizer"] = self.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable",
                                                    "chained_optim_avoid_prefix": True})
        return state

    # ---- save --------------------------------------------------------------------------------
    def save(self, step: int, driver_state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (rollout steps done); ``driver_state`` is taken from rank 0."""
        from megatron.core import dist_checkpointing

        from megatron_vespo.checkpoint.hf_io import save_model_config

        def prepare() -> Path:
            remove_stale_tmp_dirs(self.root)
            tmp = new_tmp_dir(self.root, step)
            (tmp / DIST_DIR).mkdir()
            (tmp / RNG_DIR).mkdir()
            return tmp

        tmp = self._on_rank0(prepare)
        # Per-rank write failures inside torch.distributed.checkpoint reach every rank already; the
        # RNG file is this rank's own write, so its failure is shared explicitly (this also replaces
        # the barrier before rank 0 publishes). The temporary directory is removed by the next save.
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), str(tmp / DIST_DIR))
        on_every_rank(lambda: torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank_{self.rank:05d}.pt"),
                      f"writing the RNG states to {tmp / RNG_DIR}")

        def finish() -> Path:
            torch.save({"scheduler": self.scheduler.state_dict(), "driver": driver_state}, tmp / STATE_FILE)
            save_model_config(self.cfg.model, tmp)
            write_manifest(tmp, {"step": step, "layout": layout_of(self.cfg.parallel, self.world_size),
                                 "params_dtype": self.cfg.precision.params_dtype,
                                 "distributed_optimizer": self.cfg.optimizer.distributed})
            return publish(tmp, self.root, step, self.cfg.checkpoint.keep_last)

        return self._on_rank0(finish)

    # ---- load --------------------------------------------------------------------------------
    def resume_directory(self) -> Optional[Path]:
        """Which checkpoint to resume from, per ``checkpoint.resume`` / ``checkpoint.load_dir`` (rank 0 decides)."""
        def decide() -> Optional[Path]:
            remove_stale_tmp_dirs(self.root)
            return find_resume_checkpoint(self.cfg)

        return self._on_rank0(decide)

    def validate(self, directory: Path) -> dict[str, Any]:
        """The manifest of ``directory`` after checking completeness, the model and the dtype."""
        from megatron_vespo.config.loader import load_model_config

        manifest = read_manifest(directory)
        saved = load_model_config(directory / MODEL_CONFIG_FILE)
        diffs = model_config_differences(saved, self.cfg.model)
        if diffs:
            raise CheckpointError(f"{directory / MODEL_CONFIG_FILE}: the checkpoint was written for a different "
                                  "model: " + "; ".join(diffs))
        if manifest.get("params_dtype") != self.cfg.precision.params_dtype:
            raise CheckpointError(f"{directory / MANIFEST_FILE}: saved with precision.params_dtype="
                                  f"{manifest.get('params_dtype')!r}, the run uses {self.cfg.precision.params_dtype!r}")
        if manifest.get("distributed_optimizer") != self.cfg.optimizer.distributed:
            raise CheckpointError(f"{directory / MANIFEST_FILE}: saved with optimizer.distributed="
                                  f"{manifest.get('distributed_optimizer')}, the run uses {self.cfg.optimizer.distributed}")
        return manifest

    def load(self, directory: Path) -> LoadedCheckpoint:
        """Load model, optimizer, scheduler (and RNG states if the layout is unchanged) from ``directory``."""
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        manifest = self._on_rank0(lambda: self.validate(directory))
        _allocate_distributed_optimizer_state(self.optimizer)
        target = self._sharded_state_dict(is_loading=True)
        try:
            loaded = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), str(directory / DIST_DIR))
            saved_step = _common_step(dist_checkpointing.load_common_state_dict(str(directory / DIST_DIR)))
        except Exception as exc:
            raise CheckpointError(f"{directory / DIST_DIR}: cannot load model/optimizer: "
                                  f"{type(exc).__name__}: {exc}") from exc
        for key in [k for k in target if k.startswith("model")]:
            chunk = self.model[0] if key == "model" else self.model[int(key[len("model"):])]
            _unwrap(chunk).load_state_dict(loaded[key])
        # The optimizer's tensors come from the checkpoint, its structure (one optimizer or a chain
        # of dense + expert ones, param groups) from this layout, its step count from the checkpoint.
        optimizer_state = _fill_tensors(target["optimizer"], loaded["optimizer"])
        if saved_step is not None:
            _set_common_step(optimizer_state, saved_step)
        self.optimizer.load_state_dict(optimizer_state)
        _unshare_adam_steps(self.optimizer)

        state = torch.load(directory / STATE_FILE, weights_only=False)
        # Megatron's load_state_dict *advances* num_steps by the saved count (and sets lr / weight
        # decay in the param groups): start it from 0, not from the fresh scheduler's position.
        self.scheduler.num_steps = 0
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        except AssertionError as exc:
            raise CheckpointError(f"{directory / STATE_FILE}: LR schedule differs from the run's optimizer "
                                  f"settings ({exc})") from None
        same_layout = manifest["layout"] == layout_of(self.cfg.parallel, self.world_size)
        if same_layout:
            rng_file = directory / RNG_DIR / f"rank_{self.rank:05d}.pt"
            on_every_rank(lambda: restore_rng_state(torch.load(rng_file, weights_only=False)),
                          f"restoring the RNG states from {directory / RNG_DIR}")
        elif self.rank == 0:
            print(f"[checkpoint] {directory} was written in layout {manifest['layout']}; "
                  "RNG states are not restored (re-seeded)", flush=True)
        return LoadedCheckpoint(directory=directory, step=int(manifest["step"]), driver_state=state["driver"],
                                rng_restored=same_layout)
