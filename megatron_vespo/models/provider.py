"""Megatron-Core model provider: a model YAML (Hugging Face field names) -> ``GPTModel``.

:func:`build_transformer_config` maps :class:`ModelConfig` + parallel layout + precision onto
Megatron's ``TransformerConfig``; :func:`build_layer_spec` picks the Transformer Engine layer spec
when TE can run (CUDA + TE importable) and Megatron's local spec otherwise; :func:`build_gpt_model`
builds one pipeline stage (or one virtual-pipeline chunk).

Qwen3 / Qwen3-MoE mapping (README.md, "The Megatron-Core engine"; docs/dependencies.md, "Qwen3 in transformers 5"):
- RMSNorm (eps ``rms_norm_eps``), per-head QK RMSNorm, SwiGLU (``gated_linear_unit`` + SiLU), no
  linear biases, QKV bias from ``attention_bias``, RoPE with base ``rope_theta``, untied or tied
  embeddings, no dropout (RL trains without it);
- MoE: softmax router computed in fp32; ``norm_topk_prob: true`` <=> ``moe_router_pre_softmax=False``
  (top-k of the logits, softmax over those k = renormalised top-k probabilities) and ``false`` <=>
  ``True`` (softmax over all experts, top-k probabilities kept unnormalised); aux loss only when
  ``router_aux_loss_coef > 0``; MoE layers from ``decoder_sparse_step`` / ``mlp_only_layers``;
  the all-to-all dispatcher (variable sequence lengths, any EP).

On the CPU: ``use_cpu_initialization``, no fused kernels, no grouped GEMM (one ``SequentialMLP``
of per-expert MLPs). Megatron-Core 0.16.1 through 0.19.x share this surface; the few places where
they differ are in the ``_compat`` section below.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_vespo.config.schema import (
    RECOMPUTE_MODULES_NEEDING_TE, ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig, RunConfig,
)
from megatron_vespo.models.full_state import mark_vocab_padding
from megatron_vespo.models.layout import megatron_parallel_sizes, moe_layer_pattern, validate_layout
from typed_config import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Minimum Transformer Engine version and GPU compute capability per FP8 recipe (what
# megatron.core.fp8_utils selects and what TE's recipes run on).
_FP8_RECIPE_NEEDS = {
    "delayed": ("2.1.0", (8, 9)),
    "tensorwise": ("2.2.0", (8, 9)),
    "blockwise": ("2.3.0", (9, 0)),
    "mxfp8": ("2.1.0", (10, 0)),
}


# ------------------------------------------------------------------------------------------------
# _compat: everything that depends on the Megatron-Core version or on Transformer Engine
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """True when Transformer Engine imports *and* CUDA is present (TE cannot run on the CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken TE install raising anything at import
        return False
    return True


def _te_version() -> Optional[str]:
    try:
        from megatron.core.utils import get_te_version

        return str(get_te_version())
    except Exception:
        return None


def _supported_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keyword arguments ``fn`` accepts (0.19 forwards ``**kwargs``: keep all)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _layer_spec(use_te: bool, **kwargs: Any) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        fn = specs.get_gpt_layer_with_transformer_engine_spec
    else:
        fn = specs.get_gpt_layer_local_spec
        kwargs["normalization"] = "RMSNorm"
    return fn(**_supported_kwargs(fn, kwargs))


def _transformer_config(**kwargs: Any) -> Any:
    from megatron.core.transformer import TransformerConfig

    fields = TransformerConfig.__dataclass_fields__
    unknown = sorted(k for k in kwargs if k not in fields)
    if unknown:  # a field we rely on vanished: fail loudly rather than silently drop it
        raise TypeError(f"this megatron-core has no TransformerConfig fields {unknown}")
    return TransformerConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# TransformerConfig
# ------------------------------------------------------------------------------------------------


def _fp8_kwargs(precision: PrecisionConfig, use_te: bool) -> dict:
    """FP8 fields of TransformerConfig; shape rules are checked by ``validate_layout``."""
    fp8 = precision.fp8
    if not fp8.enabled:
        return {}
    if not use_te:
        raise ConfigError("precision.fp8.enabled",
                          "FP8 needs Transformer Engine on a CUDA GPU (not importable/usable here)")
    need_version, need_cc = _FP8_RECIPE_NEEDS[fp8.recipe]
    version = _te_version()
    if version is not None:
        from megatron.core.utils import is_te_min_version

        if not is_te_min_version(need_version):
            raise ConfigError("precision.fp8.recipe",
                              f"recipe {fp8.recipe!r} needs Transformer Engine >= {need_version}; found {version}")
    cc = torch.cuda.get_device_capability()
    if cc < need_cc:
        raise ConfigError("precision.fp8.recipe",
                          f"recipe {fp8.recipe!r} needs compute capability >= {need_cc[0]}.{need_cc[1]}; "
                          f"this GPU is {cc[0]}.{cc[1]}")
    return {"fp8": fp8.format, "fp8_recipe": fp8.recipe, "fp8_param": fp8.param_gather}


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    use_te: Optional[bool] = None,
    recompute: Optional[RecomputeConfig] = None,
    routing_replay: bool = False,
) -> Any:
    """Megatron ``TransformerConfig`` for ``model`` in the given layout and precision, with the
    activation ``recompute`` of ``train.recompute`` (none when not given); ``routing_replay`` gives
    every MoE router Megatron's ``RouterReplay`` hook (``train.routing_replay`` other than none)."""
    use_te = te_available() if use_te is None else use_te
    validate_layout(model, parallel, precision, world_size=None)
    if parallel.context > 1 and not use_te:
        raise ConfigError("parallel.context", "context parallelism needs Transformer Engine attention (GPU)")
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[precision.params_dtype]
    pattern = moe_layer_pattern(model)
    kwargs: dict[str, Any] = dict(
        # Shape.
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.kv_channels,
        # Qwen3 block.
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.attention_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Parallel layout.
        **megatron_parallel_sizes(parallel),
        sequence_parallel=parallel.sequence_parallel,
        # RL micro-batches are packed to a token budget, so their lengths vary between steps: the
        # pipeline exchanges shapes before activations.
        variable_seq_lengths=True,
        # Policy losses arrive already divided by the mini-batch's global normaliser: the schedule
        # must not average over micro-batches, nor the DP gradient reduction over ranks.
        calculate_per_token_loss=True,
        # The only dispatcher that handles variable lengths and any EP; Megatron insists on it
        # with variable_seq_lengths even for a dense model.
        moe_token_dispatcher_type="alltoall",
        # Precision.
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.params_dtype == "bf16",
        fp16=precision.params_dtype == "fp16",
        # Initialisation on the host when there is no GPU (the CUDA path initialises on device).
        use_cpu_initialization=not on_gpu,
        # Fused kernels need TE/Apex/CUDA; on the CPU every fusion is off.
        bias_activation_fusion=use_te,
        apply_rope_fusion=use_te,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=use_te,
        persist_layer_norm=False,
    )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.num_experts_per_tok,
            moe_ffn_hidden_size=model.moe_intermediate_size,
            moe_layer_freq=pattern,
            moe_router_pre_softmax=not model.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if model.router_aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=model.router_aux_loss_coef,
            moe_grouped_gemm=use_te,
            moe_permute_fusion=use_te,
            # Megatron's per-router record/replay hook (transformer/moe/router_replay.py), driven by
            # megatron_vespo.train.routing_replay; off, the routers are exactly Megatron's default.
            moe_enable_routing_replay=routing_replay,
        )
    kwargs.update(_fp8_kwargs(precision, use_te))
    kwargs.update(_recompute_kwargs(recompute, use_te))
    return _transformer_config(**kwargs)


def _recompute_kwargs(recompute: Optional[RecomputeConfig], use_te: bool) -> dict[str, Any]:
    """Megatron's recompute fields for ``train.recompute`` (see :class:`RecomputeConfig`)."""
    if recompute is None or recompute.granularity == "none":
        return {}
    if recompute.granularity == "full":
        return dict(recompute_granularity="full", recompute_method=recompute.resolved_method,
                    recompute_num_layers=recompute.resolved_num_layers)
    modules = recompute.resolved_modules
    if not use_te:
        for i, module in enumerate(modules):
            if module in RECOMPUTE_MODULES_NEEDING_TE:  # TE layer norms; moe_act needs TE's grouped GEMM
                raise ConfigError(f"train.recompute.modules[{i}]", f"{module!r} recomputes a Transformer Engine "
                                  "module, and Transformer Engine is not available here (GPU only)")
    return dict(recompute_granularity="selective", recompute_modules=modules)


def build_layer_spec(model: ModelConfig, config: Any, *, use_te: Optional[bool] = None,
                     vp_stage: Optional[int] = None) -> Any:
    """GPT decoder spec: TE modules when TE runs here, Megatron's local modules otherwise.

    A MoE model with dense layers (``mlp_only_layers``, ``decoder_sparse_step > 1``) gets a
    per-layer block spec following ``moe_layer_freq``; a single layer spec would make every layer MoE.
    """
    use_te = te_available() if use_te is None else use_te
    if model.is_moe and not all(moe_layer_pattern(model)):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        kwargs = dict(use_transformer_engine=use_te, vp_stage=vp_stage)
        if not use_te:
            kwargs["normalization"] = "RMSNorm"
        return get_gpt_decoder_block_spec(config, **_supported_kwargs(get_gpt_decoder_block_spec, kwargs))
    return _layer_spec(
        use_te,
        num_experts=model.num_experts if model.is_moe else None,
        moe_grouped_gemm=bool(config.moe_grouped_gemm),
        qk_layernorm=model.qk_layernorm,
    )


def build_gpt_model(
    cfg: RunConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    *,
    use_te: Optional[bool] = None,
) -> Any:
    """One pipeline stage (or virtual-pipeline chunk ``vp_stage``) of the policy as a ``GPTModel``.

    ``pre_process``/``post_process`` default to whether this rank holds the first/last stage;
    model parallel state must already be initialised (``distributed.init_distributed``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    use_te = te_available() if use_te is None else use_te
    config = build_transformer_config(cfg.model, cfg.parallel, cfg.precision, use_te=use_te,
                                      recompute=cfg.train.recompute,
                                      routing_replay=cfg.train.routing_replay != "none")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(cfg.model, config, use_te=use_te, vp_stage=vp_stage),
        # Megatron-LM's padding: every TP rank holds an equal shard of the embedding / output layer.
        vocab_size=cfg.model.padded_vocab_size(cfg.parallel.tensor),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(cfg.model.rope_theta) if cfg.model.rope_theta.is_integer() else cfg.model.rope_theta,
        vp_stage=vp_stage,
    )
    # The real vocabulary travels with the model: local_shards strips the padded rows from the
    # canonical weights (HF export, publication, full state dicts), and the padded rows start at zero.
    mark_vocab_padding(model, cfg.model.vocab_size)
    return model


__all__ = [
    "build_gpt_model", "build_layer_spec", "build_transformer_config", "te_available",
]
