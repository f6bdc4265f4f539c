"""Strict construction of typed dataclasses from plain mappings (parsed YAML).

A leaf package with no dependency on the project's others: the trainer's config tree
(``megatron_vespo.config``) and the rollout fleet's (``rollout_sglang.config``) are both built with it.
Every config class is a dataclass whose fields carry type hints and, where a range
matters, bounds declared with :func:`field`. :func:`build` turns a mapping into such a dataclass and
fails with a one-line :class:`ConfigError` naming the dotted field path when a key is unknown, a
value has the wrong type, lies outside its bounds, or is not one of the allowed names. After the
tree is built, every dataclass's optional ``validate(path)`` hook runs for cross-field rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported as ``<field.path>: <what is wrong>``."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def field(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with numeric bounds and a help string (used by the config reference)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {_describe(value)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be {_type_name(tp)}; got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}; got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping; got {_describe(value)}")
        return _build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list; got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping; got {_describe(value)}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false; got {_describe(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer; got {_describe(value)}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept numeric strings for float fields.
        if isinstance(value, bool):
            raise ConfigError(path, f"must be a number; got {_describe(value)}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"must be a number; got {_describe(value)}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number; got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite; got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string; got {_describe(value)}")
        return value
    raise TypeError(f"{path}: unsupported config type {tp!r}")  # programming error, not user input


def _check_bounds(meta: Mapping[str, Any], value: Any, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if meta.get("ge") is not None and not value >= meta["ge"]:
        raise ConfigError(path, f"must be >= {meta['ge']}; got {value}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise ConfigError(path, f"must be > {meta['gt']}; got {value}")
    if meta.get("le") is not None and not value <= meta["le"]:
        raise ConfigError(path, f"must be <= {meta['le']}; got {value}")
    if meta.get("lt") is not None and not value < meta["lt"]:
        raise ConfigError(path, f"must be < {meta['lt']}; got {value}")


def _build(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(fields)}"
            raise ConfigError(_join(path, str(key)), f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data:
            value = _coerce(hints[name], data[name], fpath)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            raise ConfigError(fpath, f"is required ({_type_name(hints[name])})")
        _check_bounds(f.metadata, value, fpath)
        kwargs[name] = value
    return cls(**kwargs)


def _validate_tree(obj: Any, path: str) -> None:
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _validate_tree(item, f"{path}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            _validate_tree(item, _join(path, str(key)))
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate_tree(getattr(obj, f.name), _join(path, f.name))
    hook = getattr(obj, "validate", None)
    if callable(hook):
        hook(path)


def build(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` from ``data`` strictly, then run every ``validate(path)`` hook in the tree."""
    obj = _build(cls, data or {}, path)
    _validate_tree(obj, path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (for logging and for saving next to checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type, path: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, help) rows for every leaf field: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        fpath = _join(path, f.name)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp) or (len(inner) == 1 and dataclasses.is_dataclass(inner[0])):
            rows.extend(describe_fields(tp if dataclasses.is_dataclass(tp) else inner[0], fpath))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        bounds = " ".join(
            f"{op}{f.metadata[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if f.metadata.get(k) is not None
        )
        help_text = f.metadata.get("help", "")
        if bounds:
            help_text = f"{help_text} ({bounds})".strip()
        rows.append((fpath, _type_name(tp), default, help_text))
    return rows
