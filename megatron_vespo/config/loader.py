"""Load a run YAML (which names a model YAML), apply ``a.b=value`` overrides, build and validate."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from megatron_vespo.config.schema import ModelConfig, RunConfig
from typed_config import ConfigError, build

REPO_ROOT = Path(__file__).resolve().parents[2]


def _read_yaml(path: Path, field_path: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(field_path, f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:  # the bare error names neither the file nor the line
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise ConfigError(field_path, f"{path} line {line} is not valid UTF-8 "
                          f"({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(field_path, f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(field_path, f"{path} must hold a mapping at top level; got {type(data).__name__}")
    return data


def _resolve_model_path(name: str, run_dir: Path | None) -> Path:
    """A model path is tried relative to the run YAML's folder, the working directory, the repo."""
    candidate = Path(os.path.expanduser(name))
    if candidate.is_absolute():
        return candidate
    for base in ([run_dir] if run_dir else []) + [Path.cwd(), REPO_ROOT]:
        if (base / candidate).is_file():
            return base / candidate
    return (run_dir or Path.cwd()) / candidate


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("", f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each override into a copy of ``data``; unknown keys are caught later by the typed build."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is not a mapping, cannot set {'.'.join(parts)}")
            node = nxt
        node[parts[-1]] = value
    return data


def load_model_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelConfig:
    data = apply_overrides(_read_yaml(Path(path), "model"), overrides)
    return build(ModelConfig, data, "model")


def resolve_run_dict(data: Mapping[str, Any], run_dir: Path | None = None,
                     overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Inline the model YAML named by ``model`` and apply overrides (model.* overrides included)."""
    data = dict(data)
    overrides = list(overrides)
    # A `model=path` override replaces the file before the model's own field overrides apply.
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["model"]:
            data["model"] = value
    overrides = [o for o in overrides if parse_override(o)[0] != ["model"]]
    model = data.get("model")
    if model is None:
        raise ConfigError("model", "is required: the path of a model YAML (e.g. configs/models/tiny_moe.yaml)")
    if isinstance(model, str):
        data["model"] = _read_yaml(_resolve_model_path(model, run_dir), "model")
    elif not isinstance(model, Mapping):
        raise ConfigError("model", f"must be a path to a model YAML or a mapping; got {model!r}")
    return apply_overrides(data, overrides)


def load_run_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                    data: Mapping[str, Any] | None = None) -> RunConfig:
    """The one entry point: file (or mapping) + overrides -> validated RunConfig, or ConfigError."""
    run_dir = None
    if path is not None:
        path = Path(path)
        data = _read_yaml(path, "run")
        run_dir = path.parent
    resolved = resolve_run_dict(data or {}, run_dir, overrides)
    return build(RunConfig, resolved)
