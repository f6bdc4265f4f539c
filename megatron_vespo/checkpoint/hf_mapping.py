"""One declarative table between Hugging Face Qwen3 / Qwen3-MoE weights and Megatron-Core's.

The Megatron side is the *canonical* naming of distributed checkpointing (the keys and global shapes
of ``model.sharded_state_dict()``, see :mod:`megatron_vespo.models.full_state`), which is the same
for every TP/PP/EP layout. The HF side is the naming of the safetensors **files** (per-expert keys
``mlp.experts.{e}.gate_proj.weight``; transformers 5 fuses experts only in memory).

:data:`RULES` is the table. Each rule relates one Megatron tensor of a layer (or of the model) to a
group of HF tensors and names how they combine:

- ``COPY``: one HF tensor is the Megatron tensor;
- ``QKV``: HF ``q, k, v`` -> Megatron ``linear_qkv`` interleaved per query group: for each group
  ``g``, the ``heads/groups`` query heads of ``g``, then ``k_g``, then ``v_g`` (rows of head_dim);
- ``GATE_UP``: HF ``gate, up`` -> Megatron SwiGLU ``linear_fc1`` = ``[gate; up]`` (the first half of
  fc1's output goes through SiLU).

:class:`Qwen3Mapping` expands the table for one :class:`ModelConfig` into :class:`Unit` s: one
Megatron tensor *slice* (a layer of a layer-stacked key, an expert of an expert-stacked key) and
its HF tensors. Conversion and weight export work one unit at a time, so memory stays bounded by
the largest unit whatever the model size.

Facts about Megatron-Core's canonical keys this module encodes (checked against the real model in
``tests/unit/test_hf_mapping.py``):

- layer norms live under the linear layer they precede (``linear_qkv.layer_norm_weight``,
  ``mlp.linear_fc1.layer_norm_weight``): the local spec maps its ``input_layernorm`` /
  ``pre_mlp_layernorm`` there, the TE spec fuses them;
- **except** the pre-MLP norm of MoE layers in the TE spec, a separate ``TENorm`` whose key is
  ``pre_mlp_layernorm.weight`` (no key map). Checkpoints therefore carry that norm under both
  keys (:attr:`Unit.aliases`) so they load with either spec;
- the layers of a homogeneous model (our dense Qwen3) are stacked into one key per tensor with a
  leading layer axis (``decoder.layers.mlp.linear_fc1.weight``: ``[L, 2F, H]``); a MoE model
  (``moe_layer_freq`` given as a list) has per-layer keys (``decoder.layers.3.…``);
- experts are stacked along a leading expert axis (``…mlp.experts.experts.linear_fc1.weight``:
  ``[E, 2F, H]``), the same for SequentialMLP and TEGroupedMLP;
- the embedding and output layer hold the vocabulary *padded* to a multiple of
  ``make_vocab_size_divisible_by * TP`` (Megatron-LM's rule; :meth:`ModelConfig.padded_vocab_size`):
  :meth:`Qwen3Mapping.dist_tensors` gives their padded global shape for the mapping's
  ``tensor_parallel``, while units and HF tensors keep the real ``vocab_size`` rows (conversion pads
  with zero rows on the way in and reads only the real rows on the way out). Megatron marks these
  two tensors ``allow_shape_mismatch``, so a checkpoint padded for one TP loads at any other;
- linear layers carry an ``_extra_state`` sharded object (``None`` without FP8) that a
  checkpoint must hold for ``dist_checkpointing.load`` to accept it (:meth:`Qwen3Mapping.extra_states`).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from megatron_vespo.config.schema import ModelConfig
from megatron_vespo.models.full_state import VOCAB_KEYS  # tensors whose rows are the (padded) vocabulary
from megatron_vespo.models.layout import moe_layer_pattern


class MappingError(ValueError):
    """A tensor that does not fit the mapping (unknown name, wrong shape or dtype)."""


class Transform(enum.Enum):
    COPY = "copy"
    QKV = "qkv"
    GATE_UP = "gate_up"


class Scope(enum.Enum):
    """Where a rule repeats: once per model, per layer, per dense-MLP layer, per MoE layer, per expert."""

    MODEL = "model"
    LAYER = "layer"
    DENSE_MLP = "dense_mlp"
    MOE = "moe"
    EXPERT = "expert"


@dataclass(frozen=True)
class Rule:
    """``megatron`` <- ``hf`` by ``transform``. Templates use ``{layer}`` and ``{expert}``; HF shapes
    are named dimensions (see :meth:`Qwen3Mapping._dims`)."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[str, ...], ...]
    transform: Transform = Transform.COPY
    scope: Scope = Scope.MODEL
    when: Optional[str] = None  # a ModelConfig condition: see Qwen3Mapping._condition
    has_extra_state: bool = False  # the Megatron module is a linear layer with an _extra_state
    moe_alias: Optional[str] = None  # extra key of the same tensor in MoE layers (TE spec)


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."

RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),)),
    Rule(_M + "self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), (("hidden",),),
         scope=Scope.LAYER),
    Rule(_M + "self_attention.linear_qkv.weight",
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
         (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
         Transform.QKV, Scope.LAYER, has_extra_state=True),
    Rule(_M + "self_attention.linear_qkv.bias",
         (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
         (("q",), ("kv",), ("kv",)), Transform.QKV, Scope.LAYER, when="attention_bias"),
    Rule(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), (("head_dim",),),
         scope=Scope.LAYER, when="qk_layernorm"),
    Rule(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), (("head_dim",),),
         scope=Scope.LAYER, when="qk_layernorm"),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), (("hidden", "q"),),
         scope=Scope.LAYER, has_extra_state=True),
    Rule(_M + "mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), (("hidden",),),
         scope=Scope.LAYER, moe_alias=_M + "pre_mlp_layernorm.weight"),
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         (("ffn", "hidden"), ("ffn", "hidden")), Transform.GATE_UP, Scope.DENSE_MLP, has_extra_state=True),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), (("hidden", "ffn"),),
         scope=Scope.DENSE_MLP, has_extra_state=True),
    Rule(_M + "mlp.router.weight", (_L + "mlp.gate.weight",), (("experts", "hidden"),), scope=Scope.MOE),
    Rule(_M + "mlp.experts.experts.linear_fc1.weight",
         (_L + "mlp.experts.{expert}.gate_proj.weight", _L + "mlp.experts.{expert}.up_proj.weight"),
         (("moe_ffn", "hidden"), ("moe_ffn", "hidden")), Transform.GATE_UP, Scope.EXPERT, has_extra_state=True),
    Rule(_M + "mlp.experts.experts.linear_fc2.weight", (_L + "mlp.experts.{expert}.down_proj.weight",),
         (("hidden", "moe_ffn"),), scope=Scope.EXPERT, has_extra_state=True),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),)),
    Rule("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),), when="untied"),
)

# HF tensors that carry no weights of their own: skipped when reading a checkpoint.
IGNORED_HF_PATTERNS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclass(frozen=True)
class Unit:
    """One Megatron tensor slice and the HF tensors it is made of.

    ``key`` is the dist-checkpoint key, ``prefix`` the position on its leading stacked axes (the
    layer of a layer-stacked key, the expert of an expert-stacked key; empty otherwise) and
    ``shape`` the shape of the slice. ``aliases`` are further keys that hold the same tensor.
    """

    key: str
    prefix: tuple[int, ...]
    shape: tuple[int, ...]
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    transform: Transform
    layer: Optional[int]
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def row_blocks(self, element_size: int, max_bytes: int) -> list[Optional[tuple[int, int]]]:
        """``(start, count)`` row ranges that move this unit in pieces of at most ``max_bytes``
        (e.g. a large embedding), or ``[None]``: whole. Only a ``COPY`` of a matrix is split: a
        fused tensor needs all of its HF parts at once."""
        nbytes = self.numel * element_size
        if self.transform is not Transform.COPY or len(self.shape) < 2 or nbytes <= max_bytes:
            return [None]
        per_block = max(1, max_bytes // (nbytes // self.shape[0]))
        return [(start, min(per_block, self.shape[0] - start)) for start in range(0, self.shape[0], per_block)]


@dataclass(frozen=True)
class ExtraState:
    """An ``_extra_state`` sharded object of a linear layer: its key and Megatron's unique key."""

    key: str
    unique_key: str
    layer: Optional[int]


def _unique_key(key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """``ShardedObject.unique_key`` of Megatron-Core (``key/shard_<offsets>_<shape>``)."""
    return f"{key}/shard_{'.'.join(map(str, offset or (0,)))}_{'.'.join(map(str, shape or (1,)))}"


class Qwen3Mapping:
    """The table of :data:`RULES` expanded for one model.

    ``stacked_layers``: whether Megatron stacks the layers into one key per tensor (default: as
    Megatron-Core does for the models ``build_gpt_model`` builds — dense models stacked, MoE models
    per layer). Pass ``False`` for checkpoints saved with ``metadata={"non_homogeneous_layers": True}``.

    ``tensor_parallel``: the TP size whose padded vocabulary :meth:`dist_tensors` describes (the
    rows of the embedding / output layer in a checkpoint Megatron saves at that TP).
    """

    def __init__(self, cfg: ModelConfig, *, stacked_layers: Optional[bool] = None, tensor_parallel: int = 1):
        if cfg.attention_bias:
            raise MappingError("attention_bias: true is not supported: HF Qwen3 then also puts a bias on "
                               "o_proj, which Megatron's linear_proj (add_bias_linear=False) has no parameter for")
        self.cfg = cfg
        self.padded_vocab_size = cfg.padded_vocab_size(tensor_parallel)
        self.stacked_layers = (not cfg.is_moe) if stacked_layers is None else stacked_layers
        self._pattern = moe_layer_pattern(cfg)
        self.units: list[Unit] = []
        self.extra_states: list[ExtraState] = []
        self._stack_shapes: dict[str, tuple[int, ...]] = {}
        # HF order: embeddings, then the layers, then the final norm and the output layer.
        model_rules = [r for r in RULES if r.scope is Scope.MODEL and self._applies(r, None)]
        for rule in model_rules:
            if rule.megatron.startswith("embedding."):
                self._expand(rule, None)
        for layer in range(cfg.num_hidden_layers):
            for rule in RULES:
                if rule.scope is not Scope.MODEL and self._applies(rule, layer):
                    self._expand(rule, layer)
        for rule in model_rules:
            if not rule.megatron.startswith("embedding."):
                self._expand(rule, None)
        self._by_hf = {name: unit for unit in self.units for name in unit.hf_names}
        self._by_key = {(k, unit.prefix): unit for unit in self.units for k in (unit.key, *unit.aliases)}

    # -- table expansion ---------------------------------------------------------------------------

    def _dims(self) -> dict[str, int]:
        c = self.cfg
        return {
            "vocab": c.vocab_size, "hidden": c.hidden_size, "head_dim": c.kv_channels,
            "q": c.num_attention_heads * c.kv_channels, "kv": c.num_key_value_heads * c.kv_channels,
            "ffn": c.intermediate_size, "moe_ffn": c.moe_intermediate_size, "experts": c.num_experts,
        }

    def _condition(self, name: Optional[str]) -> bool:
        return {
            None: True,
            "untied": not self.cfg.tie_word_embeddings,
            "qk_layernorm": self.cfg.qk_layernorm,
            "attention_bias": self.cfg.attention_bias,
        }[name]

    def _applies(self, rule: Rule, layer: Optional[int]) -> bool:
        if not self._condition(rule.when):
            return False
        if rule.scope is Scope.DENSE_MLP:
            return not self._pattern[layer]
        if rule.scope in (Scope.MOE, Scope.EXPERT):
            return bool(self._pattern[layer])
        return True

    def _expand(self, rule: Rule, layer: Optional[int]) -> None:
        dims = self._dims()
        hf_shapes = tuple(tuple(dims[d] for d in shape) for shape in rule.hf_shapes)
        shape = _megatron_shape(rule.transform, hf_shapes)
        experts = range(self.cfg.num_experts) if rule.scope is Scope.EXPERT else [None]
        # Leading stacked axes of the dist-checkpoint key: the layer (stacked models), the expert.
        key = rule.megatron
        stack_shape: tuple[int, ...] = ()
        if layer is not None and self.stacked_layers:
            key = key.replace("{layer}.", "")
            stack_shape += (self.cfg.num_hidden_layers,)
        if rule.scope is Scope.EXPERT:
            stack_shape += (self.cfg.num_experts,)
        key = key.format(layer=layer)
        aliases = ()
        if rule.moe_alias and layer is not None and self._pattern[layer]:
            alias = rule.moe_alias.replace("{layer}.", "") if self.stacked_layers else rule.moe_alias
            aliases = (alias.format(layer=layer),)
        for expert in experts:
            prefix: tuple[int, ...] = ()
            if layer is not None and self.stacked_layers:
                prefix += (layer,)
            if expert is not None:
                prefix += (expert,)
            self.units.append(Unit(
                key=key, prefix=prefix, shape=shape,
                hf_names=tuple(n.format(layer=layer, expert=expert) for n in rule.hf),
                hf_shapes=hf_shapes, transform=rule.transform, layer=layer, aliases=aliases,
            ))
            if rule.has_extra_state:
                module = key.rsplit(".", 1)[0]
                self.extra_states.append(ExtraState(
                    key=f"{module}._extra_state",
                    unique_key=_unique_key(f"{module}._extra_state", prefix, stack_shape),
                    layer=layer,
                ))
        for k in (key, *aliases):
            self._stack_shapes[k] = stack_shape

    # -- lookups -----------------------------------------------------------------------------------

    def dist_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every dist-checkpoint tensor key (aliases included) and its global shape (the vocabulary
        tensors padded for the mapping's ``tensor_parallel``)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for unit in self.units:
            for key in (unit.key, *unit.aliases):
                shape = unit.shape
                if self.is_vocab_key(key):
                    shape = (self.padded_vocab_size, *shape[1:])
                shapes[key] = self._stack_shapes[key] + shape
        return shapes

    @staticmethod
    def is_vocab_key(key: str) -> bool:
        """Whether ``key`` is a vocabulary-parallel tensor (its rows are the padded vocabulary)."""
        return key in VOCAB_KEYS

    def vocab_padding_rows(self, key: str) -> Optional[tuple[int, int]]:
        """``(first_row, count)`` of the padding rows of vocabulary tensor ``key`` in the layout of
        :meth:`dist_tensors`, or None (not a vocabulary tensor, or no padding)."""
        if not self.is_vocab_key(key) or self.padded_vocab_size == self.cfg.vocab_size:
            return None
        return self.cfg.vocab_size, self.padded_vocab_size - self.cfg.vocab_size

    def hf_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name (in HF order: embeddings, layers, final norm, head) and its shape."""
        return {name: shape for unit in self.units for name, shape in zip(unit.hf_names, unit.hf_shapes)}

    def unit_for_hf(self, name: str) -> Unit:
        try:
            return self._by_hf[name]
        except KeyError:
            raise MappingError(f"{name!r} is not a weight of this {self.cfg.architecture} model "
                               f"({self.cfg.num_hidden_layers} layers, {self.cfg.num_experts} experts)") from None

    def unit_at(self, key: str, prefix: tuple[int, ...] = ()) -> Unit:
        """The unit stored at ``key`` (or an alias) and position ``prefix`` on its stacked axes."""
        try:
            return self._by_key[(key, tuple(prefix))]
        except KeyError:
            raise MappingError(f"no HF tensor maps to Megatron {key!r} at {tuple(prefix)}") from None

    def stack_shape(self, key: str) -> tuple[int, ...]:
        """Sizes of the leading stacked axes of ``key`` (layers and/or experts; () if none)."""
        return self._stack_shapes[key]

    @staticmethod
    def is_ignored_hf(name: str) -> bool:
        return any(p.match(name) for p in IGNORED_HF_PATTERNS)

    # -- conversion --------------------------------------------------------------------------------

    def hf_to_megatron(self, unit: Unit, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The Megatron slice of ``unit`` from its HF tensors (shapes and dtypes checked)."""
        parts = []
        for name, shape in zip(unit.hf_names, unit.hf_shapes):
            if name not in tensors:
                raise MappingError(f"{name}: missing (needed for Megatron {unit.key})")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise MappingError(f"{name}: shape {tuple(t.shape)} does not match the model config, expected {shape}")
            parts.append(t)
        dtypes = {t.dtype for t in parts}
        if len(dtypes) > 1:
            raise MappingError(f"{', '.join(unit.hf_names)}: mixed dtypes {sorted(map(str, dtypes))} "
                               f"cannot be fused into Megatron {unit.key}")
        if unit.transform is Transform.COPY:
            return parts[0]
        if unit.transform is Transform.GATE_UP:
            return torch.cat(parts, dim=0)
        return self._interleave_qkv(*parts)

    def megatron_to_hf(self, unit: Unit, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The HF tensors of ``unit`` from its Megatron slice (contiguous, in ``unit.hf_names`` order)."""
        if tuple(tensor.shape) != unit.shape:
            raise MappingError(f"Megatron {unit.key}{list(unit.prefix) if unit.prefix else ''}: shape "
                               f"{tuple(tensor.shape)}, expected {unit.shape}")
        if unit.transform is Transform.COPY:
            parts = [tensor]
        elif unit.transform is Transform.GATE_UP:
            parts = list(torch.chunk(tensor, 2, dim=0))
        else:
            parts = self._split_qkv(tensor)
        return [(name, part.contiguous()) for name, part in zip(unit.hf_names, parts)]

    def _interleave_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups, hd = self.cfg.num_key_value_heads, self.cfg.kv_channels
        rest = q.shape[1:]
        per_group = [q.reshape(groups, -1, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
        return torch.cat(per_group, dim=1).reshape(-1, *rest)

    def _split_qkv(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        groups, hd = self.cfg.num_key_value_heads, self.cfg.kv_channels
        q_per_group = self.cfg.num_attention_heads // groups * hd
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, q_per_group + 2 * hd, *rest).split([q_per_group, hd, hd], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _megatron_shape(transform: Transform, hf_shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    if transform is Transform.COPY:
        return hf_shapes[0]
    return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])


def detect_stacked_layers(keys: Iterable[str]) -> bool:
    """Whether dist-checkpoint ``keys`` use layer-stacked names (``decoder.layers.<name>`` with no
    layer number)."""
    for key in keys:
        if key.startswith("decoder.layers."):
            return not key[len("decoder.layers."):].split(".", 1)[0].isdigit()
    raise MappingError("no decoder layer keys found (is this a GPT model checkpoint?)")


__all__ = [
    "ExtraState", "IGNORED_HF_PATTERNS", "MappingError", "Qwen3Mapping", "RULES", "Rule", "Scope", "Transform",
    "Unit", "VOCAB_KEYS", "detect_stacked_layers",
]
