"""Hugging Face checkpoint files: streaming safetensors reading/writing and ``config.json``.

- :class:`SafetensorsReader` opens a directory (``model.safetensors.index.json`` or bare
  ``*.safetensors`` files), validates it up front (every file present, every indexed tensor in its
  file, no tensor twice, no truncated file) and reads one tensor at a time with plain file reads:
  no memory map, so resident memory is the tensor being read and nothing else.
- :class:`SafetensorsWriter` writes a planned set of tensors into size-bounded shards plus the
  index. Headers are written first from the plan, tensors are then written in any order to their
  offsets, so no shard is ever held in memory.
- :func:`model_config_from_hf` / :func:`hf_config_from_model`: ``config.json`` <-> :class:`ModelConfig`.
  The written config carries the fields both transformers 5 (``rope_parameters``, ``num_local_experts``,
  ``dtype``) and older transformers / SGLang (``rope_theta``, ``num_experts``, ``torch_dtype``) read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from megatron_vespo.config.schema import ModelConfig
from rollout_sglang.weight_sync.disk import write_tensor_bytes
from typed_config import ConfigError, build

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file/tensor."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of HF configs)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name.removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPE_NAMES)}") from None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, validated against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} > file size)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {exc})") from None
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {entry['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"the file has {size}")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return infos


class SafetensorsReader:
    """All tensors of an HF checkpoint directory, read one at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        index_path = self.directory / INDEX_FILE
        self.tensors: dict[str, TensorInfo] = {}
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index_path}: shard file(s) missing from {self.directory}: {missing}")
            headers = {f: read_safetensors_header(self.directory / f) for f in files}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise CheckpointError(f"{self.directory / file}: has no tensor {name!r} (listed in {INDEX_FILE})")
                self.tensors[name] = headers[file][name]
            unlisted = sorted(set().union(*(h.keys() for h in headers.values())) - set(weight_map))
            if unlisted:
                raise CheckpointError(f"{index_path}: tensors in the shards but not in the index: {unlisted[:5]}")
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}")
            for file in files:
                for name, info in read_safetensors_header(self.directory / file).items():
                    if name in self.tensors:
                        raise CheckpointError(f"tensor {name!r} is in both {self.tensors[name].file.name} and {file}")
                    self.tensors[name] = info

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor {name!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """One tensor (or ``rows=(start, count)`` of its first axis), read straight into a freshly
        allocated tensor."""
        info = self.info(name)
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            row_bytes = info.nbytes // info.shape[0]
            if not (0 <= rows[0] and rows[1] >= 0 and rows[0] + rows[1] <= info.shape[0]):
                raise CheckpointError(f"{name}: rows {rows} outside its {info.shape[0]} rows")
            shape, start, nbytes = (rows[1], *info.shape[1:]), start + rows[0] * row_bytes, rows[1] * row_bytes
        out = torch.empty(shape, dtype=info.dtype)
        if nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy()
            with open(info.file, "rb") as f:
                f.seek(start)
                got = f.readinto(view)
            if got != nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    file: str
    offset: int  # absolute byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class SafetensorsWriter:
    """Write ``plan`` (name -> (dtype, shape), in order) as shards of at most ``max_shard_bytes``.

    Shards are ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. Call
    :meth:`write` once per tensor or once per block of rows (any order), then :meth:`close`, which
    fails naming any tensor that was planned but not completely written.
    """

    def __init__(self, directory: str | os.PathLike, plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in plan.items():
            if dtype not in _ST_NAMES:
                raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        self.slots: dict[str, _Slot] = {}
        self._rows_missing: dict[str, int] = {name: (shape[0] if shape else 1) for name, (_, shape) in plan.items()}
        self.total_bytes = 0
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                dtype, shape = plan[name]
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            data_start = 8 + len(blob)
            with open(self.directory / file, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                f.truncate(data_start + offset)
            for name in names:
                begin, end = header[name]["data_offsets"]
                self.slots[name] = _Slot(file, data_start + begin, plan[name][0], tuple(plan[name][1]), end - begin)
            self.total_bytes += offset
        self._open_file: Optional[str] = None
        self._handle = None

    def write(self, name: str, tensor: torch.Tensor, row_offset: Optional[int] = None) -> None:
        """Write tensor ``name`` whole, or (``row_offset`` given) the block of its first-axis rows
        starting there."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name!r} was not planned for this checkpoint")
        expected = slot.shape if row_offset is None else (tensor.shape[0], *slot.shape[1:])
        rows = 1 if not slot.shape else expected[0]
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"planned {slot.dtype} {slot.shape}")
        if self._rows_missing[name] < rows:
            raise CheckpointError(f"tensor {name!r} written twice")
        offset = slot.offset
        if row_offset is not None:
            if not 0 <= row_offset <= slot.shape[0] - rows:
                raise CheckpointError(f"tensor {name!r}: rows {row_offset}+{rows} outside {slot.shape[0]}")
            offset += row_offset * (slot.nbytes // slot.shape[0])
        if self._open_file != slot.file:
            self._close_handle()
            self._handle = open(self.directory / slot.file, "r+b")
            self._open_file = slot.file
        self._handle.seek(offset)
        write_tensor_bytes(self._handle, tensor)  # never a numpy view of a (CPU) parameter: it would pin it
        self._rows_missing[name] -= rows

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._open_file = None

    def close(self) -> None:
        self._close_handle()
        pending = sorted(name for name, rows in self._rows_missing.items() if rows)
        if pending:
            raise CheckpointError(f"{len(pending)} planned tensors were never (completely) written, e.g. {pending[:3]}")
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: slot.file for name, slot in self.slots.items()}}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ------------------------------------------------------------------------------------------------

_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (an HF checkpoint directory needs its config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return data


def hf_rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from either spelling (transformers 5 ``rope_parameters``, older ``rope_theta``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError("config.json: rope_parameters.rope_type",
                          f"only the default RoPE is supported (the Megatron provider has no {rope_type!r} scaling)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json: rope_theta", "missing (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """:class:`ModelConfig` of a Qwen3 / Qwen3-MoE ``config.json``.

    ``router_aux_loss_coef`` is a training setting, not part of the weights: it is left at the RL
    default 0 (set it in the model YAML to train with a load-balancing loss).
    """
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ConfigError("config.json: model_type", f"must be one of {sorted(_ARCHITECTURES)}; got {model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("config.json: hidden_act", f"only 'silu' (SwiGLU) is supported; got {hf['hidden_act']!r}")
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window", "sliding-window attention is not supported")
    data: dict[str, Any] = {
        "architecture": model_type,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim"),
        "intermediate_size": hf["intermediate_size"],
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": hf_rope_theta(hf),
        "max_position_embeddings": hf.get("max_position_embeddings", 40960),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "qk_layernorm": True,  # Qwen3 always normalises per-head queries and keys
    }
    if model_type == "qwen3_moe":
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        data.update({
            "num_experts": experts,
            "num_experts_per_tok": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),  # HF Qwen3MoeConfig's default
            "decoder_sparse_step": hf.get("decoder_sparse_step", 1),
            "mlp_only_layers": list(hf.get("mlp_only_layers") or []),
        })
    try:
        return build(ModelConfig, data, "config.json")
    except KeyError as exc:
        raise ConfigError(f"config.json: {exc.args[0]}", "missing") from None


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype,
                         extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``config.json`` contents for ``cfg``. ``extra`` (e.g. the original config.json) supplies the
    fields that are not architecture (token ids, initializer range ...); architecture fields always
    come from ``cfg``."""
    theta: float | int = int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta
    arch: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),
    }
    if cfg.is_moe:
        arch.update({
            "num_experts": cfg.num_experts,
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": cfg.decoder_sparse_step,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "output_router_logits": False,
        })
    # Training settings: the original checkpoint's value wins over ours.
    out: dict[str, Any] = {"router_aux_loss_coef": cfg.router_aux_loss_coef} if cfg.is_moe else {}
    out.update((k, v) for k, v in (extra or {}).items() if k not in arch and k not in _STALE_KEYS)
    out.update(arch)
    return dict(sorted(out.items()))


# Keys of an original config.json that must not be carried over (derived or version-specific).
_STALE_KEYS = {"layer_types", "transformers_version"}


def write_hf_model_dir(named: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, directory: Path) -> Path:
    """An HF model directory (config.json + safetensors) holding exactly ``named`` (no token ids: the
    model's, not a tokenizer's)."""
    named = list(named)
    directory.mkdir(parents=True, exist_ok=True)
    hf = hf_config_from_model(cfg, named[0][1].dtype, extra={"bos_token_id": None, "eos_token_id": None,
                                                             "pad_token_id": None})
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    writer = SafetensorsWriter(directory, {name: (t.dtype, tuple(t.shape)) for name, t in named})
    for name, t in named:
        writer.write(name, t)
    writer.close()
    return directory


def copy_files(src: str | os.PathLike, dst: str | os.PathLike, patterns: Iterable[str]) -> list[str]:
    """Copy the files of ``src`` matching any glob pattern into ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for pattern in patterns:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and path.name not in copied:
                shutil.copy2(path, dst / path.name)
                copied.append(path.name)
    return copied


TOKENIZER_PATTERNS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "chat_template*", "*.tiktoken", "*.model")

# ------------------------------------------------------------------------------------------------
# Output directories and the ModelConfig stored with a Megatron checkpoint
# ------------------------------------------------------------------------------------------------

MODEL_CONFIG_FILE = "model_config.yaml"


def save_model_config(cfg: ModelConfig, directory: str | os.PathLike) -> Path:
    """Write ``cfg`` as a model YAML (loadable with ``load_model_config``) into ``directory``."""
    import yaml

    from typed_config import to_dict

    path = Path(directory) / MODEL_CONFIG_FILE
    path.write_text("# Model of this checkpoint (megatron_vespo ModelConfig; Hugging Face field names).\n"
                    + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def load_checkpoint_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` stored in a Megatron checkpoint directory by the converters."""
    from megatron_vespo.config.loader import load_model_config

    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; pass the model YAML explicitly (--model-yaml)")
    return load_model_config(path)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield ``OUT.tmp`` to write into; on success it becomes ``out``, on any error it is removed
    (so a failed conversion leaves nothing behind)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@dataclass
class ConversionStats:
    """What a checkpoint conversion (either direction) wrote: tensors, bytes and the time it took."""

    tensors: int
    bytes: int
    seconds: float


__all__ = [
    "CONFIG_FILE", "CheckpointError", "ConversionStats", "INDEX_FILE", "MODEL_CONFIG_FILE", "SafetensorsReader",
    "SafetensorsWriter", "TOKENIZER_PATTERNS", "TensorInfo", "atomic_output_dir", "copy_files", "dtype_name", "hf_config_from_model",
    "hf_rope_theta", "load_checkpoint_model_config", "model_config_from_hf", "parse_dtype", "read_hf_config",
    "read_safetensors_header", "save_model_config",
]
