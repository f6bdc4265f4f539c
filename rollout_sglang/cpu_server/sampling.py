"""Token sampling with SGLang semantics, vectorised over a batch with one RNG per sequence.

The returned log-prob of a sampled token is log_softmax(logits / temperature) *before* top-k/top-p
filtering (what SGLang reports and what the trainer uses as log μ). Temperature 0 means greedy, and
then the log-prob is the plain log_softmax(logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """The subset of SGLang's sampling_params that the CPU server honours."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filtering
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    sampling_seed: Optional[int] = None

    @classmethod
    def from_json(cls, raw: Any) -> "SamplingParams":
        """Validate a request's sampling_params; raises ValueError naming the bad field."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"sampling_params: expected an object; got {type(raw).__name__}")
        out = cls()
        ints = {"max_new_tokens": 0, "top_k": -1, "n": 1}
        floats = {"temperature": 0.0, "top_p": 1e-9}
        bools = ("ignore_eos", "no_stop_trim", "skip_special_tokens")
        for key, value in raw.items():
            name = f"sampling_params.{key}"
            if value is None:
                continue
            if key in ints:
                if isinstance(value, bool) or not isinstance(value, int) or value < ints[key]:
                    raise ValueError(f"{name}: expected an integer >= {ints[key]}; got {value!r}")
                setattr(out, key, value)
            elif key in floats:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < floats[key]:
                    raise ValueError(f"{name}: expected a number >= {floats[key]}; got {value!r}")
                if key == "top_p" and value > 1:
                    raise ValueError(f"{name}: must be in (0, 1]; got {value!r}")
                setattr(out, key, float(value))
            elif key in bools:
                if not isinstance(value, bool):
                    raise ValueError(f"{name}: expected true/false; got {value!r}")
                setattr(out, key, value)
            elif key == "stop_token_ids":
                if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                    raise ValueError(f"{name}: expected a list of token ids; got {value!r:.80}")
                out.stop_token_ids = list(value)
            elif key == "sampling_seed":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name}: expected an integer; got {value!r}")
                out.sampling_seed = value
            elif key in ("stop", "min_new_tokens", "repetition_penalty", "frequency_penalty", "presence_penalty"):
                # Accepted for API compatibility only when they are no-ops.
                if value not in ([], "", 0, 0.0, 1.0):
                    raise ValueError(f"{name}: not supported by the CPU rollout server (got {value!r:.60})")
            else:
                raise ValueError(f"{name}: unknown sampling parameter")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. Returns (token ids [B], log-probs of those tokens [B], float32)."""
    logits = logits.float()
    batch, vocab = logits.shape
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)  # reported before filtering (SGLang semantics)

    probs = logprobs.exp()
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    # Keep the k most likely tokens, and the smallest prefix whose mass reaches top_p.
    exclusive_cumsum = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (ranks >= top_k[:, None]) | (exclusive_cumsum >= top_p[:, None])
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)

    tokens = torch.empty(batch, dtype=torch.long)
    for row, p in enumerate(params):
        if p.greedy:
            tokens[row] = int(torch.argmax(logits[row]))
        else:
            choice = torch.multinomial(sorted_probs[row], 1, generator=generators[row])
            tokens[row] = sorted_idx[row, choice[0]]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen
