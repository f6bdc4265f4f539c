"""Typed view of SGLang's /generate response: samples, finish reasons, and strict parsing.

Parsing is strict on purpose: a response that lacks a field the trainer depends on (output token
ids, per-token log-probs, weight version) raises :class:`ResponseFormatError` naming the server and
the field, instead of letting a malformed sample reach the loss.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from rollout_sglang.errors import ResponseFormatError

FinishType = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class FinishReason:
    """Why generation ended: a stop token/string matched, the length budget ran out, or an abort."""

    type: FinishType
    matched: Any = None  # the stop token id (int) or stop string that ended a "stop"
    length: Optional[int] = None  # the budget that ended a "length"
    message: Optional[str] = None  # why an "abort" happened

    def to_json(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            out["matched"] = self.matched
        elif self.type == "length":
            out["length"] = self.length
        else:
            out["message"] = self.message or ""
        return out


def parse_finish_reason(raw: Any, server: str, field_name: str = "meta_info.finish_reason") -> FinishReason:
    """Parse SGLang's finish_reason dict (or None, which SGLang uses while a request is unfinished)."""
    if not isinstance(raw, dict) or "type" not in raw:
        raise ResponseFormatError(server, field_name, f"expected a dict with 'type'; got {raw!r:.120}")
    kind = raw["type"]
    if kind == "stop":
        return FinishReason("stop", matched=raw.get("matched"))
    if kind == "length":
        length = raw.get("length")
        if length is not None and not isinstance(length, int):
            raise ResponseFormatError(server, f"{field_name}.length", f"expected an integer; got {length!r:.60}")
        return FinishReason("length", length=length)
    if kind == "abort":
        return FinishReason("abort", message=str(raw.get("message", "")))
    raise ResponseFormatError(server, f"{field_name}.type", f"expected 'stop', 'length' or 'abort'; got {kind!r:.60}")


@dataclass
class Sample:
    """One generated response with what the trainer needs from the behaviour policy μ."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: Optional[list[float]]  # log μ of each output token (None if not requested)
    finish_reason: FinishReason
    weight_version: str
    prompt_tokens: int
    completion_tokens: int
    e2e_latency: float = 0.0
    routed_experts: Optional[np.ndarray] = None  # int32 (tokens, layers, topk) when requested
    server: str = ""
    meta_info: dict = field(default_factory=dict, repr=False)

    @property
    def aborted(self) -> bool:
        return self.finish_reason.type == "abort"


def _require(meta: dict, key: str, server: str, kinds: tuple[type, ...], prefix: str) -> Any:
    if key not in meta:
        raise ResponseFormatError(server, f"{prefix}{key}", "missing")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ResponseFormatError(server, f"{prefix}{key}", f"expected {'/'.join(k.__name__ for k in kinds)}; got {value!r:.80}")
    return value


def decode_routed_experts(raw: Any, server: str, num_tokens: int, shape: Optional[tuple[int, int]] = None,
                          partial: bool = False) -> np.ndarray:
    """Decode base64 int32 routed experts into (tokens, layers, topk); infer layers*topk if shape is None.

    ``partial`` (an aborted request): up to ``num_tokens`` rows; an abort that came before the prefill
    has none."""
    name = "meta_info.routed_experts"
    if not isinstance(raw, str):
        raise ResponseFormatError(server, name, f"expected a base64 string; got {type(raw).__name__}")
    try:
        flat = np.frombuffer(base64.b64decode(raw, validate=True), dtype=np.int32)
    except (ValueError, TypeError) as exc:
        raise ResponseFormatError(server, name, f"not base64 int32: {exc}") from None
    if shape is not None:
        per_token = shape[0] * shape[1]
        if partial and flat.size % per_token == 0 and flat.size <= num_tokens * per_token:
            return flat.reshape(-1, shape[0], shape[1])
        if flat.size != num_tokens * per_token:
            raise ResponseFormatError(server, name, f"{flat.size} ids, expected {num_tokens} tokens x {shape}")
        return flat.reshape(num_tokens, shape[0], shape[1])
    if partial and flat.size == 0:
        return flat.reshape(0, 1, 0)
    if num_tokens <= 0 or flat.size % num_tokens:
        raise ResponseFormatError(server, name, f"{flat.size} ids do not divide into {num_tokens} tokens")
    return flat.reshape(num_tokens, 1, flat.size // num_tokens)


def parse_generate_item(
    item: Any,
    *,
    server: str,
    rid: str,
    prompt_ids: list[int],
    expect_logprobs: bool,
    expect_routed_experts: bool = False,
    routed_experts_shape: Optional[tuple[int, int]] = None,
    index: Optional[int] = None,
) -> Sample:
    """Turn one element of a /generate response into a :class:`Sample`, validating every field used."""
    prefix = f"[{index}]." if index is not None else ""
    if not isinstance(item, dict):
        raise ResponseFormatError(server, prefix.rstrip(".") or "<body>", f"expected a JSON object; got {item!r:.80}")
    meta = item.get("meta_info")
    if not isinstance(meta, dict):
        raise ResponseFormatError(server, f"{prefix}meta_info", f"expected an object; got {meta!r:.80}")
    mp = f"{prefix}meta_info."
    finish = parse_finish_reason(meta.get("finish_reason"), server, f"{mp}finish_reason")
    completion_tokens = _require(meta, "completion_tokens", server, (int,), mp)
    prompt_tokens = _require(meta, "prompt_tokens", server, (int,), mp)
    version = meta.get("weight_version", "default")
    if not isinstance(version, (str, int)):
        raise ResponseFormatError(server, f"{mp}weight_version", f"expected a string; got {version!r:.60}")

    logprobs: Optional[list[float]] = None
    output_ids = item.get("output_ids")
    if expect_logprobs:
        pairs = meta.get("output_token_logprobs")
        if not isinstance(pairs, list):
            raise ResponseFormatError(server, f"{mp}output_token_logprobs", f"expected a list; got {pairs!r:.80}")
        logprobs, ids_from_logprobs = [], []
        for t, entry in enumerate(pairs):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise ResponseFormatError(server, f"{mp}output_token_logprobs[{t}]", f"expected [logprob, token_id, text]; got {entry!r:.60}")
            lp, tok = entry[0], entry[1]
            if isinstance(lp, bool) or not isinstance(lp, (int, float)) or math.isnan(lp) or lp > 1e-6:
                raise ResponseFormatError(server, f"{mp}output_token_logprobs[{t}][0]", f"not a log-probability: {lp!r:.40}")
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ResponseFormatError(server, f"{mp}output_token_logprobs[{t}][1]", f"not a token id: {tok!r:.40}")
            logprobs.append(float(lp))
            ids_from_logprobs.append(tok)
        if output_ids is None:
            output_ids = ids_from_logprobs
        elif list(output_ids) != ids_from_logprobs:
            raise ResponseFormatError(server, f"{prefix}output_ids", "disagree with the token ids in output_token_logprobs")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in output_ids):
        raise ResponseFormatError(server, f"{prefix}output_ids", f"expected a list of token ids; got {output_ids!r:.80}")
    if completion_tokens != len(output_ids):
        raise ResponseFormatError(server, f"{mp}completion_tokens", f"{completion_tokens} but {len(output_ids)} output ids")

    experts = None
    if expect_routed_experts and not (finish.type == "abort" and meta.get("routed_experts") is None):
        if "routed_experts" not in meta:
            raise ResponseFormatError(server, f"{mp}routed_experts", "missing (was the server started with routed experts enabled?)")
        experts = decode_routed_experts(meta["routed_experts"], server, prompt_tokens + completion_tokens - 1,
                                        routed_experts_shape, partial=finish.type == "abort")

    e2e = meta.get("e2e_latency", 0.0)
    return Sample(
        rid=rid, prompt_ids=list(prompt_ids), output_ids=list(output_ids), output_logprobs=logprobs,
        finish_reason=finish, weight_version=str(version), prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, e2e_latency=float(e2e) if isinstance(e2e, (int, float)) else 0.0,
        routed_experts=experts, server=server, meta_info=meta,
    )
