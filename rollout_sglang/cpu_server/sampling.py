"""Token sampling with SGLang semantics, vectorised over a batch with one RNG per sequence.

The returned log-prob of a sampled token is log_softmax(logits / temperature) *before* top-k/top-p
filtering (what SGLang reports and what the trainer uses as log μ). A temperature below 1e-6 means
greedy (SGLang's rule), and then the log-prob is the plain log_softmax(logits).

Parameters are validated at the HTTP boundary with SGLang 0.5.23's rules (``SamplingParams.from_json``),
and sampling isolates rows (``sample_tokens(..., errors=)``), so one request's bad numbers can never
fail another request that shares its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

# SGLang 0.5.23 (sampling_params.py, _SAMPLING_EPS): a temperature in [0, 1e-6) means greedy.
GREEDY_TEMPERATURE = 1e-6
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # SGLang's sampling_seed bounds

# Parameters SGLang honours that the CPU server does not implement: accepted only at the value that
# makes them a no-op (after SGLang's own range check, so a value SGLang refuses is refused here too).
_NEUTRAL = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
            "min_new_tokens": 0}
# SGLang fields without a CPU implementation whose "unset" spellings are accepted (SGLang maps an empty
# grammar to None and ignores an empty logit_bias / stop list); anything else is refused.
_UNSET_ONLY = {"stop": ([],), "stop_regex": ([],), "json_schema": ("",), "regex": ("",), "ebnf": ("",),
               "structural_tag": ("",), "logit_bias": ({},), "custom_params": ({},), "beam_width": (),
               "stream_interval": (), "watermark": ()}


class _Invalid(ValueError):
    pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    """A JSON number (not a bool: SGLang's Python happens to take True as 1, which no client means)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{name}: expected a number; got {value!r:.80}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range: SGLang compares it as an int; it is out of range anyway
        return math.inf if value > 0 else -math.inf


def _integer(name: str, value: Any) -> int:
    if not _is_int(value):
        raise _Invalid(f"{name}: expected an integer; got {value!r:.80}")
    return value


@dataclass
class SamplingParams:
    """The subset of SGLang's sampling_params that the CPU server honours.

    ``max_new_tokens`` None means "up to the context length" (SGLang's meaning of null); the HTTP layer
    resolves it per prompt. ``max_new_tokens_explicit`` records whether the client gave an integer:
    SGLang refuses an explicit budget that overflows the context and silently clips its default one.
    """

    max_new_tokens: Optional[int] = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k filtering; any k >= vocab size means the same
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    sampling_seed: Optional[int] = None
    max_new_tokens_explicit: bool = False

    @classmethod
    def from_json(cls, raw: Any, where: str = "sampling_params") -> "SamplingParams":
        """Validate a request's sampling_params; raises ValueError naming the bad field (``where.<key>``).

        Accepts exactly what SGLang 0.5.23's ``SamplingParams(**raw).verify()`` accepts (null means the
        default; NaN/inf and out-of-range values are refused), except that types are strict (a bool or
        a float where SGLang documents an integer is refused) and parameters the CPU server does not
        implement are accepted only at their no-op value. tests/sglang_contract checks this against
        SGLang's own code.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object; got {type(raw).__name__}")
        out = cls()
        if "max_new_tokens" in raw and raw["max_new_tokens"] is None:
            out.max_new_tokens = None  # SGLang: no budget of its own, the context length bounds it
        given = {k: v for k, v in raw.items() if v is not None}  # SGLang: null means "use the default"
        for key, value in given.items():
            name = f"{where}.{key}"
            if key == "max_new_tokens":
                out.max_new_tokens = _integer(name, value)
                if value < 0:
                    raise _Invalid(f"{name}: must be at least 0; got {value}")
                out.max_new_tokens_explicit = True
            elif key == "temperature":
                t = _number(name, value)
                if not math.isfinite(t) or t < 0:
                    raise _Invalid(f"{name}: must be a non-negative finite number; got {value!r}")
                out.temperature = t
            elif key == "top_p":
                p = _number(name, value)
                if not 0.0 < p <= 1.0:  # also refuses NaN
                    raise _Invalid(f"{name}: must be in (0, 1]; got {value!r}")
                out.top_p = p
            elif key == "top_k":
                k = _integer(name, value)
                if k < 1 and k != -1:
                    raise _Invalid(f"{name}: must be -1 (disable) or at least 1; got {k}")
                out.top_k = k
            elif key == "n":
                n = _integer(name, value)
                if n < 1:
                    raise _Invalid(f"{name}: must be at least 1; got {n}")
                out.n = n
            elif key == "sampling_seed":
                seed = _integer(name, value)
                if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                    raise _Invalid(f"{name}: must be in [-2**63, 2**63 - 1]; got {seed}")
                out.sampling_seed = seed
            elif key in ("ignore_eos", "no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens"):
                if not isinstance(value, bool):
                    raise _Invalid(f"{name}: expected true/false; got {value!r:.80}")
                if key != "spaces_between_special_tokens":  # text detokenisation detail; ids are the API here
                    setattr(out, key, value)
            elif key == "stop_token_ids":
                if not isinstance(value, list) or not all(_is_int(t) or t is None for t in value):
                    raise _Invalid(f"{name}: expected a list of token ids; got {value!r:.80}")
                out.stop_token_ids = frozenset(t for t in value if t is not None)  # SGLang drops nulls
            elif key in _NEUTRAL:
                _check_unimplemented(name, key, value, raw)
            elif key in _UNSET_ONLY:
                if not any(type(value) is type(u) and value == u for u in _UNSET_ONLY[key]):
                    raise _Invalid(f"{name}: not supported by the CPU rollout server (got {value!r:.60})")
            else:
                raise _Invalid(f"{name}: unknown sampling parameter")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _check_unimplemented(name: str, key: str, value: Any, raw: dict) -> None:
    """SGLang's range for ``key`` first (so both refuse the same values), then only its no-op value."""
    if key == "min_new_tokens":
        v = _integer(name, value)
        max_new = raw.get("max_new_tokens", 128)  # SGLang checks against its default budget too
        if v < 0 or (_is_int(max_new) and v > max_new):
            raise _Invalid(f"{name}: must be in [0, max_new_tokens]; got {v}")
    else:
        v = _number(name, value)
        low, high, low_open = {"min_p": (0.0, 1.0, False), "frequency_penalty": (-2.0, 2.0, False),
                               "presence_penalty": (-2.0, 2.0, False), "repetition_penalty": (0.0, 2.0, True)}[key]
        if not ((low < v if low_open else low <= v) and v <= high):
            raise _Invalid(f"{name}: must be in {'(' if low_open else '['}{low:g}, {high:g}]; got {value!r}")
    if v != _NEUTRAL[key]:
        raise _Invalid(f"{name}: not supported by the CPU rollout server (only {_NEUTRAL[key]!r}; got {value!r:.60})")


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    errors: Optional[dict[int, str]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. Returns (token ids [B], log-probs of those tokens [B], float32).

    Without ``errors`` any failure raises. With it, a row that cannot be sampled (its logits or
    parameters make the maths fail, or give a non-finite log-prob) is recorded as ``errors[row] =
    message`` (its token is a placeholder 0) and every other row is sampled as if that row were not in
    the batch: each row has its own generator and the maths is row-wise.
    """
    try:
        prepared = _prepare(logits, params)
    except Exception as exc:  # noqa: BLE001 - isolated below, or re-raised
        if errors is None:
            raise
        if len(params) == 1:
            errors[0] = f"{type(exc).__name__}: {exc}"
            return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float32)
        # One row broke the batched maths; no randomness was drawn yet, so each row alone is exact.
        tokens = torch.zeros(len(params), dtype=torch.long)
        chosen = torch.zeros(len(params), dtype=torch.float32)
        for row in range(len(params)):
            row_errors: dict[int, str] = {}
            tok, lp = sample_tokens(logits[row:row + 1], params[row:row + 1], generators[row:row + 1], row_errors)
            if row_errors:
                errors[row] = row_errors[0]
            tokens[row], chosen[row] = tok[0], lp[0]
        return tokens, chosen
    logprobs, sorted_probs, sorted_idx = prepared
    tokens = torch.zeros(len(params), dtype=torch.long)
    for row, p in enumerate(params):
        try:
            if p.greedy:
                tokens[row] = int(torch.argmax(logits[row]))
            else:
                choice = torch.multinomial(sorted_probs[row], 1, generator=generators[row])
                tokens[row] = sorted_idx[row, choice[0]]
        except RuntimeError as exc:  # e.g. "probability tensor contains either inf, nan or element < 0"
            if errors is None:
                raise
            errors[row] = f"{type(exc).__name__}: {exc}"
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    if errors is not None:
        for row in torch.nonzero(~torch.isfinite(chosen)).flatten().tolist():
            errors.setdefault(row, "non-finite log-prob: the model produced inf/nan logits for this sequence")
    return tokens, chosen


def _prepare(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise maths: log-probs at each row's temperature, and the top-k/top-p filtered, sorted probabilities."""
    logits = logits.float()
    vocab = logits.shape[1]
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)  # reported before filtering (SGLang semantics)

    probs = logprobs.exp()
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    # A k beyond the vocabulary keeps everything (SGLang's -1 is 1 << 30); clamping also keeps huge k in int64.
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    # Keep the k most likely tokens, and the smallest prefix whose mass reaches top_p.
    exclusive_cumsum = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (ranks >= top_k[:, None]) | (exclusive_cumsum >= top_p[:, None])
    drop[:, 0] = False
    return logprobs, sorted_probs.masked_fill(drop, 0.0), sorted_idx
