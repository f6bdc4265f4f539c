"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One checkpoint is a directory ``<checkpoint.dir>/step_<k>`` (k = rollout steps done) holding:

- ``dist/`` — model and optimizer through Megatron-Core distributed checkpointing (torch_dist):
  every tensor is stored under its layout-independent key and global shape, so a checkpoint saved
  in one TP/PP/EP/DP layout loads into another. The plain optimizer's Adam moments follow the
  parameters' keys (without the ChainedOptimizer prefix, so EP=1 and EP>1 layouts agree); the
  distributed optimizer uses Megatron's ``fully_reshardable`` format;
- ``rng/rank_<r>.pt`` — per-rank RNG states (Python, NumPy, torch CPU, CUDA when present and
  Megatron's model-parallel RNG tracker) as plain containers and uint8 tensors, read with
  ``torch.load(weights_only=True)``; restored only when the layout is unchanged (another layout
  re-seeds, as a fresh run would);
- ``state.json`` (+ ``state_tensors.safetensors`` when it holds tensors or arrays) — rank 0: the LR
  scheduler and the driver's state (optimizer steps, weight version, next rollout step, data
  position, reward history, the asynchronous loop's buffered groups, ...), written by
  :mod:`~megatron_vespo.checkpoint.state_codec`: JSON and safetensors, never a pickle;
- ``model_config.yaml`` and ``checkpoint.json`` — the model the weights belong to, the layout that
  wrote them, and the manifest: every file with its size and SHA-256 (written last).

Nothing in a checkpoint is unpickled with code execution: the driver state is JSON, the RNG files
and Megatron's ``common.pt`` are read with ``weights_only=True``, and before torch reads the
pickled ``dist/.metadata`` (and the small objects stored inside the ``.distcp`` files, which torch
itself unpickles without restriction) they are read once with an allow-list of the classes a
torch_dist checkpoint consists of; anything else is refused, naming the file.

Integrity: the SHA-256 of every file is computed when it is saved and checked before it is
loaded. The work is spread over the ranks (rank r hashes files i with i % world == r; only the hex
digests travel), and the ranks agree on the verdict (all-gather of the mismatches), so every rank
takes the same decision.

Atomicity: everything is written into ``<dir>/.tmp-step_<k>-<nonce>``, fsynced, renamed to
``step_<k>``, and only then does ``<dir>/latest`` (a one-line text file naming the step
directory) move, through a temporary file and ``os.replace``. Older step directories beyond
``keep_last`` are deleted after that. Temporary directories left by a crash are ignored and
removed by the next save or load.

Choosing the checkpoint to resume (``checkpoint.resume: auto``, no ``load_dir``): the newest step
directory that verifies (manifest, sizes, hashes). ``latest`` is a hint: when it is missing or names
another directory the newest complete one is used, with a message. A newest directory that does not
verify is reported (one line: the file, expected vs found size or hash) and, once an older one has
verified, renamed aside to ``step_<k>.corrupt-<UTC time>`` (kept as evidence, and so that the run,
re-doing step k, does not overwrite it; such names are no step directories: never loaded, never
pruned). When step directories exist and none verifies, the run fails naming them, rather than
starting over (``checkpoint.resume: never`` starts a new run on purpose). A checkpoint that verifies
but holds something this version refuses to read (a pickle referring to other code, another model,
another format) is an error, not a reason to fall back: it names the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.hf_io import CheckpointError
from megatron_vespo.checkpoint.state_codec import encode_state, read_state
from megatron_vespo.config.schema import ModelConfig, ParallelConfig, RunConfig

FORMAT_VERSION = 2  # 1: sizes only, pickled state.pt (no longer read: unpickling it could run code)
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-step_"
CORRUPT_INFIX = ".corrupt-"
MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "state.json"
STATE_TENSORS_FILE = "state_tensors.safetensors"
MODEL_CONFIG_FILE = "model_config.yaml"
DIST_DIR = "dist"
RNG_DIR = "rng"
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's (pickled) index of the .distcp files
# Files every complete checkpoint lists (a manifest without them is not one of ours).
REQUIRED_FILES = (STATE_FILE, MODEL_CONFIG_FILE, f"{DIST_DIR}/{DCP_METADATA_FILE}")
_HASH_CHUNK = 8 << 20

# Model fields that decide the weights' shapes or the function: a checkpoint must agree on all of them.
MODEL_FIELDS_CHECKED = (
    "architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "kv_channels", "intermediate_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias",
    "qk_layernorm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers",
)
LAYOUT_FIELDS = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor", "context", "sequence_parallel")


class CheckpointCorruptError(CheckpointError):
    """The files of a checkpoint are not the ones that were saved: manifest missing or unreadable, a
    file missing, of another size or with another SHA-256. The resume falls back to an older one."""


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


def checkpoint_files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def file_entry(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file (the size is what was hashed)."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return {"size": size, "sha256": digest.hexdigest()}


def compare_file(directory: Path, name: str, expected: dict[str, Any]) -> Optional[str]:
    """None when ``directory/name`` has the size and SHA-256 the manifest lists; else one line naming
    the file with what was expected and what was found."""
    path = directory / name
    try:
        found = file_entry(path)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    if found["size"] != expected["size"]:
        return f"{path}: {found['size']} bytes, {MANIFEST_FILE} says {expected['size']}"
    if found["sha256"] != expected["sha256"]:
        return f"{path}: sha256 {found['sha256']}, {MANIFEST_FILE} says {expected['sha256']}"
    return None


def write_manifest(directory: Path, info: dict[str, Any], files: Optional[dict[str, dict[str, Any]]] = None) -> None:
    """``checkpoint.json``: ``info`` plus every file under ``directory`` with its size and SHA-256
    (written last). ``files`` are those entries when already computed (the checkpointer hashes on
    every rank); without it they are computed here."""
    if files is None:
        files = {name: file_entry(directory / name) for name in checkpoint_files(directory)}
    manifest = {"format_version": FORMAT_VERSION, **info, "files": dict(sorted(files.items()))}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: present, readable, this format, every file it lists
    present with its size (cheap: the content hashes are checked by :func:`verify_checkpoint` or the
    checkpointer). :class:`CheckpointCorruptError` (or CheckpointError) naming the file otherwise."""
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not path.is_file():
        raise CheckpointCorruptError(f"{path}: missing; {directory} is not a complete training checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorruptError(f"{path}: no 'files' table; the checkpoint is corrupt")
    version = manifest.get("format_version")
    if version == 1:
        raise CheckpointError(f"{path}: format_version 1, written by an older version whose driver state is a "
                              f"pickle ({directory / 'state.pt'}); it is not loaded, since unpickling can run code. "
                              "Resume it with the version that wrote it, or start a new run (checkpoint.resume=never)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, this version reads {FORMAT_VERSION}")
    for name, entry in manifest["files"].items():
        file = directory / name
        if not _valid_entry(entry) or ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointCorruptError(f"{path}: malformed entry for {name!r}; the checkpoint is corrupt")
        if not file.is_file():
            raise CheckpointCorruptError(f"{file}: listed in {MANIFEST_FILE} but missing; the checkpoint is incomplete")
        if file.stat().st_size != entry["size"]:
            raise CheckpointCorruptError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_FILE} says {entry['size']}; "
                                         "the checkpoint is corrupt")
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """:func:`read_manifest` plus every file's SHA-256, in this process (tools and tests; the
    checkpointer spreads the hashing over its ranks)."""
    manifest = read_manifest(directory)
    for name in sorted(manifest["files"]):
        problem = compare_file(directory, name, manifest["files"][name])
        if problem:
            raise CheckpointCorruptError(f"{problem}; the checkpoint is corrupt")
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


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-by-name step directories under ``root``, oldest first (``step_<k>.corrupt-*`` are not)."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            suffix = path.name[len(STEP_PREFIX):]
            if path.is_dir() and path.name.startswith(STEP_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def latest_note(root: Path, chosen: Path) -> Optional[str]:
    """A message when ``root/latest`` does not name ``chosen`` (missing, unreadable or elsewhere)."""
    try:
        latest = read_latest(root)
    except (CheckpointError, OSError, UnicodeDecodeError) as exc:
        return f"{root / LATEST_FILE} is unreadable ({exc}); using the newest complete step directory {chosen.name}"
    if latest is None:
        return f"{root / LATEST_FILE} is missing; using the newest complete step directory {chosen.name}"
    if latest != chosen:
        return (f"{root / LATEST_FILE} names {latest.name}, but the newest complete step directory is "
                f"{chosen.name}; using {chosen.name}")
    return None


def no_complete_checkpoint(root: Path, rejected: Sequence[tuple[Path, str]]) -> CheckpointError:
    """The error of a checkpoint directory that has step directories but no complete one."""
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in rejected)
    return CheckpointError(f"{root}: no complete training checkpoint to resume from ({reasons}). Nothing was "
                           "started or overwritten; repair or move these directories, or set "
                           "checkpoint.resume=never to start a new run (it rewrites metrics.jsonl)")


def find_resume_checkpoint(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint a run resumes from per ``checkpoint.resume`` / ``load_dir`` (None: a fresh start),
    by the cheap checks (manifest and sizes; the checkpointer also checks every file's hash and may
    fall back further). CheckpointError when checkpoints exist but none is complete, or none exists
    and ``checkpoint.resume`` is 'must'. Reads only: callable on any rank, before anything starts."""
    ck = cfg.checkpoint
    if ck.resume == "never":
        return None
    if ck.load_dir:
        return Path(ck.load_dir)
    root = checkpoint_root(cfg)
    rejected = []
    for _, path in reversed(step_dirs(root)):
        try:
            read_manifest(path)
            return path
        except CheckpointCorruptError as exc:
            rejected.append((path, str(exc)))
    if rejected:
        raise no_complete_checkpoint(root, rejected)
    if (root / LATEST_FILE).is_file():
        raise CheckpointError(f"{root / LATEST_FILE}: names {(root / LATEST_FILE).read_text().strip()!r}, but {root} "
                              "holds no step directory; set checkpoint.resume=never to start a new run")
    if ck.resume == "must":
        raise CheckpointError(f"{root}: no training checkpoint, and checkpoint.resume is 'must'")
    return None


def move_aside(path: Path) -> Path:
    """Rename a rejected step directory to ``step_<k>.corrupt-<UTC time>`` (kept, never loaded or pruned)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}")
    if target.exists():
        target = path.with_name(f"{target.name}-{secrets.token_hex(2)}")
    os.replace(path, target)
    _fsync_path(path.parent)
    return target


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
    if final.exists():  # the same step saved again (e.g. resumed from an older load_dir): the new one replaces it
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
# Reading pickles without running code
# ------------------------------------------------------------------------------------------------


def load_plain(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: plain containers and tensors only. A file holding
    anything else (or no torch file at all) is a one-line CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: not loaded, it is not plain data ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """The informative part of an exception as one line (torch's weights_only message is many lines
    of advice on how to load the file anyway)."""
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if found:
        return f"it refers to {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# What torch.distributed.checkpoint's .metadata pickle consists of (torch 2.6-2.14): its dataclasses and
# enums, torch.Size, dtypes and the layout helper. Anything else would be code, not an index.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _Refused(pickle.UnpicklingError):
    """A pickle refers to something outside the allow-list."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"it refers to {module}.{name}, which a torch_dist index never does (it would run code)")


def check_dist_pickles(dist_dir: Path) -> None:
    """Refuse a Megatron/torch_dist directory whose pickles would run code when torch reads them.

    torch reads ``.metadata`` with a plain ``pickle.load`` and the non-tensor items inside the
    ``.distcp`` files with an unrestricted ``torch.load``; Megatron reads ``*.pt`` with torch's
    default. All of them are read here first, with an allow-list / ``weights_only=True``: what
    passes is plain data, so the unrestricted reads that follow run nothing but the allowed
    constructors. One-line CheckpointError naming the file otherwise.
    """
    meta_path = dist_dir / DCP_METADATA_FILE
    try:
        with open(meta_path, "rb") as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 -- any failure: not an index torch could use either
        raise CheckpointError(f"{meta_path}: not loaded, {exc if isinstance(exc, _Refused) else _first_line(exc)}") \
            from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    items = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: not a torch_dist index (no state_dict_metadata / storage_data)")
    for index, info in storage.items():
        if not isinstance(items.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue
        path = dist_dir / str(info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: item {index.fqn!r} is stored with transforms "
                                  f"{list(info.transform_descriptors)}, which this version does not read")
        with open(path, "rb") as f:
            f.seek(int(info.offset))
            blob = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: item {index.fqn!r} (bytes {info.offset}..{info.offset + info.length}) "
                                  f"is not plain data, not loaded ({_first_line(exc)})") from None
    for pt in sorted(dist_dir.rglob("*.pt")):
        load_plain(pt)


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as plain containers and tensors (``torch.load(weights_only=True)``
    reads them back): Python, NumPy (its key array as a list), torch CPU, CUDA (if any) and
    Megatron's tracker."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
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
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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


@dataclass
class VerifiedCheckpoint:
    """A checkpoint whose files match its manifest, with what every rank reads besides Megatron's files."""

    directory: Path
    manifest: dict[str, Any]
    state: dict[str, Any]  # {"scheduler": ..., "driver": ...}
    rng: Optional[dict[str, Any]]  # this rank's RNG states; None when the layout differs


def _gather_errors(fn: Callable[[], Any]) -> tuple[Any, list[Optional[str]], Optional[BaseException]]:
    """``fn()`` on this rank; its result, every rank's error text (None: fine) and this rank's exception."""
    try:
        result, error, exc = fn(), None, None
    except Exception as caught:  # noqa: BLE001 -- reported to every rank by the caller
        result, error, exc = None, str(caught) if isinstance(caught, CheckpointError) \
            else f"{type(caught).__name__}: {caught}", caught
    errors: list[Optional[str]] = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return result, errors, exc


def on_every_rank(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on every rank; if it raised on any rank, every rank raises a CheckpointError naming
    them (instead of the healthy ranks waiting at the next collective for one that left)."""
    result, errors, _ = _gather_errors(fn)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): " + "; ".join(failed))
    return result


def _same_on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank when it reads the same files everywhere: the first failure (same text on
    every rank, since every rank gets the list) is raised everywhere as a CheckpointError."""
    result, errors, exc = _gather_errors(fn)
    failed = [e for e in errors if e is not None]
    if failed:
        if exc is not None and isinstance(exc, CheckpointError) and str(exc) == failed[0]:
            raise exc
        raise CheckpointError(failed[0])
    return result


class TrainingCheckpointer:
    """Saves and loads training checkpoints. ``save``, ``verify``, ``resume_directory`` and ``load``
    are collective over the world.

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
        self._verified: Optional[VerifiedCheckpoint] = None  # the one resume_directory chose

    # ---- collectives -------------------------------------------------------------------------
    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result (or its error, raised everywhere) on every rank. A
        CheckpointError keeps its class and message on every rank (so that every rank takes the same
        decision, e.g. to fall back to an older checkpoint); other errors become CheckpointErrors."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
                box[0] = ("error", exc)
        if self.world_size > 1:
            if self.rank == 0 and box[0][0] == "error":
                exc = box[0][1]
                kind = ("corrupt" if isinstance(exc, CheckpointCorruptError)
                        else "checkpoint" if isinstance(exc, CheckpointError) else "other")
                text = str(exc) if kind != "other" else f"rank 0: {type(exc).__name__}: {exc}"
                dist.broadcast_object_list([("error", kind, text)], src=0)
            else:
                dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            if self.rank == 0:
                raise box[0][1]
            _, kind, text = box[0]
            raise (CheckpointCorruptError if kind == "corrupt" else CheckpointError)(text)
        return box[0][1]

    def _all_gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def _hash_files(self, directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
        """Size and SHA-256 of ``names`` (the same sorted list on every rank): rank r hashes names i with
        i % world == r; the small entries are gathered on every rank."""
        mine = names[self.rank::self.world_size]
        local = on_every_rank(lambda: {n: file_entry(directory / n) for n in mine}, f"hashing the files of {directory}")
        files: dict[str, dict[str, Any]] = {}
        for part in self._all_gather(local):
            files.update(part)
        return files

    def _check_hashes(self, directory: Path, files: dict[str, dict[str, Any]]) -> None:
        """Every file against its manifest entry, spread over the ranks like :meth:`_hash_files`; the
        mismatches of all ranks are gathered, so every rank raises the same CheckpointCorruptError."""
        names = sorted(files)
        mine = names[self.rank::self.world_size]
        local = [p for p in (compare_file(directory, n, files[n]) for n in mine) if p is not None]
        problems = sorted(p for part in self._all_gather(local) for p in part)
        if problems:
            more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
            raise CheckpointCorruptError(f"{problems[0]}{more}; the checkpoint is corrupt")

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

    def _rng_file(self, directory: Path) -> Path:
        return directory / RNG_DIR / f"rank_{self.rank:05d}.pt"

    # ---- save --------------------------------------------------------------------------------
    def save(self, step: int, driver_state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (rollout steps done); ``driver_state`` is taken from rank 0.

        The driver state must be plain data, tensors, arrays and this project's dataclasses
        (:mod:`~megatron_vespo.checkpoint.state_codec`); anything else fails here, before any file
        is written, with its place in the state named."""
        from megatron.core import dist_checkpointing

        from megatron_vespo.checkpoint.hf_io import save_model_config

        encoded: dict[str, Any] = {}  # rank 0: the state document, kept out of the broadcast

        def prepare() -> Path:
            remove_stale_tmp_dirs(self.root)
            encoded["doc"], encoded["tensors"] = encode_state(
                {"scheduler": self.scheduler.state_dict(), "driver": driver_state}, "checkpoint state")
            tmp = new_tmp_dir(self.root, step)
            (tmp / DIST_DIR).mkdir()
            (tmp / RNG_DIR).mkdir()
            return tmp

        tmp = self.on_rank0(prepare)
        # Per-rank write failures inside torch.distributed.checkpoint reach every rank already; the
        # RNG file is this rank's own write, so its failure is shared explicitly. The temporary
        # directory is removed by the next save.
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), str(tmp / DIST_DIR))
        on_every_rank(lambda: torch.save(capture_rng_state(), self._rng_file(tmp)),
                      f"writing the RNG states to {tmp / RNG_DIR}")

        def write_rank0_files() -> list[str]:
            (tmp / STATE_FILE).write_text(json.dumps(encoded["doc"], allow_nan=False, separators=(",", ":")) + "\n")
            if encoded["tensors"]:
                from safetensors.torch import save_file

                save_file(encoded["tensors"], str(tmp / STATE_TENSORS_FILE))
            save_model_config(self.cfg.model, tmp)
            return checkpoint_files(tmp)

        files = self._hash_files(tmp, self.on_rank0(write_rank0_files))

        def finish() -> Path:
            write_manifest(tmp, {"step": step, "layout": layout_of(self.cfg.parallel, self.world_size),
                                 "params_dtype": self.cfg.precision.params_dtype,
                                 "distributed_optimizer": self.cfg.optimizer.distributed}, files)
            return publish(tmp, self.root, step, self.cfg.checkpoint.keep_last)

        return self.on_rank0(finish)

    # ---- verify and choose -------------------------------------------------------------------
    def validate(self, directory: Path, manifest: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The manifest of ``directory`` after checking that it is for this run: the model, the dtype,
        the optimizer kind (rank 0; no content hashes, see :meth:`verify`)."""
        from megatron_vespo.config.loader import load_model_config

        manifest = read_manifest(directory) if manifest is None else manifest
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

    def verify(self, directory: Path) -> VerifiedCheckpoint:
        """Collective: check ``directory`` completely before anything of it is loaded.

        Manifest and sizes (rank 0), every file's SHA-256 (spread over the ranks) —
        :class:`CheckpointCorruptError` on every rank when they do not match; then, as plain
        CheckpointErrors: the files torch would unpickle (rank 0, :func:`check_dist_pickles`), the
        state document and this rank's RNG file (read here, kept for :meth:`load`), the model and
        settings (:meth:`validate`)."""
        directory = Path(directory)
        manifest = self.on_rank0(lambda: read_manifest(directory))
        files = manifest["files"]
        missing = [name for name in REQUIRED_FILES if name not in files]
        same_layout = manifest.get("layout") == layout_of(self.cfg.parallel, self.world_size)
        if same_layout:
            missing += [f"{RNG_DIR}/rank_{r:05d}.pt" for r in range(self.world_size)
                        if f"{RNG_DIR}/rank_{r:05d}.pt" not in files]
        if missing:
            raise CheckpointCorruptError(f"{directory / MANIFEST_FILE}: does not list {missing[0]}"
                                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                         "the checkpoint is incomplete")
        self._check_hashes(directory, files)
        self.on_rank0(lambda: check_dist_pickles(directory / DIST_DIR))
        state = _same_on_every_rank(lambda: read_state(
            directory / STATE_FILE, directory / STATE_TENSORS_FILE if STATE_TENSORS_FILE in files else None))
        if not (isinstance(state, dict) and "scheduler" in state and "driver" in state):
            raise CheckpointError(f"{directory / STATE_FILE}: no 'scheduler' and 'driver' entries")
        rng = on_every_rank(lambda: load_plain(self._rng_file(directory)),
                            f"reading the RNG states of {directory}") if same_layout else None
        self.on_rank0(lambda: self.validate(directory, manifest))
        return VerifiedCheckpoint(directory=directory, manifest=manifest, state=state, rng=rng)

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[checkpoint] {message}", flush=True)

    def resume_directory(self) -> Optional[Path]:
        """Collective: the checkpoint to resume from per ``checkpoint.resume`` / ``load_dir``, verified
        (see the module docstring for the choice and the fallback), or None for a fresh start."""
        ck = self.cfg.checkpoint
        if ck.resume == "never":
            return None
        self.on_rank0(lambda: remove_stale_tmp_dirs(self.root))
        if ck.load_dir:  # named by the user: verified, never replaced by another
            self._verified = self.verify(Path(ck.load_dir))
            return self._verified.directory
        candidates = self.on_rank0(lambda: [path for _, path in reversed(step_dirs(self.root))])
        rejected: list[tuple[Path, str]] = []
        for i, path in enumerate(candidates):
            try:
                verified = self.verify(path)
            except CheckpointCorruptError as exc:
                rejected.append((path, str(exc)))
                then = f"; trying {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
                self._say(f"warning: not resuming from {path}: {exc}{then}")
                continue

            def settle() -> None:
                for bad, _ in rejected:
                    moved = move_aside(bad)
                    print(f"[checkpoint] {bad.name} moved aside to {moved} (kept for inspection; "
                          f"step {bad.name[len(STEP_PREFIX):]} will be trained and saved again)", flush=True)
                note = latest_note(self.root, path)
                if note is not None:
                    print(f"[checkpoint] {note}", flush=True)
                    write_latest(self.root, path.name)

            self.on_rank0(settle)
            self._verified = verified
            return path
        if rejected:
            raise no_complete_checkpoint(self.root, rejected)
        self.on_rank0(lambda: find_resume_checkpoint(self.cfg))  # no step directory: 'must' / stray 'latest'
        return None

    def driver_state(self, directory: Path) -> dict[str, Any]:
        """Collective: the driver state saved in ``directory`` (verified first unless it was just chosen)."""
        return self._verified_for(Path(directory)).state["driver"]

    def _verified_for(self, directory: Path) -> VerifiedCheckpoint:
        if self._verified is None or self._verified.directory != directory:
            self._verified = self.verify(directory)
        return self._verified

    # ---- load --------------------------------------------------------------------------------
    def load(self, directory: Path) -> LoadedCheckpoint:
        """Load model, optimizer, scheduler (and RNG states if the layout is unchanged) from ``directory``,
        verified first (:meth:`verify`) unless :meth:`resume_directory` just did."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        directory = Path(directory)
        verified = self._verified_for(directory)
        self._verified = None  # used once: a later load of the same directory checks its files again
        manifest = verified.manifest
        _allocate_distributed_optimizer_state(self.optimizer)
        target = self._sharded_state_dict(is_loading=True)
        try:
            loaded = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), str(directory / DIST_DIR))
            saved_step = _common_step(dist_checkpointing.load_common_state_dict(str(directory / DIST_DIR)))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"{directory / DIST_DIR}: cannot load model/optimizer: "
                                  f"{type(exc).__name__}: {first[0] if first else ''}") from exc
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

        # Megatron's load_state_dict *advances* num_steps by the saved count (and sets lr / weight
        # decay in the param groups): start it from 0, not from the fresh scheduler's position.
        self.scheduler.num_steps = 0
        try:
            self.scheduler.load_state_dict(verified.state["scheduler"])
        except (AssertionError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory / STATE_FILE}: LR schedule differs from the run's optimizer "
                                  f"settings ({type(exc).__name__}: {exc})") from None
        if verified.rng is not None:
            on_every_rank(lambda: restore_rng_state(verified.rng),
                          f"restoring the RNG states from {directory / RNG_DIR}")
        elif self.rank == 0:
            print(f"[checkpoint] {directory} was written in layout {manifest['layout']}; "
                  "RNG states are not restored (re-seeded)", flush=True)
        return LoadedCheckpoint(directory=directory, step=int(manifest["step"]),
                                driver_state=verified.state["driver"], rng_restored=verified.rng is not None)
