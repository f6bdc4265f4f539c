"""Check a parallel layout against a model before any process group exists.

Megatron-Core detects most impossible layouts late (an assertion deep inside a constructor, on
every rank, after the process groups are built) or not at all (a silent wrong gradient). This
module states the rules up front and reports the first broken one as
``ConfigError("parallel.<field>", why)``. Called from ``RunConfig.validate`` (world size unknown)
and from :func:`megatron_vespo.distributed.init_distributed` (with the real world size).

Vocabulary: the embedding and output layer are split by TP in Megatron's vocab-parallel layers, so
the provider pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP`` (as
Megatron-LM does): any vocabulary works at any TP, and there is no vocabulary rule here. The padded
rows are masked out of log-probs and entropy and stripped by conversion, export and publication.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron_vespo.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from typed_config import ConfigError

# Transformer Engine runs an FP8 GEMM only when both dimensions of each weight shard divide these
# (tensorwise/delayed/blockwise scaling: multiples of 16; MXFP8's 1x32 blocks: multiples of 32).
FP8_DIM_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"parallel.{field}", msg)


def moe_layer_pattern(model: ModelConfig) -> list[int]:
    """1 for a MoE layer, 0 for a dense-MLP layer (Hugging Face Qwen3-MoE rule)."""
    if not model.is_moe:
        return [0] * model.num_hidden_layers
    skip = set(model.mlp_only_layers)
    return [
        int(i not in skip and (i + 1) % model.decoder_sparse_step == 0)
        for i in range(model.num_hidden_layers)
    ]


def validate_layout(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    world_size: Optional[int],
) -> None:
    """Raise ``ConfigError("parallel.<field>", ...)`` for the first rule the layout breaks."""
    tp, pp, cp = parallel.tensor, parallel.pipeline, parallel.context
    ep, etp, vpp = parallel.expert, parallel.expert_tensor, parallel.virtual_pipeline
    pattern = moe_layer_pattern(model)
    has_moe_layers = any(pattern)
    has_dense_layers = not all(pattern)

    # Tensor parallelism splits attention heads, query groups and dense MLPs (the vocabulary is padded).
    _check(model.num_attention_heads % tp == 0, "tensor",
           f"TP={tp} must divide num_attention_heads={model.num_attention_heads}")
    _check(model.num_key_value_heads % tp == 0, "tensor",
           f"TP={tp} must divide num_key_value_heads={model.num_key_value_heads} (query groups are split by TP)")
    if has_dense_layers:
        _check(model.intermediate_size % tp == 0, "tensor",
               f"TP={tp} must divide intermediate_size={model.intermediate_size} (the dense MLP is split by TP)")

    # Sequence parallelism shards activations between TP-split regions: it needs TP > 1; a MoE
    # model with TP > 1 needs it (tokens are routed per sequence shard; Megatron-LM asserts it).
    if parallel.sequence_parallel:
        _check(tp > 1, "sequence_parallel", f"needs tensor > 1; got tensor={tp}")
    if has_moe_layers and tp > 1:
        _check(parallel.sequence_parallel, "sequence_parallel",
               f"must be true for a MoE model with tensor={tp} (MoE with TP needs sequence parallelism)")

    # Pipeline parallelism splits the layers evenly (interleaved: into PP * VPP chunks).
    _check(model.num_hidden_layers % pp == 0, "pipeline",
           f"PP={pp} must divide num_hidden_layers={model.num_hidden_layers}")
    if vpp is not None:
        _check(pp > 1, "virtual_pipeline", f"needs pipeline > 1; got pipeline={pp}")
        _check(model.num_hidden_layers % (pp * vpp) == 0, "virtual_pipeline",
               f"pipeline*virtual_pipeline={pp}*{vpp} must divide num_hidden_layers={model.num_hidden_layers}")

    # Expert parallelism: experts are split over EP ranks, each expert's FFN over ETP ranks.
    if not has_moe_layers:
        _check(ep == 1, "expert", f"must be 1 for a model without MoE layers; got {ep}")
        _check(etp == 1, "expert_tensor", f"must be 1 for a model without MoE layers; got {etp}")
    else:
        _check(model.num_experts % ep == 0, "expert",
               f"EP={ep} must divide num_experts={model.num_experts}")
        _check(model.moe_intermediate_size % etp == 0, "expert_tensor",
               f"ETP={etp} must divide moe_intermediate_size={model.moe_intermediate_size}")
        # With EP == 1 Megatron marks expert weights as ordinary ones (``allreduce=True``) and
        # reduces their grads over the dense data-parallel group only. That is right only when
        # experts are split exactly like dense layers (ETP == TP); otherwise the copies of an
        # expert on different TP ranks see different tokens, never sum their grads, and silently
        # diverge (found by the layout-equivalence test).
        if ep == 1:
            _check(etp == tp, "expert_tensor",
                   f"must equal tensor={tp} when expert=1 (Megatron reduces expert grads like dense "
                   f"ones without expert parallelism); got expert_tensor={etp}")

    if world_size is not None:
        model_parallel = tp * pp * cp
        _check(world_size % model_parallel == 0, "tensor",
               f"world size {world_size} is not divisible by tensor*pipeline*context={tp}*{pp}*{cp}")
        dp = world_size // model_parallel
        # Megatron lays the expert groups (ETP x EP x expert-DP) over the ranks of one pipeline
        # stage (TP x CP x DP): ETP*EP must divide them (parallel_state.initialize_model_parallel).
        _check((tp * cp * dp) % (ep * etp) == 0, "expert",
               f"expert*expert_tensor={ep}*{etp} must divide tensor*context*data={tp}*{cp}*{dp}, "
               f"the ranks of one pipeline stage (world size {world_size})")

    _validate_fp8(model, parallel, precision)


def _validate_fp8(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig) -> None:
    fp8 = precision.fp8
    if not fp8.enabled:
        if fp8.param_gather:
            raise ConfigError("precision.fp8.param_gather", "needs precision.fp8.enabled: true")
        return
    if precision.params_dtype != "bf16":
        raise ConfigError("precision.fp8.enabled", f"FP8 needs params_dtype 'bf16'; got {precision.params_dtype!r}")
    multiple = FP8_DIM_MULTIPLE[fp8.recipe]
    tp, etp = parallel.tensor, parallel.expert_tensor
    heads_per_rank = model.num_attention_heads // tp
    groups_per_rank = model.num_key_value_heads // tp
    shards = {
        "hidden_size": model.hidden_size,
        "attention output per TP rank (heads*head_dim/TP)": heads_per_rank * model.kv_channels,
        "QKV output per TP rank": (heads_per_rank + 2 * groups_per_rank) * model.kv_channels,
    }
    if not all(moe_layer_pattern(model)):
        shards["intermediate_size/TP"] = model.intermediate_size // tp
    if model.is_moe:
        shards["moe_intermediate_size/ETP"] = model.moe_intermediate_size // etp
    for what, size in shards.items():
        if size % multiple:
            raise ConfigError(
                "precision.fp8.recipe",
                f"FP8 recipe {fp8.recipe!r} needs GEMM dimensions divisible by {multiple}; {what} = {size}",
            )


def virtual_pipeline_size(parallel: ParallelConfig) -> Optional[int]:
    """The virtual pipeline size given to Megatron: ``None`` (the plain 1F1B schedule) unless there
    are at least two virtual stages per pipeline rank.

    ``virtual_pipeline: 1`` means one chunk per rank, which is the plain pipeline; given to Megatron
    as 1 it would select the interleaved schedule for a single chunk (a different data-iterator
    contract and the micro-batch-count rule of the interleaved schedule, for no benefit).
    """
    vpp = parallel.virtual_pipeline
    return vpp if vpp is not None and vpp > 1 and parallel.pipeline > 1 else None


def megatron_parallel_sizes(parallel: ParallelConfig) -> dict[str, Any]:
    """The parallel sizes under the keyword names that both Megatron's ``TransformerConfig`` and
    ``parallel_state.initialize_model_parallel`` take."""
    return dict(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(parallel),
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
    )
