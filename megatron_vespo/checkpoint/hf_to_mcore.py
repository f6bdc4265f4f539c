"""Hugging Face Qwen3 / Qwen3-MoE safetensors -> Megatron-Core distributed checkpoint (torch_dist).

    python tools/convert_hf_to_mcore.py --hf-dir D --out OUT [--model-yaml M] [--tensor-parallel TP] [--overwrite]

The result loads into any TP/PP/EP layout with ``dist_checkpointing.load(model.sharded_state_dict(),
OUT)``; it holds the canonical tensors of :mod:`megatron_vespo.checkpoint.hf_mapping` (one chunk per
layer slice / expert), the ``_extra_state`` objects of the linear layers, Megatron's
``metadata.json`` and ``common.pt``, plus ``model_config.yaml`` (so the way back needs no arguments)
and the original ``config.json`` / ``generation_config.json``.

Vocabulary padding: the embedding and output layer are written with Megatron's padded row count
for ``--tensor-parallel`` (default 1: a multiple of ``make_vocab_size_divisible_by``), the padding
rows zero. Megatron loads these two tensors with ``allow_shape_mismatch`` (rows it lacks are zero,
extra rows are not read), so the checkpoint still loads at any TP; the way back drops the padding.

Streaming: the checkpoint is written with PyTorch distributed checkpointing (the torch_dist format
itself) through a save planner whose chunks are produced lazily — one Megatron tensor slice is read
from the safetensors files, converted and written before the next is read — and a storage writer
that streams them into one file per layer. Peak memory is about two copies of the largest slice
(the embedding, or one layer's QKV) on top of the interpreter, whatever the model size.

Everything is validated before anything is written (tensor names, shapes and dtypes against the
config); output goes to ``OUT.tmp`` and is renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from megatron_vespo.checkpoint.hf_io import (
    CheckpointError, ConversionStats, SafetensorsReader, atomic_output_dir, copy_files, model_config_from_hf,
    parse_dtype, read_hf_config, save_model_config,
)
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping, Unit
from megatron_vespo.config.schema import ModelConfig

# What Megatron-Core's torch_dist save writes next to the tensors (dist_checkpointing.core.save_config).
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ModelConfig fields that decide the weights' shapes or the model's function; a --model-yaml must
# agree with config.json on all of them (router_aux_loss_coef and max_position_embeddings are
# training / run settings).
CHECKED_FIELDS = (
    "architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "kv_channels", "intermediate_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias",
    "qk_layernorm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers",
)


# ------------------------------------------------------------------------------------------------
# Validation (before anything is written)
# ------------------------------------------------------------------------------------------------


def resolve_model_config(hf_dir: Path, model_cfg: Optional[ModelConfig]) -> ModelConfig:
    derived = model_config_from_hf(read_hf_config(hf_dir))
    if model_cfg is None:
        return derived
    diffs = [f"{name}: model YAML {getattr(model_cfg, name)!r} vs config.json {getattr(derived, name)!r}"
             for name in CHECKED_FIELDS if getattr(model_cfg, name) != getattr(derived, name)]
    if diffs:
        raise CheckpointError(f"the model YAML does not match {hf_dir / 'config.json'}: " + "; ".join(diffs))
    return model_cfg


def check_hf_weights(reader: SafetensorsReader, mapping: Qwen3Mapping, hf_config: dict) -> torch.dtype:
    """Every weight of the model present with its shape and one supported dtype; nothing extra.
    Returns the dtype."""
    expected = mapping.hf_tensors()
    present = [n for n in reader.names() if not mapping.is_ignored_hf(n)]
    if mapping.cfg.tie_word_embeddings:
        present = [n for n in present if n != "lm_head.weight"]  # tied: the embedding is the head
    cfg = mapping.cfg
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        where = reader.info(unexpected[0]).file.name
        raise CheckpointError(
            f"{len(unexpected)} tensors are not weights of the configured model, e.g. {unexpected[0]!r} in {where} "
            f"(config: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}): the config does not match the weights")
    missing = [n for n in expected if n not in reader.tensors]
    if missing:
        raise CheckpointError(f"{len(missing)} weights of the configured model are missing from {reader.directory}, "
                              f"e.g. {missing[0]!r}: the config does not match the weights (or a shard is missing)")
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
    want = parse_dtype(declared) if isinstance(declared, str) else None
    for name, shape in expected.items():
        info = reader.info(name)
        if info.shape != shape:
            raise CheckpointError(f"{info.file.name}: tensor {name!r} has shape {info.shape}, the config implies {shape}")
        if info.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{info.file.name}: tensor {name!r} has dtype {info.dtype}; "
                                  f"expected a floating dtype among {[str(d) for d in SUPPORTED_DTYPES]}")
        if want is not None and info.dtype != want:
            why = f"config.json declares dtype {declared!r}" if declared else f"the weights before it are {want}"
            raise CheckpointError(f"{info.file.name}: tensor {name!r} has dtype {info.dtype}, but {why}")
        want = want or info.dtype
    return want


# ------------------------------------------------------------------------------------------------
# Streaming torch_dist writer
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """One write item: a unit (or an alias copy of it), or an _extra_state object."""

    file: str                   # storage file group
    unit: Optional[Unit] = None  # a tensor chunk of this unit ...
    key: Optional[str] = None    # ... stored under this key
    rows: Optional[tuple[int, int]] = None  # ... (only these rows of it)
    padding: bool = False  # ``rows`` are vocabulary padding past the unit: zeros, nothing read
    object_key: Optional[str] = None  # or an _extra_state object's unique key


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan made of chunks that are produced only when the storage writer asks for them."""

    def __init__(self, chunks: list[_Chunk], global_shapes: dict[str, tuple[int, ...]],
                 produce: Callable[[_Chunk], torch.Tensor], dtype: torch.dtype):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._global_shapes = global_shapes
        self._produce = produce
        self._dtype = dtype
        self.items: list[WriteItem] = []
        self.chunk_of: dict[MetadataIndex, _Chunk] = {}
        for chunk in chunks:
            if chunk.object_key is not None:
                item = WriteItem(index=MetadataIndex(chunk.object_key), type=WriteItemType.BYTE_IO)
            else:
                unit, stack = chunk.unit, len(global_shapes[chunk.key]) - len(chunk.unit.shape)
                # (a padding chunk's rows lie past the unit, inside the padded global tensor)
                start, count = chunk.rows or (0, unit.shape[0])
                offsets = torch.Size((*unit.prefix, start, *[0] * (len(unit.shape) - 1)))
                sizes = torch.Size((*[1] * stack, count, *unit.shape[1:]))
                item = WriteItem(
                    index=MetadataIndex(chunk.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                        properties=TensorProperties(dtype=dtype),
                        size=torch.Size(global_shapes[chunk.key]),
                    ),
                )
            self.items.append(item)
            self.chunk_of[item.index] = chunk

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        chunk = self.chunk_of[write_item.index]
        if chunk.object_key is not None:
            buffer = io.BytesIO()
            torch.save([None], buffer)  # what Megatron stores for a layer without FP8 metadata
            buffer.seek(0)
            return buffer
        return self._produce(chunk).reshape(write_item.tensor_data.chunk.sizes)


class _StreamingWriter(FileSystemWriter):
    """Writes the plan's items in order, one storage file per group, resolving each item just before
    it is written (PyTorch's writer resolves items eagerly and keeps every tensor of a file alive)."""

    def __init__(self, path: Path, planner: _LazySavePlanner, on_file_done: Callable[[str, int], None]):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._planner = planner
        self._on_file_done = on_file_done

    def write_data(self, plan: SavePlan, planner) -> torch.futures.Future:
        prefix = plan.storage_data.prefix
        groups: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            groups.setdefault(self._planner.chunk_of[item.index].file, []).append(item)
        results = []
        for group, items in groups.items():
            file_name = f"{prefix}{group}.distcp"
            with open(Path(self.path) / file_name, "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes whole storages: never a view's base
                        torch.save(data, stream)
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(file_name, offset, length)))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            self._on_file_done(group, os.path.getsize(Path(self.path) / file_name))
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(results)
        return future


def _file_group(layer: Optional[int]) -> str:
    return "model" if layer is None else f"layer{layer:05d}"


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out: str | os.PathLike, model_cfg: Optional[ModelConfig] = None,
                        *, overwrite: bool = False, max_chunk_bytes: int = 16 * 2**20, tensor_parallel: int = 1,
                        log: Callable[[str], None] = print) -> ConversionStats:
    """Convert the HF checkpoint in ``hf_dir`` into a Megatron dist checkpoint at ``out``.

    Large plain tensors (embedding, output layer) are stored in row chunks of at most
    ``max_chunk_bytes``, so neither direction ever holds one of them whole. The vocabulary is padded
    with zero rows as Megatron pads it at ``tensor_parallel`` (the result loads at any TP)."""
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    cfg = resolve_model_config(hf_dir, model_cfg)
    mapping = Qwen3Mapping(cfg, tensor_parallel=tensor_parallel)
    reader = SafetensorsReader(hf_dir)
    dtype = check_hf_weights(reader, mapping, hf_config)

    chunks: list[_Chunk] = []
    element_size = torch.empty((), dtype=dtype).element_size()
    for unit in mapping.units:
        for rows in unit.row_blocks(element_size, max_chunk_bytes):
            for key in (unit.key, *unit.aliases):
                chunks.append(_Chunk(file=_file_group(unit.layer), unit=unit, key=key, rows=rows))
        for key in (unit.key, *unit.aliases):
            padding = mapping.vocab_padding_rows(key)
            if padding is not None:  # Megatron's padded rows, zero (what a freshly built model holds)
                chunks.append(_Chunk(file=_file_group(unit.layer), unit=unit, key=key, rows=padding, padding=True))
    chunks += [_Chunk(file=_file_group(obj.layer), object_key=obj.unique_key) for obj in mapping.extra_states]

    total = sum(reader.info(n).nbytes for n in mapping.hf_tensors())
    done = {"bytes": 0, "files": 0}
    n_files = len({c.file for c in chunks})
    last_unit: dict[str, torch.Tensor] = {}

    def produce(chunk: _Chunk) -> torch.Tensor:
        unit = chunk.unit
        if chunk.padding:
            return torch.zeros(chunk.rows[1], *unit.shape[1:], dtype=dtype)
        if chunk.rows is not None:  # a block of rows of a plain copy
            tensor = reader.read(unit.hf_names[0], rows=chunk.rows)
            done["bytes"] += tensor.nbytes
            return tensor
        if last_unit.get("unit") is unit:  # an alias chunk right after its unit: no second read
            return last_unit["tensor"]
        tensor = mapping.hf_to_megatron(unit, {name: reader.read(name) for name in unit.hf_names})
        last_unit.clear()
        if unit.aliases:
            last_unit.update(unit=unit, tensor=tensor)
        done["bytes"] += tensor.nbytes
        return tensor

    def on_file_done(group: str, size: int) -> None:
        done["files"] += 1
        elapsed = time.perf_counter() - start
        log(f"[hf->mcore] {done['files']}/{n_files} {group}: {done['bytes'] / 2**20:.1f}/{total / 2**20:.1f} MiB "
            f"({done['bytes'] / 2**20 / max(elapsed, 1e-9):.1f} MiB/s)")

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        planner = _LazySavePlanner(chunks, mapping.dist_tensors(), produce, dtype)
        with warnings.catch_warnings():  # "torch.distributed ... uninitialized": one process is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp_save({}, storage_writer=_StreamingWriter(tmp, planner, on_file_done), planner=planner, no_dist=True)
        last_unit.clear()
        (tmp / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        torch.save({}, tmp / "common.pt")
        save_model_config(cfg, tmp)
        (tmp / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_files(hf_dir, tmp, ["generation_config.json"])
    seconds = time.perf_counter() - start
    log(f"[hf->mcore] wrote {out}: {len(mapping.units)} tensor slices, {total / 2**20:.1f} MiB in {seconds:.1f}s "
        f"({total / 2**20 / max(seconds, 1e-9):.1f} MiB/s)")
    return ConversionStats(tensors=len(mapping.hf_tensors()), bytes=total, seconds=seconds)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output Megatron dist-checkpoint directory")
    p.add_argument("--model-yaml", help="model YAML (default: derived from config.json); must agree with it")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="pad the vocabulary as Megatron does at this TP (the result loads at any TP)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    from megatron_vespo.config import ConfigError, load_model_config

    if args.tensor_parallel < 1:
        p.error(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    try:
        model_cfg = load_model_config(args.model_yaml) if args.model_yaml else None
        convert_hf_to_mcore(args.hf_dir, args.out, model_cfg, overwrite=args.overwrite,
                            tensor_parallel=args.tensor_parallel,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
