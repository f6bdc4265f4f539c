"""Scored rollout batches on disk: written by ``rollout.dump_dir``, trained on again by ``rollout.replay_dir``.

One file per scored batch, ``batch_<step>.safetensors`` (a synchronous rollout batch with its N
mini-batches; in the asynchronous mode one mini-batch), holding exactly the training samples the
trainer was handed, in order, split as they were trained:

- tensors (flat, ragged arrays with per-sample lengths): ``prompt_ids``, ``response_ids`` (int64),
  ``rollout_logp`` (μ, float64: the engine's numbers bit for bit), ``advantage`` and ``reward``
  (float64 per sample), ``response_mask`` (float64, for samples that carry one), ``routed_experts``
  (int32, the engine's experts per response token, with each sample's shape and dtype);
- the safetensors header's metadata (JSON): format and version, the loop step, the mini-batch sizes,
  per-sample weight versions, the model and sampling settings the batch was generated under, and the
  batch's rollout metrics.

Safe formats only: safetensors is a JSON header plus raw little-endian arrays, read without pickle or
anything executable. A file is written to a temporary name in the same directory, flushed to disk
and renamed, so a reader (or a killed run) never sees half a file.

Reading validates the file against the run it is replayed in (vocabulary, context length, expert
shape, sampling temperature) and its own consistency (lengths, dtypes, finite values); every problem
is a :class:`RolloutDumpError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_vespo.data.dataset import DataError
from megatron_vespo.train.sample import TrainSample

FORMAT = "megatron-vespo rollout batch"
FORMAT_VERSION = 1
METADATA_KEY = "megatron_vespo"
FILE_RE = re.compile(r"^batch_(\d{6,})\.safetensors$")
ROUTED_DTYPES = ("uint8", "int16", "int32", "int64")


class RolloutDumpError(DataError):
    """A dump directory or batch file that cannot be replayed in this run (the message names it)."""


def batch_file_name(step: int) -> str:
    return f"batch_{step:06d}.safetensors"


def list_batch_files(directory: Path) -> list[Path]:
    """The batch files of ``directory`` in step order (other files are ignored)."""
    found = []
    for path in Path(directory).iterdir():
        match = FILE_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class BatchContext:
    """What a batch was generated under (written to the file) and what a replay must match (checked)."""

    vocab_size: int
    max_position_embeddings: int
    num_hidden_layers: int
    num_moe_layers: int
    num_experts: int
    experts_per_token: int
    temperature: float

    @classmethod
    def from_config(cls, cfg: Any) -> "BatchContext":
        model = cfg.model
        moe_layers = model.num_hidden_layers - len(set(model.mlp_only_layers)) if model.num_experts else 0
        return cls(vocab_size=model.vocab_size, max_position_embeddings=model.max_position_embeddings,
                   num_hidden_layers=model.num_hidden_layers, num_moe_layers=moe_layers, num_experts=model.num_experts,
                   experts_per_token=model.num_experts_per_tok, temperature=cfg.rollout.temperature)


@dataclass
class SavedBatch:
    """A batch read back: the mini-batches as trained, and what was logged with them."""

    step: int
    mini_batches: list[list[TrainSample]]
    metrics: dict[str, Any]
    weight_versions: list[str]
    rewards: list[Optional[float]]


def _ragged(rows: Sequence[Sequence[Any]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if rows and lengths.sum() else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), lengths


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return str(value)


def write_batch(directory: Path, step: int, mini_batches: Sequence[Sequence[TrainSample]], metrics: dict[str, Any],
                context: BatchContext, rewards: Optional[Sequence[Optional[float]]] = None,
                weight_versions: Optional[Sequence[str]] = None) -> Path:
    """Write one scored batch atomically (temporary file, fsync, rename); returns its path. ``rewards`` and
    ``weight_versions`` are per sample in mini-batch order (default: the samples' own fields)."""
    from safetensors.numpy import save_file

    samples = [s for mb in mini_batches for s in mb]
    if rewards is None:
        rewards = [s.reward for s in samples]
    if weight_versions is None:
        weight_versions = [s.weight_version or "" for s in samples]
    if len(rewards) != len(samples) or len(weight_versions) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards and {len(weight_versions)} versions")
    prompt_ids, prompt_lens = _ragged([s.prompt_ids for s in samples], "int64")
    response_ids, response_lens = _ragged([s.response_ids for s in samples], "int64")
    rollout_logp, _ = _ragged([s.rollout_logp for s in samples], "float64")
    masked = [s for s in samples if s.response_mask is not None]
    response_mask, _ = _ragged([s.response_mask for s in masked], "float64")
    routed = [None if s.rollout_routed_experts is None else np.asarray(s.rollout_routed_experts) for s in samples]
    routed_shapes = np.zeros((len(samples), 3), dtype=np.int64)
    routed_dtypes: list[Optional[str]] = []
    for i, arr in enumerate(routed):
        if arr is None:
            routed_dtypes.append(None)
            continue
        if arr.ndim != 3 or arr.dtype.name not in ROUTED_DTYPES:
            raise ValueError(f"sample {i}: routed experts of shape {arr.shape} and dtype {arr.dtype} cannot be saved")
        routed_shapes[i] = arr.shape
        routed_dtypes.append(arr.dtype.name)
    present = [a.reshape(-1).astype(np.int32) for a in routed if a is not None]
    tensors = {
        "prompt_ids": prompt_ids, "prompt_lens": prompt_lens, "response_ids": response_ids,
        "response_lens": response_lens, "rollout_logp": rollout_logp,
        "advantage": np.array([s.advantage for s in samples], dtype=np.float64),
        "reward": np.array([math.nan if r is None else r for r in rewards], dtype=np.float64),
        "has_response_mask": np.array([s.response_mask is not None for s in samples], dtype=np.uint8),
        "response_mask": response_mask,
        "routed_shapes": routed_shapes,
        "routed_experts": np.concatenate(present) if present else np.zeros(0, np.int32),
    }
    header = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
              "mini_batch_sizes": [len(mb) for mb in mini_batches], "weight_versions": list(weight_versions),
              "routed_dtypes": routed_dtypes, "context": context.__dict__, "metrics": _json_safe(metrics)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / batch_file_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, allow_nan=False)})
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a batch file (format and version checked); RolloutDumpError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is the same user error
        raise RolloutDumpError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if raw is None:
        raise RolloutDumpError(f"{path}: no '{METADATA_KEY}' metadata: not a rollout batch written by rollout.dump_dir")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise RolloutDumpError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise RolloutDumpError(f"{path}: not a rollout batch (format {found!r})")
    if header.get("version") != FORMAT_VERSION:
        raise RolloutDumpError(f"{path}: format version {header.get('version')!r}; this build reads {FORMAT_VERSION}")
    return header


def check_context(path: Path, header: dict[str, Any], expected: BatchContext) -> None:
    """The batch was generated for a model and sampling this run can train on (errors name the file and field)."""
    saved = header.get("context")
    if not isinstance(saved, dict):
        raise RolloutDumpError(f"{path}: header has no generation context")
    if saved.get("vocab_size") != expected.vocab_size:
        raise RolloutDumpError(f"{path}: generated with a vocabulary of {saved.get('vocab_size')} tokens; this run's "
                               f"model.vocab_size is {expected.vocab_size}")
    if saved.get("temperature") != expected.temperature:
        raise RolloutDumpError(f"{path}: μ was computed at temperature {saved.get('temperature')}; this run's "
                               f"rollout.temperature is {expected.temperature} (π would be at another temperature)")


def _tensor(f: Any, path: Path, name: str, dtype: str, ndim: int = 1) -> np.ndarray:
    try:
        arr = f.get_tensor(name)
    except Exception:  # noqa: BLE001 -- a missing tensor
        raise RolloutDumpError(f"{path}: tensor {name!r} is missing") from None
    if arr.dtype.name != dtype or arr.ndim != ndim:
        raise RolloutDumpError(f"{path}: tensor {name!r} is {arr.dtype.name} of {arr.ndim} dims; expected {dtype} "
                               f"of {ndim}")
    return arr


def _split(path: Path, name: str, flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    if (lengths < 0).any() or int(lengths.sum()) != flat.shape[0]:
        raise RolloutDumpError(f"{path}: tensor {name!r} holds {flat.shape[0]} values; the sample lengths add up to "
                               f"{int(lengths.sum())}")
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def read_batch(path: Path, expected: BatchContext) -> SavedBatch:
    """A batch file as training samples, checked against this run (:func:`check_context`) and itself."""
    from safetensors import safe_open

    path = Path(path)
    header = read_header(path)
    check_context(path, header, expected)
    sizes = header.get("mini_batch_sizes")
    if not isinstance(sizes, list) or not sizes or not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise RolloutDumpError(f"{path}: header's mini_batch_sizes is {sizes!r}; expected a list of counts")
    n = sum(sizes)
    with safe_open(str(path), framework="np") as f:
        prompt_lens = _tensor(f, path, "prompt_lens", "int64")
        response_lens = _tensor(f, path, "response_lens", "int64")
        per_sample = {"prompt_lens": prompt_lens, "response_lens": response_lens,
                      "advantage": _tensor(f, path, "advantage", "float64"),
                      "reward": _tensor(f, path, "reward", "float64"),
                      "has_response_mask": _tensor(f, path, "has_response_mask", "uint8")}
        for name, arr in per_sample.items():
            if arr.shape[0] != n:
                raise RolloutDumpError(f"{path}: tensor {name!r} has {arr.shape[0]} entries for {n} samples")
        prompts = _split(path, "prompt_ids", _tensor(f, path, "prompt_ids", "int64"), prompt_lens)
        responses = _split(path, "response_ids", _tensor(f, path, "response_ids", "int64"), response_lens)
        logps = _split(path, "rollout_logp", _tensor(f, path, "rollout_logp", "float64"), response_lens)
        has_mask = per_sample["has_response_mask"].astype(bool)
        masks = _split(path, "response_mask", _tensor(f, path, "response_mask", "float64"), response_lens[has_mask])
        routed_shapes = _tensor(f, path, "routed_shapes", "int64", ndim=2)
        routed_flat = _tensor(f, path, "routed_experts", "int32")
    versions, dtypes = header.get("weight_versions"), header.get("routed_dtypes")
    if not isinstance(versions, list) or len(versions) != n or not isinstance(dtypes, list) or len(dtypes) != n \
            or routed_shapes.shape != (n, 3):
        raise RolloutDumpError(f"{path}: per-sample weight versions, routed dtypes or shapes do not match {n} samples")

    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) < 1:
            raise RolloutDumpError(f"{path}: sample {i} has an empty prompt")
        tokens = np.concatenate([prompt, response])
        outside = tokens[(tokens < 0) | (tokens >= expected.vocab_size)]
        if outside.size:
            raise RolloutDumpError(f"{path}: sample {i} has token id {int(outside[0])} outside the vocabulary "
                                   f"[0, model.vocab_size={expected.vocab_size})")
        if tokens.size > expected.max_position_embeddings:
            raise RolloutDumpError(f"{path}: sample {i} has {tokens.size} tokens; model.max_position_embeddings is "
                                   f"{expected.max_position_embeddings}")
    flat_logp = np.concatenate(logps) if logps else np.zeros(0)
    if not np.isfinite(flat_logp).all() or (flat_logp > 1e-6).any():
        raise RolloutDumpError(f"{path}: rollout_logp holds non-finite or positive log-probabilities")
    if not np.isfinite(per_sample["advantage"]).all():
        raise RolloutDumpError(f"{path}: advantage holds non-finite values")

    routed = _read_routed(path, routed_shapes, dtypes, routed_flat, response_lens, expected)
    rewards = [None if math.isnan(r) else float(r) for r in per_sample["reward"]]
    mask_iter = iter(masks)
    samples = [TrainSample(prompt_ids=prompts[i].tolist(), response_ids=responses[i].tolist(),
                           rollout_logp=logps[i].tolist(), advantage=float(per_sample["advantage"][i]),
                           response_mask=next(mask_iter).tolist() if has_mask[i] else None,
                           rollout_routed_experts=routed[i], reward=rewards[i], weight_version=str(versions[i]))
               for i in range(n)]
    bounds = np.cumsum([0, *sizes])
    metrics = header.get("metrics") if isinstance(header.get("metrics"), dict) else {}
    return SavedBatch(step=int(header.get("step", -1)), metrics=metrics, weight_versions=[str(v) for v in versions],
                      rewards=rewards, mini_batches=[samples[bounds[j]:bounds[j + 1]] for j in range(len(sizes))])


def _read_routed(path: Path, shapes: np.ndarray, dtypes: list, flat: np.ndarray, response_lens: np.ndarray,
                 expected: BatchContext) -> list[Optional[np.ndarray]]:
    """Each sample's routed experts with its saved shape and dtype (None where it had none)."""
    out: list[Optional[np.ndarray]] = []
    offset = 0
    for i, (shape, dtype) in enumerate(zip(shapes.tolist(), dtypes)):
        if dtype is None:
            out.append(None)
            continue
        if dtype not in ROUTED_DTYPES:
            raise RolloutDumpError(f"{path}: sample {i}: routed experts dtype {dtype!r}")
        if not expected.num_experts:
            raise RolloutDumpError(f"{path}: sample {i} carries routed experts but this run's model has no experts")
        rows, a, b = shape
        per_token = a * b
        k = expected.experts_per_token
        if rows != response_lens[i] or per_token % k or per_token // k not in (expected.num_moe_layers,
                                                                             expected.num_hidden_layers):
            raise RolloutDumpError(f"{path}: sample {i}: routed experts of shape {tuple(shape)} do not fit its "
                                   f"{int(response_lens[i])} response tokens x (MoE layers {expected.num_moe_layers} "
                                   f"or all {expected.num_hidden_layers}) x top-k {k} of this run's model")
        size = rows * per_token
        if offset + size > flat.shape[0]:
            raise RolloutDumpError(f"{path}: tensor 'routed_experts' is shorter than the saved shapes say")
        values = flat[offset:offset + size]
        offset += size
        if values.size and (values.min() < 0 or values.max() >= expected.num_experts):
            raise RolloutDumpError(f"{path}: sample {i}: routed expert id outside [0, model.num_experts="
                                   f"{expected.num_experts})")
        out.append(values.reshape(rows, a, b).astype(dtype))
    if offset != flat.shape[0]:
        raise RolloutDumpError(f"{path}: tensor 'routed_experts' holds {flat.shape[0]} values; the shapes say {offset}")
    return out


def check_replay_dir(directory: str, expected: BatchContext, read_all: bool = True) -> list[Path]:
    """The batch files of ``rollout.replay_dir``, each read and checked (``read_all``; else headers only).
    ConfigError naming the field for a missing or empty directory, RolloutDumpError naming a bad file."""
    from typed_config import ConfigError

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError("rollout.replay_dir", f"{directory!r} is not a directory")
    files = list_batch_files(root)
    if not files:
        raise ConfigError("rollout.replay_dir", f"{directory!r} holds no batch_<step>.safetensors files "
                          "(written by rollout.dump_dir)")
    for path in files:
        if read_all:
            read_batch(path, expected)
        else:
            check_context(path, read_header(path), expected)
    return files


def check_dump_dir(directory: str, fresh_run: bool) -> None:
    """``rollout.dump_dir`` can be written; a fresh run refuses a directory holding another run's batches
    (a resumed run overwrites its own from the resumed step on)."""
    from typed_config import ConfigError

    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ConfigError("rollout.dump_dir", f"{directory!r} exists and is not a directory")
    if fresh_run and root.is_dir() and list_batch_files(root):
        raise ConfigError("rollout.dump_dir", f"{directory!r} already holds {len(list_batch_files(root))} batch "
                          "file(s) of another run; choose an empty directory (or resume that run)")
