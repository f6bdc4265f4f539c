"""The driver's part of a training checkpoint as data: JSON plus a safetensors file, never a pickle.

A training checkpoint used to pickle the driver state (an unrestricted ``torch.load``), so a
checkpoint directory could run code on relaunch. Here the state is written as a JSON document whose
non-JSON values are tagged objects (``{"__t": kind, ...}``):

- ``tuple`` (e.g. ``random.getstate()``), ``bytes``, dicts whose keys are not all strings,
  non-finite floats;
- ``torch.Tensor`` and ``numpy.ndarray`` (e.g. buffered routed experts): stored in a separate
  safetensors file (pure data), referenced by name;
- dataclass instances (the asynchronous loop's buffered groups: ``FinishedGroup``,
  ``GroupPayload``, ``RolloutGroup``, ``PromptRow``, the fleet's ``Sample`` / ``FinishReason``):
  their fields, with the class named as ``module:QualName``. On load only dataclasses defined in
  this project's packages are rebuilt, through their constructor with the decoded fields; any
  other name is refused, and nothing is imported from outside these packages.

Anything else (an arbitrary object, a lambda, an object-dtype array) is refused when the
checkpoint is *saved*, naming where in the state it sits, so that a checkpoint that was written
can always be read back.
"""
from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_vespo.checkpoint.hf_io import CheckpointError

TAG = "__t"
# Dataclasses of these packages may be rebuilt from a checkpoint (the module part of the name must
# start with one of them); everything else is refused.
ALLOWED_PACKAGES = ("megatron_vespo.", "rollout_sglang.")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_module(module: str) -> bool:
    return any(module.startswith(p) for p in ALLOWED_PACKAGES)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor(self, tensor: torch.Tensor) -> str:
        name = f"t{len(self.tensors)}"
        # A private contiguous CPU copy: safetensors refuses views / shared storage.
        self.tensors[name] = tensor.detach().to("cpu").contiguous().clone()
        return name

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {TAG: "float", "v": repr(float(value))}
        if isinstance(value, np.generic) and not isinstance(value, np.object_):
            return self.encode(value.item(), where)
        if isinstance(value, (bytes, bytearray)):
            return {TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {TAG: "tuple", "v": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and TAG not in value:
                return {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}
            return {TAG: "dict", "v": [[self.encode(k, f"{where}<key>"), self.encode(v, f"{where}[{k!r}]")]
                                       for k, v in value.items()]}
        if isinstance(value, torch.Tensor):
            return {TAG: "tensor", "k": self._tensor(value)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise CheckpointError(f"{where}: a numpy array of Python objects cannot be stored in a training "
                                      "checkpoint (only numeric arrays)")
            try:
                tensor = torch.from_numpy(np.ascontiguousarray(value))
            except TypeError as exc:
                raise CheckpointError(f"{where}: numpy dtype {value.dtype} cannot be stored ({exc})") from None
            return {TAG: "ndarray", "k": self._tensor(tensor), "dtype": value.dtype.str}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            if not _allowed_module(cls.__module__) or "<locals>" in cls.__qualname__:
                raise CheckpointError(f"{where}: {_class_name(cls)} is not a dataclass of this project "
                                      f"({', '.join(p.rstrip('.') for p in ALLOWED_PACKAGES)}); a training "
                                      "checkpoint stores only plain data and those")
            fields = {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}")
                      for f in dataclasses.fields(value)}
            return {TAG: "dataclass", "type": _class_name(cls), "v": fields}
        raise CheckpointError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in a "
                              "training checkpoint (plain data, tensors, arrays and this project's dataclasses only)")


def _resolve_dataclass(name: str, where: str) -> type:
    """The project dataclass ``module:QualName`` names; CheckpointError for anything else."""
    module_name, _, qualname = name.partition(":")
    if not _allowed_module(module_name) or not qualname or "<" in qualname:
        raise CheckpointError(f"{where}: refers to {name!r}, which is not a dataclass of this project; not loaded")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{where}: class {name!r} not found ({exc})") from None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CheckpointError(f"{where}: {name!r} is not a dataclass; not loaded")
    return obj


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], source: str):
        self.tensors = tensors
        self.source = source

    def _tensor(self, key: Any, where: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: {where} refers to tensor {key!r}, which the tensor file lacks")
        return self.tensors[key]

    def decode(self, value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if TAG not in value:
            return {k: self.decode(v, f"{where}.{k}") for k, v in value.items()}
        kind = value[TAG]
        if kind == "tuple":
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(value["v"]))
        if kind == "dict":
            return {self.decode(k, f"{where}<key>"): self.decode(v, f"{where}[{k!r}]") for k, v in value["v"]}
        if kind == "bytes":
            return base64.b64decode(value["v"], validate=True)
        if kind == "float":
            if value["v"] not in ("nan", "inf", "-inf"):
                raise CheckpointError(f"{self.source}: {where}: bad float {value['v']!r}")
            return float(value["v"])
        if kind == "tensor":
            return self._tensor(value["k"], where)
        if kind == "ndarray":
            return np.asarray(self._tensor(value["k"], where).numpy(), dtype=np.dtype(value["dtype"]))
        if kind == "dataclass":
            cls = _resolve_dataclass(str(value["type"]), f"{self.source}: {where}")
            fields = {f.name: f for f in dataclasses.fields(cls)}
            saved = value["v"]
            unknown = sorted(set(saved) - set(fields))
            if unknown:
                raise CheckpointError(f"{self.source}: {where}: {value['type']} has no field(s) {unknown}")
            decoded = {k: self.decode(v, f"{where}.{k}") for k, v in saved.items()}
            obj = cls(**{k: v for k, v in decoded.items() if fields[k].init})
            for k, v in decoded.items():  # fields outside __init__ (object.__setattr__: frozen ones too)
                if not fields[k].init:
                    object.__setattr__(obj, k, v)
            return obj
        raise CheckpointError(f"{self.source}: {where}: unknown tagged value {kind!r}")


def write_state(value: Any, json_path: Path, tensors_path: Path, where: str = "state") -> list[Path]:
    """Write ``value`` as ``json_path`` (+ ``tensors_path`` when it holds tensors or arrays).
    Returns the files written. CheckpointError naming the place of a value that cannot be stored."""
    doc, tensors = encode_state(value, where)
    json_path.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n")
    written = [json_path]
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, str(tensors_path))
        written.append(tensors_path)
    return written


def encode_state(value: Any, where: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """``value`` as a JSON-able document and the tensors it refers to (see the module docstring)."""
    encoder = _Encoder()
    return encoder.encode(value, where), encoder.tensors


def decode_state(doc: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    """Inverse of :func:`encode_state`; ``source`` (the file) prefixes every error message."""
    return _Decoder(tensors, source).decode(doc, "state")


def read_state(json_path: Path, tensors_path: Optional[Path]) -> Any:
    """Inverse of :func:`write_state`; every failure is a one-line CheckpointError naming the file."""
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: not a readable state document ({type(exc).__name__}: {exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    if tensors_path is not None and tensors_path.exists():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensors_path))
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error types
            raise CheckpointError(f"{tensors_path}: not a readable safetensors file "
                                  f"({type(exc).__name__}: {exc})") from None
    try:
        return decode_state(doc, tensors, str(json_path))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{json_path}: malformed state document ({type(exc).__name__}: {exc})") from None
