"""Initial policy weights for a run: a Megatron dist checkpoint (from ``tools/convert_hf_to_mcore.py``)
or a Hugging Face directory, loaded into whatever TP/PP/EP layout the run uses.

An HF directory is converted once, by rank 0, into ``<cache_dir>/<name>_mcore`` (the streaming
converter; bounded memory), then every rank loads only its own shards with
``dist_checkpointing.load``. Weights are loaded before the bf16 wrapper and the optimizer exist, so
the optimizer's fp32 main copy starts from them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_vespo.checkpoint.hf_io import CheckpointError, MODEL_CONFIG_FILE, load_checkpoint_model_config
from megatron_vespo.config.schema import ModelConfig, RunConfig


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "metadata.json").is_file()


def check_same_model(found: ModelConfig, expected: ModelConfig, where: str) -> None:
    """Clear error listing the architecture fields in which a checkpoint differs from the run's model."""
    # Not compared: run settings, and the vocabulary padding (Megatron loads the vocabulary tensors
    # whatever their padded row count: allow_shape_mismatch).
    diff = [f"{f.name}: checkpoint {getattr(found, f.name)!r} != run {getattr(expected, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in ("max_position_embeddings", "router_aux_loss_coef", "make_vocab_size_divisible_by")
            and getattr(found, f.name) != getattr(expected, f.name)]
    if diff:
        raise CheckpointError(f"{where}: the checkpoint's model does not match the run's model YAML: " + "; ".join(diff))


def init_source_is_hf(src: Path, field: str = "checkpoint.init_from") -> bool:
    """Whether ``src`` (the config ``field`` naming initial weights: ``checkpoint.init_from``,
    ``loss.kl.reference``) is a Hugging Face directory (else a converted Megatron checkpoint);
    CheckpointError when it is neither."""
    if not src.is_dir():
        raise CheckpointError(f"{field}: {src} is not a directory")
    if is_hf_dir(src):
        return True
    if not (src / MODEL_CONFIG_FILE).is_file():
        raise CheckpointError(f"{field}: {src} is neither a Hugging Face directory (config.json) "
                              f"nor a converted Megatron checkpoint ({MODEL_CONFIG_FILE} missing)")
    return False


def resolve_init_checkpoint(path: str, model_cfg: ModelConfig, cache_dir: Path,
                            field: str = "checkpoint.init_from") -> Path:
    """The dist checkpoint to load: ``path`` itself, or (HF input) its conversion under ``cache_dir``.
    ``field`` names the config field ``path`` came from in errors.

    Collective when ``torch.distributed`` is initialised: rank 0 converts, the others wait.
    """
    import torch.distributed as dist

    from megatron_vespo.checkpoint.hf_to_mcore import convert_hf_to_mcore

    src = Path(path)
    if not init_source_is_hf(src, field):
        return src
    out = cache_dir / f"{src.name}_mcore"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not out.is_dir():
        print(f"[init] converting {src} -> {out} (once; reused by later runs)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_hf_to_mcore(src, out, model_cfg)
    if dist.is_initialized():
        dist.barrier()
    return out


def run_init_checkpoint(cfg: RunConfig) -> Optional[Path]:
    """The dist checkpoint a run starts from per ``checkpoint.init_from`` (an HF directory is converted
    once, under the run's checkpoint root), or None: nothing named, or the run resumes a training
    checkpoint, whose weights replace these anyway. Collective (see :func:`resolve_init_checkpoint`)."""
    from megatron_vespo.checkpoint.training import checkpoint_root, find_resume_checkpoint

    if not cfg.checkpoint.init_from or find_resume_checkpoint(cfg) is not None:
        return None
    return resolve_init_checkpoint(cfg.checkpoint.init_from, cfg.model, checkpoint_root(cfg) / "init")


def load_model_weights(chunks: Sequence[torch.nn.Module], ckpt_dir: Path, model_cfg: ModelConfig) -> None:
    """Load this rank's shards of ``ckpt_dir`` into the (unwrapped) model chunks. Collective."""
    from megatron.core import dist_checkpointing

    check_same_model(load_checkpoint_model_config(ckpt_dir), model_cfg, str(ckpt_dir))
    for chunk in chunks:
        state = dist_checkpointing.load(chunk.sharded_state_dict(), str(ckpt_dir))
        missing, unexpected = chunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt_dir}: keys missing {missing[:5]} / unexpected {unexpected[:5]}")
