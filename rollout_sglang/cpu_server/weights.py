"""Load tensors named as in a Hugging Face checkpoint into an in-memory transformers model.

Checkpoints (and weight-sync senders) use per-expert keys, e.g.
``model.layers.0.mlp.experts.3.gate_proj.weight``, while transformers 5 holds a Qwen3-MoE layer's
experts fused: ``mlp.experts.gate_up_proj[e] = cat(gate_proj, up_proj)`` and
``mlp.experts.down_proj[e] = down_proj``. This module maps the former onto the latter.

Loading is two-phase so that an update is all-or-nothing: :func:`stage_hf_named_tensors` checks every
tensor (name, shape, dtype conversion) without touching the model, :func:`commit_staged` then puts
same-shape, same-dtype tensors in place. A received tensor that fills a whole parameter becomes that
parameter's storage (no copy; the old storage is handed back for the next update to receive into);
a slice of a fused parameter, or a tensor the caller still holds, is copied.
"""
from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def weight_destination(model: torch.nn.Module, name: str, params: dict | None = None) -> torch.Tensor | None:
    """The tensor (a parameter or a view of a fused one) that checkpoint tensor ``name`` fills.

    Returns None for a tied ``lm_head.weight`` (it arrives as the embedding); raises ValueError for
    names the model does not have.
    """
    params = dict(model.named_parameters()) if params is None else params
    if name in params:
        return params[name].data
    m = _EXPERT_KEY.match(name)
    if m is not None:
        fused_name = f"{m['prefix']}.down_proj" if m["proj"] == "down_proj" else f"{m['prefix']}.gate_up_proj"
        if fused_name not in params:
            raise ValueError(f"weight {name!r}: the model has no fused expert parameter {fused_name!r}")
        fused = params[fused_name].data
        expert = int(m["expert"])
        if not 0 <= expert < fused.shape[0]:
            raise ValueError(f"weight {name!r}: expert {expert} outside [0, {fused.shape[0]})")
        if m["proj"] == "down_proj":
            return fused[expert]
        half = fused.shape[1] // 2
        return fused[expert][:half] if m["proj"] == "gate_proj" else fused[expert][half:]
    if getattr(model.config, "tie_word_embeddings", False) and name == "lm_head.weight":
        return None
    raise ValueError(f"weight {name!r}: not a parameter of {type(model).__name__}")


@dataclass
class StagedTensor:
    """One checked tensor of an update: where it goes and the value (already in the destination's dtype)."""

    name: str
    destination: torch.Tensor  # a parameter's data, or a view of a fused one
    value: torch.Tensor
    whole: Optional[torch.nn.Parameter] = None  # the parameter, when the value fills all of it


Staged = list[StagedTensor]


@torch.no_grad()
def stage_hf_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]],
                           params: dict | None = None) -> tuple[Staged, int]:
    """Check every (HF checkpoint name, tensor) against ``model`` and convert it to its destination's
    dtype, without writing the model. Returns the staged tensors and how many tensors were given.

    Raises ValueError naming the first unknown name, non-tensor or mismatched shape; whatever
    ``named_tensors`` raises (a missing or corrupt file) propagates. Either way the model is untouched.
    """
    params = dict(model.named_parameters()) if params is None else params
    staged: Staged = []
    count = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"weight {name!r}: expected a tensor; got {type(tensor).__name__}")
        dst = weight_destination(model, name, params)
        count += 1
        if dst is None:  # a tied lm_head: it arrives as the embedding
            continue
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match the model's {tuple(dst.shape)}")
        staged.append(StagedTensor(name, dst, tensor.to(dtype=dst.dtype), params.get(name)))
    return staged, count


@torch.no_grad()
def commit_staged(staged: Staged, adopt: bool = False) -> dict[str, torch.Tensor]:
    """Write staged tensors into the model (same shapes and dtypes: nothing here can fail half-way).

    ``adopt`` (for values nobody else holds, such as a received update): a contiguous value that
    fills a whole parameter becomes its storage instead of being copied (the parameter object
    stays, so tied weights and the model's references follow). Returns, by name, the buffers this
    freed (a retired storage, or a value that was copied): free to receive the next update of that
    name into. Without ``adopt`` every value is copied and nothing is returned."""
    retired: dict[str, torch.Tensor] = {}
    for item in staged:
        param = item.whole
        if adopt and param is not None and item.value.is_contiguous() and item.value.dtype == param.dtype:
            retired[item.name] = param.data
            param.data = item.value
            continue
        item.destination.copy_(item.value)
        if adopt and item.value.is_contiguous():
            retired[item.name] = item.value
    return retired


def load_hf_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load each (HF checkpoint name, tensor) into ``model``, all or nothing; returns how many were given.

    Raises ValueError naming the first unknown key or mismatched shape, with the model unchanged.
    """
    staged, count = stage_hf_named_tensors(model, named_tensors)
    commit_staged(staged)
    return count


def iter_safetensors_dir(path: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of every ``*.safetensors`` file in an HF model directory."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for file in files:
        yield from load_file(str(file)).items()
