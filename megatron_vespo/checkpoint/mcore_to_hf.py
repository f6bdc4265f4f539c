"""Megatron-Core distributed checkpoint (torch_dist) -> Hugging Face Qwen3 / Qwen3-MoE safetensors.

    python tools/convert_mcore_to_hf.py --ckpt DIR --out OUT [--tokenizer-dir T] [--model-yaml M]
                                        [--dtype bfloat16] [--max-shard-size-gb 5]

Reads any torch_dist checkpoint holding the canonical model tensors (written by
``convert_hf_to_mcore.py`` or by ``dist_checkpointing.save`` of a model in any TP/PP/EP layout; an
optimizer state next to them is ignored). The model comes from ``DIR/model_config.yaml`` unless
``--model-yaml`` is given. The vocabulary padding Megatron adds (any amount, whatever TP saved the
checkpoint) is not read: the HF tensors have ``vocab_size`` rows. Writes size-bounded safetensors shards with ``model.safetensors.index.json``,
``config.json`` (fields for transformers 5 and for older transformers / SGLang), the stored
``generation_config.json`` and the tokenizer files of ``--tokenizer-dir``.

Streaming: tensor slices are read from the checkpoint in batches of at most ``--read-batch-mb``
(large plain tensors such as the embedding in row blocks of that size; a fused slice — one layer's
QKV, one expert's fc1 — whole) through a PyTorch distributed-checkpoint load plan that reads only
those slices; they are converted to HF tensors and written to their place in the shards.
Output goes to ``OUT.tmp`` and is renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_vespo.checkpoint.hf_io import (
    TOKENIZER_PATTERNS, CheckpointError, ConversionStats, SafetensorsWriter, atomic_output_dir, copy_files,
    hf_config_from_model, load_checkpoint_model_config, parse_dtype,
)
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping, Unit, detect_stacked_layers
from megatron_vespo.config.schema import ModelConfig


# ------------------------------------------------------------------------------------------------
# Reading slices of a torch_dist checkpoint
# ------------------------------------------------------------------------------------------------


class _CachedReader(FileSystemReader):
    """Reads ``.metadata`` once (every load call asks for it)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._metadata: Optional[Metadata] = None

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Loads ``targets``: (key, offsets, tensor) = the part of global tensor ``key`` at ``offsets``
    with the tensor's shape, read from whichever stored chunks overlap it."""

    def __init__(self, targets: Sequence[tuple[str, tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = list(targets)

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for i, (key, offsets, tensor) in enumerate(self._requests):
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                # dest_index names the request (key + offsets) so resolve_tensor finds its target.
                items.append(ReadItem(
                    type=item.type,
                    dest_index=MetadataIndex(key, torch.Size(offsets), i),
                    dest_offsets=item.dest_offsets,
                    storage_index=item.storage_index,
                    storage_offsets=item.storage_offsets,
                    lengths=item.lengths,
                ))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self._requests[read_item.dest_index.index][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read straight into the target's view


class DistCheckpointSlices:
    """Tensor slices of a torch_dist checkpoint, read on demand."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        meta = ckpt / "metadata.json"
        if not ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: not a directory")
        if not meta.is_file() or not (ckpt / ".metadata").is_file():
            raise CheckpointError(f"{ckpt}: not a Megatron dist checkpoint (needs metadata.json and .metadata)")
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta}: invalid JSON ({exc})") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{meta}: sharded_backend {backend!r}; only 'torch_dist' checkpoints are supported")
        self.reader = _CachedReader(ckpt)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as exc:  # unpickling errors of a damaged file come in many types
            raise CheckpointError(f"{ckpt / '.metadata'}: unreadable ({exc})") from None
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def check_files(self) -> None:
        """Every storage file named by the metadata is present (a missing one fails before writing)."""
        files = sorted({info.relative_path for info in (self.metadata.storage_data or {}).values()})
        missing = [f for f in files if not (self.ckpt / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.ckpt}: checkpoint file(s) missing: {missing}")

    def read(self, requests: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
        """The slices (key, offsets, shape), read in one pass over the storage files."""
        targets = [(key, offsets, torch.empty(shape, dtype=self.tensors[key].properties.dtype))
                   for key, offsets, shape in requests]
        with warnings.catch_warnings():  # "torch.distributed ... uninitialized": one process is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp_load({}, storage_reader=self.reader, planner=_SliceLoadPlanner(targets), no_dist=True)
        return [t for _, _, t in targets]


def _stored_key(slices: DistCheckpointSlices, unit: Unit) -> str:
    for key in (unit.key, *unit.aliases):
        if key in slices.tensors:
            return key
    raise CheckpointError(f"{slices.ckpt}: has no tensor {unit.key!r}: the model config does not match the checkpoint")


def check_checkpoint(slices: DistCheckpointSlices, mapping: Qwen3Mapping) -> torch.dtype:
    """Every tensor of the model is in the checkpoint with its global shape and one floating dtype.

    The vocabulary tensors may hold any number of rows from ``vocab_size`` up: Megatron pads them
    for the TP it saved from (and our converter for its ``--tensor-parallel``); only the first
    ``vocab_size`` rows are read, which strips the padding."""
    shapes = mapping.dist_tensors()
    dtypes = set()
    for unit in mapping.units:
        key = _stored_key(slices, unit)
        got = tuple(slices.tensors[key].size)
        padded_vocab = (mapping.is_vocab_key(key) and len(got) == len(unit.shape) and got[0] >= unit.shape[0]
                        and got[1:] == unit.shape[1:])  # the real rows, then any padding
        if not padded_vocab and got != shapes[key]:
            raise CheckpointError(f"{slices.ckpt}: tensor {key!r} has global shape {got}, the model config implies "
                                  f"{shapes[key]}: the config does not match the checkpoint")
        dtypes.add(slices.tensors[key].properties.dtype)
    bad = [d for d in dtypes if not d.is_floating_point]
    if bad or len(dtypes) != 1:
        raise CheckpointError(f"{slices.ckpt}: model tensors have dtypes {sorted(map(str, dtypes))}; expected one "
                              f"floating dtype (pass --dtype to cast them all)")
    return dtypes.pop()


_Piece = tuple[Unit, Optional[tuple[int, int]]]  # a unit, whole (None) or a block of its rows


def _batches(units: Sequence[Unit], budget_bytes: int, element_size: int) -> list[list[_Piece]]:
    """Pieces (whole units, or row blocks of large plain ones) grouped into reads of at most
    ``budget_bytes`` (a single larger piece is read alone)."""
    batches: list[list[_Piece]] = [[]]
    size = 0
    for unit in units:
        for rows in unit.row_blocks(element_size, budget_bytes):
            nbytes = element_size * (unit.numel if rows is None else unit.numel // unit.shape[0] * rows[1])
            if batches[-1] and size + nbytes > budget_bytes:
                batches.append([])
                size = 0
            batches[-1].append((unit, rows))
            size += nbytes
    return batches


def convert_mcore_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *, model_cfg: Optional[ModelConfig] = None,
                        tokenizer_dir: Optional[str | os.PathLike] = None, dtype: Optional[torch.dtype] = None,
                        max_shard_bytes: int = 5 * 1024**3, read_batch_bytes: int = 16 * 2**20,
                        overwrite: bool = False, log: Callable[[str], None] = print) -> ConversionStats:
    """Convert the Megatron dist checkpoint ``ckpt`` into an HF checkpoint at ``out``."""
    start = time.perf_counter()
    ckpt = Path(ckpt)
    slices = DistCheckpointSlices(ckpt)
    cfg = model_cfg or load_checkpoint_model_config(ckpt)
    mapping = Qwen3Mapping(cfg, stacked_layers=detect_stacked_layers(slices.tensors))
    stored_dtype = check_checkpoint(slices, mapping)
    slices.check_files()
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"{tokenizer_dir}: tokenizer directory not found")
    out_dtype = dtype or stored_dtype
    plan = {name: (out_dtype, shape) for name, shape in mapping.hf_tensors().items()}

    stored_config = ckpt / "hf_config.json"
    extra = json.loads(stored_config.read_text()) if stored_config.is_file() else None
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
        done, total = 0, writer.total_bytes
        batches = _batches(mapping.units, read_batch_bytes, torch.empty((), dtype=stored_dtype).element_size())
        for i, batch in enumerate(batches):
            requests = []
            for unit, rows in batch:
                key = _stored_key(slices, unit)
                first_row, count = rows or (0, unit.shape[0])
                stack = len(slices.tensors[key].size) - len(unit.shape)
                requests.append((key, (*unit.prefix, first_row, *[0] * (len(unit.shape) - 1)),
                                 (*[1] * stack, count, *unit.shape[1:])))
            for (unit, rows), tensor in zip(batch, slices.read(requests)):
                if rows is not None:  # a block of rows of a plain copy
                    block = tensor.reshape(rows[1], *unit.shape[1:]).to(out_dtype)
                    writer.write(unit.hf_names[0], block, row_offset=rows[0])
                    done += block.nbytes
                    continue
                for name, hf_tensor in mapping.megatron_to_hf(unit, tensor.reshape(unit.shape)):
                    writer.write(name, hf_tensor.to(out_dtype))
                    done += writer.slots[name].nbytes
            if (i + 1) % max(1, len(batches) // 20) == 0 or i + 1 == len(batches):
                elapsed = time.perf_counter() - start
                log(f"[mcore->hf] {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({done / 2**20 / max(elapsed, 1e-9):.1f} MiB/s)")
        writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, out_dtype, extra), indent=2) + "\n")
        copy_files(ckpt, tmp, ["generation_config.json"])
        if tokenizer_dir is not None:
            copied = copy_files(tokenizer_dir, tmp, TOKENIZER_PATTERNS)
            if not copied:
                raise CheckpointError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_PATTERNS)})")
    seconds = time.perf_counter() - start
    log(f"[mcore->hf] wrote {out}: {len(plan)} tensors, {total / 2**20:.1f} MiB in {seconds:.1f}s")
    return ConversionStats(tensors=len(plan), bytes=total, seconds=seconds)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Megatron dist checkpoint directory (torch_dist)")
    p.add_argument("--out", required=True, help="output HF checkpoint directory")
    p.add_argument("--tokenizer-dir", help="copy the tokenizer files of this directory into OUT")
    p.add_argument("--model-yaml", help="model YAML (default: the checkpoint's model_config.yaml)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--read-batch-mb", type=float, default=16.0,
                   help="MiB of tensor slices read per checkpoint pass (larger plain tensors are read in row blocks)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    from megatron_vespo.config import ConfigError, load_model_config

    try:
        convert_mcore_to_hf(
            args.ckpt, args.out,
            model_cfg=load_model_config(args.model_yaml) if args.model_yaml else None,
            tokenizer_dir=args.tokenizer_dir, dtype=parse_dtype(args.dtype) if args.dtype else None,
            max_shard_bytes=int(args.max_shard_size_gb * 1024**3), read_batch_bytes=int(args.read_batch_mb * 2**20),
            overwrite=args.overwrite, log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
