"""Parameter counts of a Qwen3 / Qwen3-MoE model from its ModelConfig (Hugging Face tensor shapes).

Groups follow how Megatron-Core shards them, so the per-rank shards in ``memory.py`` can be derived:

- ``embedding`` / ``output``: vocabulary-parallel (split by TP; first / last pipeline stage). A tied
  output layer shares the embedding matrix (counted once in the total). Counted unpadded (the HF and
  published size); ``memory.py`` scales them to Megatron's padded vocabulary per TP.
- ``attention``: Q/K/V/O projections, split by TP.
- ``dense_mlp``: gate/up/down of dense layers, split by TP.
- ``experts``: gate/up/down of every routed expert, split by EP (experts) and ETP (each expert's FFN).
- ``replicated``: RMSNorm weights (layer norms, per-head q/k norms, final norm) and the router
  (Megatron keeps the router weight whole on every TP rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_vespo.config.schema import ModelConfig
from megatron_vespo.models.layout import moe_layer_pattern


@dataclass(frozen=True)
class ParamCount:
    """Counts per group for the whole model and per layer; ``active`` is what one token touches."""

    embedding: int
    output: int  # 0 when tied to the embedding
    attention_per_layer: int
    norms_per_layer: int
    router_per_layer: int  # 0 for dense layers
    dense_mlp_per_layer: int
    expert_per_expert: int
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    final_norm: int

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def experts(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_per_expert

    @property
    def attention(self) -> int:
        return self.num_layers * self.attention_per_layer

    @property
    def dense_mlp(self) -> int:
        return self.num_dense_layers * self.dense_mlp_per_layer

    @property
    def replicated(self) -> int:
        return self.num_layers * self.norms_per_layer + self.num_moe_layers * self.router_per_layer + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.attention + self.dense_mlp + self.experts + self.replicated

    @property
    def active(self) -> int:
        """Parameters used per token: everything except the experts a token is not routed to."""
        inactive = self.num_moe_layers * (self.num_experts - self.top_k) * self.expert_per_expert
        return self.total - inactive


def count_params(model: ModelConfig) -> ParamCount:
    h, d = model.hidden_size, model.kv_channels
    q_out = model.num_attention_heads * d
    kv_out = model.num_key_value_heads * d
    bias = int(model.attention_bias)
    attention = h * q_out + 2 * h * kv_out + q_out * h + bias * (q_out + 2 * kv_out)
    norms = 2 * h + (2 * d if model.qk_layernorm else 0)  # input + post-attention RMSNorm (+ q/k norms)
    pattern = moe_layer_pattern(model)
    num_moe = sum(pattern)
    embedding = model.vocab_size * h
    return ParamCount(
        embedding=embedding,
        output=0 if model.tie_word_embeddings else embedding,
        attention_per_layer=attention,
        norms_per_layer=norms,
        router_per_layer=h * model.num_experts if model.is_moe else 0,
        dense_mlp_per_layer=3 * h * model.intermediate_size,  # gate, up, down (SwiGLU)
        expert_per_expert=3 * h * model.moe_intermediate_size if model.is_moe else 0,
        num_layers=model.num_hidden_layers,
        num_moe_layers=num_moe,
        num_experts=model.num_experts if model.is_moe else 0,
        top_k=model.num_experts_per_tok if model.is_moe else 0,
        final_norm=h,
    )
