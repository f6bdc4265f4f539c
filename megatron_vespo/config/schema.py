"""The typed configuration tree: a run YAML (RunConfig) names a model YAML (ModelConfig).

Field names of ModelConfig follow the Hugging Face config of Qwen3 / Qwen3-MoE so that a model YAML
can be written by copying values out of a checkpoint's ``config.json``. Cross-field rules live in
each class's ``validate(path)`` and run before anything launches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from rollout_sglang.config import FleetConfig, WeightSyncConfig
from typed_config import ConfigError, field

LossName = Literal[
    "vespo", "vespo_length_norm", "vespo_sqrt_length_norm", "ppo_clip", "gspo", "sapo", "cispo",
]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Qwen3 (dense) or Qwen3-MoE model, in Hugging Face field names."""

    architecture: Literal["qwen3", "qwen3_moe"] = field(help="model family")
    vocab_size: int = field(gt=0, help="vocabulary size (rows of the embedding)")
    # Megatron-LM's --make-vocab-size-divisible-by: the embedding and output layer get
    # padded_vocab_size(TP) rows so that every TP rank holds an equal shard of any vocabulary.
    # The padding never leaves the trainer: log-probs and entropy mask it, HF conversion, export and
    # weight publication strip it.
    make_vocab_size_divisible_by: int = field(
        128, gt=0, help="pad the vocabulary to a multiple of this x TP inside Megatron (Megatron-LM default 128)")
    hidden_size: int = field(gt=0)
    num_hidden_layers: int = field(gt=0)
    num_attention_heads: int = field(gt=0)
    num_key_value_heads: int = field(gt=0, help="query groups (grouped-query attention)")
    head_dim: Optional[int] = field(None, gt=0, help="per-head size; default hidden_size / heads")
    intermediate_size: int = field(gt=0, help="dense MLP size (dense layers only)")
    rms_norm_eps: float = field(1e-6, gt=0)
    rope_theta: float = field(1_000_000.0, gt=0)
    max_position_embeddings: int = field(40960, gt=0)
    tie_word_embeddings: bool = field(False)
    attention_bias: bool = field(False, help="QKV/proj biases (Qwen3: false)")
    qk_layernorm: bool = field(True, help="RMSNorm on per-head queries and keys (Qwen3: true)")
    # Mixture of experts (qwen3_moe only).
    num_experts: int = field(0, ge=0)
    num_experts_per_tok: int = field(0, ge=0, help="router top-k")
    moe_intermediate_size: int = field(0, ge=0, help="per-expert FFN size")
    norm_topk_prob: bool = field(False, help="renormalise the top-k router probabilities (Qwen3-30B-A3B: true)")
    router_aux_loss_coef: float = field(0.0, ge=0, help="load-balancing loss coefficient (0 in RL)")
    decoder_sparse_step: int = field(1, ge=1)
    mlp_only_layers: list[int] = field(default_factory=list, help="layer indices with a dense MLP in a MoE model")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.architecture == "qwen3_moe"

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Rows of Megatron's embedding / output layer at this TP: ``vocab_size`` rounded up to a
        multiple of ``make_vocab_size_divisible_by * tensor_parallel`` (Megatron-LM's rule)."""
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, path: str) -> None:
        p = lambda name: f"{path}.{name}" if path else name  # noqa: E731
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(p("num_key_value_heads"),
                              f"must divide num_attention_heads={self.num_attention_heads}; got {self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(p("head_dim"), "must be set when hidden_size is not divisible by num_attention_heads")
        if self.is_moe:
            if self.num_experts < 1:
                raise ConfigError(p("num_experts"), "must be >= 1 for architecture 'qwen3_moe'")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(p("num_experts_per_tok"),
                                  f"must be in [1, num_experts={self.num_experts}]; got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ConfigError(p("moe_intermediate_size"), "must be >= 1 for architecture 'qwen3_moe'")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(p("mlp_only_layers"), f"indices {bad} outside [0, {self.num_hidden_layers})")
        elif self.num_experts:
            raise ConfigError(p("num_experts"), "must be 0 for architecture 'qwen3' (use 'qwen3_moe' for experts)")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron-Core parallel layout. world size = tensor * pipeline * context * data."""

    tensor: int = field(1, ge=1, help="tensor-parallel size (TP)")
    pipeline: int = field(1, ge=1, help="pipeline-parallel size (PP)")
    virtual_pipeline: Optional[int] = field(
        None, ge=1, help="virtual stages per pipeline rank (interleaved schedule from 2; 1 is the plain one)")
    context: int = field(1, ge=1, help="context-parallel size (CP)")
    expert: int = field(1, ge=1, help="expert-parallel size (EP)")
    expert_tensor: int = field(1, ge=1, help="expert tensor-parallel size (ETP)")
    sequence_parallel: bool = field(False, help="sequence parallelism (required when MoE meets TP > 1)")
    collective_timeout_minutes: int = field(
        30, ge=1, help="how long a rank waits in a collective for a stuck or dead peer before the run fails")

    def check_world_size(self, world_size: int, path: str = "parallel") -> None:
        """ConfigError naming the model-parallel size (tensor, pipeline, context, in that order) that first
        stops ``world_size`` from being a multiple of tensor*pipeline*context (e.g. ``context=2`` on one
        process names ``parallel.context``, not the product's first factor)."""
        product = 1
        for name in ("tensor", "pipeline", "context"):
            size = getattr(self, name)
            if size > 1 and world_size % (product * size):
                raise ConfigError(f"{path}.{name}", f"{name}={size} does not fit the trainer world size {world_size}: "
                                  f"it must be a multiple of tensor*pipeline*context={self.tensor}*{self.pipeline}*"
                                  f"{self.context} (run under torchrun with that many processes, or lower {name})")
            product *= size


@dataclass(kw_only=True)
class FP8Config:
    enabled: bool = field(False)
    format: Literal["e4m3", "hybrid"] = field("e4m3")
    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = field("tensorwise")
    param_gather: bool = field(False, help="keep parameters in FP8 and all-gather them in FP8")


@dataclass(kw_only=True)
class PrecisionConfig:
    params_dtype: Literal["fp32", "bf16", "fp16"] = field("bf16", help="training precision of the model")
    fp8: FP8Config = field(default_factory=FP8Config)

    def validate(self, path: str) -> None:
        if self.fp8.enabled and self.params_dtype != "bf16":
            raise ConfigError(f"{path}.fp8.enabled", f"FP8 needs params_dtype 'bf16'; got {self.params_dtype!r}")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = field(1e-6, gt=0)
    min_lr: float = field(0.0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = field("constant")
    warmup_steps: int = field(0, ge=0)
    decay_steps: Optional[int] = field(None, gt=0, help="steps of the linear/cosine decay (required for those)")
    weight_decay: float = field(0.01, ge=0)
    adam_beta1: float = field(0.9, ge=0, lt=1)
    adam_beta2: float = field(0.999, ge=0, lt=1)
    adam_eps: float = field(1e-8, gt=0)
    clip_grad: float = field(1.0, ge=0, help="global gradient-norm clip (0 disables)")
    distributed: bool = field(True, help="shard optimizer state over data-parallel ranks")
    cpu_offload: bool = field(False, help="keep Adam state and fp32 master weights in host memory and step them on "
                              "the CPU (Megatron's hybrid device optimizer; GPU only, needs distributed: true)")
    offload_fraction: Optional[float] = field(None, gt=0, le=1, help="with cpu_offload: the fraction of the "
                                              "optimizer state offloaded (default 1.0: all of it)")

    @property
    def resolved_offload_fraction(self) -> float:
        """The fraction of optimizer state held in host memory (0 without cpu_offload)."""
        if not self.cpu_offload:
            return 0.0
        return 1.0 if self.offload_fraction is None else self.offload_fraction

    def validate(self, path: str) -> None:
        if self.offload_fraction is not None and not self.cpu_offload:
            raise ConfigError(f"{path}.offload_fraction", "only applies with cpu_offload: true")
        if self.cpu_offload and not self.distributed:
            # Megatron offloads through its precision-aware path, which only the distributed optimizer has.
            raise ConfigError(f"{path}.cpu_offload", "needs distributed: true (Megatron offloads the distributed "
                              "optimizer's state)")
        if self.lr_schedule != "constant" and self.decay_steps is None:
            raise ConfigError(f"{path}.decay_steps", f"is required for lr_schedule {self.lr_schedule!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr", f"must be <= lr={self.lr}; got {self.min_lr}")


@dataclass(kw_only=True)
class VespoConfig:
    """Kernel φ(W) = W^k · exp(λ (1 - W)), with separate (k, λ) for A >= 0 and A < 0."""

    k_pos: float = field(2.0, ge=0, help="c1 for non-negative advantages")
    lambda_pos: float = field(3.0, ge=1e-4, help="c2 for non-negative advantages")
    k_neg: float = field(3.0, ge=0, help="c1 for negative advantages")
    lambda_neg: float = field(2.0, ge=1e-4, help="c2 for negative advantages")
    log_ratio_clamp: float = field(20.0, gt=0, help="per-token |log π - log μ| clamp")
    log_w_max: float = field(20.0, gt=0, help="upper clamp of the sequence log W")
    w_min: float = field(1e-8, gt=0, lt=1, help="lower clamp of W (log W >= log w_min)")


@dataclass(kw_only=True)
class PPOClipConfig:
    eps_low: float = field(0.2, ge=0, lt=1)
    eps_high: float = field(0.28, ge=0)
    dual_clip: Optional[float] = field(10.0, gt=1, help="dual-clip constant c for A < 0 (null disables)")


@dataclass(kw_only=True)
class GSPOConfig:
    eps_low: float = field(3e-4, ge=0, lt=1)
    eps_high: float = field(4e-4, ge=0)


@dataclass(kw_only=True)
class SAPOConfig:
    tau_pos: float = field(1.0, gt=0)
    tau_neg: float = field(1.05, gt=0)


@dataclass(kw_only=True)
class CISPOConfig:
    eps_low: float = field(1.0, ge=0, le=1, help="1.0 leaves the ratio unbounded below")
    eps_high: float = field(0.28, ge=0)


@dataclass(kw_only=True)
class KLConfig:
    """KL(π_θ ‖ π_ref) to a frozen reference model (README.md, "KL to a reference model, entropy bonus").

    Off while ``coef`` is 0: no reference model is built. Estimators per response token, with
    d = log π − log π_ref: k1 = d, k2 = d²/2, k3 = exp(−d) − 1 + d (Schulman's)."""

    coef: float = field(0.0, ge=0, help="weight of the KL term (loss mode) or of the reward penalty (reward mode); "
                        "0: off, no reference model is built")
    estimator: Optional[KLEstimator] = field(
        None, help="per-token KL estimator; default k3 in loss mode, k1 in reward mode")
    mode: Literal["loss", "reward"] = field(
        "loss", help="loss: coef x the KL estimate aggregated like the policy loss is added to the loss; reward: "
        "coef x each response's KL summed over its tokens (log μ against log π_ref) is subtracted from its reward "
        "before the advantage")
    reference: str = field("", help="reference weights, read like checkpoint.init_from (an HF directory or a "
                           "converted Megatron checkpoint); empty: checkpoint.init_from")

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    @property
    def resolved_estimator(self) -> str:
        if self.estimator is not None:
            return self.estimator
        return "k1" if self.mode == "reward" else "k3"


@dataclass(kw_only=True)
class LossConfig:
    name: LossName = field("vespo", help="policy loss from the registry")
    aggregation: Optional[Aggregation] = field(None, help="default: seq-mean-token-mean for gspo, token-mean otherwise")
    norm_constant: Optional[float] = field(None, gt=0, help="divisor for seq-mean-token-sum-norm (e.g. the max response length)")
    vespo: VespoConfig = field(default_factory=VespoConfig)
    ppo_clip: PPOClipConfig = field(default_factory=PPOClipConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    cispo: CISPOConfig = field(default_factory=CISPOConfig)
    kl: KLConfig = field(default_factory=KLConfig, help="KL regularisation to a frozen reference model")
    entropy_coef: float = field(0.0, ge=0, help="entropy bonus: coef x the token entropy, aggregated like the policy "
                                "loss, is subtracted from the loss; 0: off")

    @property
    def resolved_aggregation(self) -> str:
        if self.aggregation is not None:
            return self.aggregation
        return "seq-mean-token-mean" if self.name == "gspo" else "token-mean"


@dataclass(kw_only=True)
class CorrectionConfig:
    """Train/inference correction from π_old / μ (only meaningful when π_old is recomputed)."""

    mode: Literal["none", "token_tis", "seq_tis", "token_mis", "seq_mis"] = field("none")
    tis_cap: float = field(2.0, gt=0, help="truncation cap C of min(π_old/μ, C)")
    mis_lower: float = field(0.5, ge=0, help="masked IS: keep ratios in [mis_lower, mis_upper]")
    mis_upper: float = field(2.0, gt=0)

    def validate(self, path: str) -> None:
        if self.mis_lower >= self.mis_upper:
            raise ConfigError(f"{path}.mis_lower", f"must be < mis_upper={self.mis_upper}; got {self.mis_lower}")


@dataclass(kw_only=True)
class AdvantageConfig:
    estimator: Literal["grpo"] = field("grpo")
    normalize_std: bool = field(True, help="divide by the group's unbiased std (false: Dr.GRPO style)")
    eps: float = field(1e-6, gt=0)


# Megatron's selective-recompute module names that exist in this model family (no multi-latent
# attention: no mla_up_proj; no shared experts: no shared_experts).
# rollout.function: an importable module path and an attribute name
ROLLOUT_FUNCTION_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")

RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm")
# Those that recompute a Transformer Engine module (moe_act needs TE's grouped GEMM experts).
RECOMPUTE_MODULES_NEEDING_TE = ("moe_act", "layernorm")


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recomputation (Megatron's): activations are dropped in the forward and recomputed
    in the backward, trading compute for memory. Applies to every forward of the trainer (the update
    and the log-prob pass, where it costs nothing: that pass keeps no activations)."""

    granularity: Literal["none", "full", "selective"] = field(
        "none", help="none; full: whole transformer layers (see method); selective: only the listed modules")
    method: Optional[Literal["uniform", "block"]] = field(
        None, help="full only (default uniform). uniform: every layer recomputed in units of num_layers layers, "
        "only each unit's input kept; block: the first num_layers layers of each (virtual) stage recomputed, "
        "the others stored")
    num_layers: Optional[int] = field(None, ge=1, help="full only (default 1): layers per unit (uniform) or layers "
                                      "recomputed per stage (block)")
    modules: list[str] = field(default_factory=list, help="selective only: Megatron's recompute_modules "
                               f"({', '.join(RECOMPUTE_MODULES)}); empty: core_attn")

    def validate(self, path: str) -> None:
        if self.granularity != "full":
            for name in ("method", "num_layers"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{path}.{name}", f"only applies to granularity 'full'; got granularity "
                                      f"{self.granularity!r}")
        if self.granularity != "selective" and self.modules:
            raise ConfigError(f"{path}.modules", f"only applies to granularity 'selective'; got granularity "
                              f"{self.granularity!r}")
        for i, module in enumerate(self.modules):
            if module not in RECOMPUTE_MODULES:
                raise ConfigError(f"{path}.modules[{i}]", f"unknown module {module!r}; expected one of "
                                  f"{', '.join(RECOMPUTE_MODULES)}")

    def check_model(self, model: "ModelConfig", parallel: "ParallelConfig", path: str) -> None:
        """Rules that need the model and the layout: a unit of layers must fit in one (virtual)
        pipeline chunk (Megatron indexes past the chunk otherwise), and every selective module must
        exist in the model (Megatron would silently recompute nothing)."""
        from megatron_vespo.models.layout import moe_layer_pattern  # late: layout imports this module

        if self.granularity == "full":
            per_chunk = model.num_hidden_layers // (parallel.pipeline * (parallel.virtual_pipeline or 1))
            if self.resolved_num_layers > per_chunk:
                raise ConfigError(f"{path}.num_layers", f"{self.resolved_num_layers} is more than the {per_chunk} "
                                  "layer(s) of one pipeline chunk (num_hidden_layers / (pipeline x virtual_pipeline))")
        if self.granularity == "selective":
            pattern = moe_layer_pattern(model) if model.is_moe else [0] * model.num_hidden_layers
            for i, module in enumerate(self.resolved_modules):
                if module in ("moe", "moe_act") and not any(pattern):
                    raise ConfigError(f"{path}.modules[{i}]", f"{module!r} recomputes MoE layers; the model has none")
                if module == "mlp" and all(pattern):
                    raise ConfigError(f"{path}.modules[{i}]", "'mlp' recomputes dense MLP layers; every layer of "
                                      "the model is MoE (use 'moe' or 'moe_act')")

    @property
    def resolved_method(self) -> str:
        return self.method or "uniform"

    @property
    def resolved_num_layers(self) -> int:
        return self.num_layers or 1

    @property
    def resolved_modules(self) -> list[str]:
        return list(self.modules) or ["core_attn"]


@dataclass(kw_only=True)
class TrainConfig:
    # NumPy seeds take 32 bits (np.random.seed raises beyond): bounded here, not deep in the launch.
    seed: int = field(1234, ge=0, le=2**32 - 1)
    micro_batch_tokens: int = field(16384, gt=0, help="token budget of one packed micro-batch per GPU")
    mini_batch_prompts: int = field(256, gt=0, help="prompts per optimizer step (x n samples)")
    staleness: int = field(1, ge=1, help="N: optimizer steps per rollout batch; mini-batch j trains at lag j")
    recompute_old_logprobs: bool = field(False, help="forward π_old before the update instead of using μ")
    routing_replay: Literal["none", "r2", "r3"] = field(
        "none", help="MoE routing replay (none: the trainer routes itself, the default). r3: replay the experts the "
        "rollout engine routed each token to (needs rollout.return_routed_experts); r2: replay the routing the "
        "trainer recorded in the π_old pass (needs recompute_old_logprobs)")
    logprob_chunk_tokens: int = field(4096, gt=0, help="tokens per chunk in the vocab-parallel log-prob kernel")
    compute_entropy: bool = field(False)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig,
                                       help="activation recomputation (memory for compute; see the engine section)")
    mode: Literal["sync", "async"] = field("sync", help="sync: staleness-N batches; async: continuous generation "
                                           "into a version-tagged buffer (see the asynchronous section)")


@dataclass(kw_only=True)
class SyntheticTaskConfig:
    """The built-in verifiable task over digit tokens (no tokenizer needed; see megatron_vespo.data.synthetic)."""

    task: Literal["reverse", "sort"] = field("reverse", help="what the response must do with the prompt's digits")
    num_digits: int = field(3, ge=1, le=8, help="digits per prompt (and per answer)")


@dataclass(kw_only=True)
class DataConfig:
    """Where training prompts come from: a jsonl/parquet file or the synthetic task."""

    path: str = field("", help="jsonl or parquet file of rows with 'prompt' (text) or 'prompt_ids', and the ground "
                      "truth; empty: the synthetic task")
    ground_truth_key: str = field("ground_truth", help="row field holding the answer the verifier checks")
    tokenizer: str = field("", help="Hugging Face tokenizer directory (needed for text prompts and text verifiers)")
    apply_chat_template: bool = field(False, help="wrap text prompts in the tokenizer's chat template")
    prompt_suffix: str = field("", help="appended to every text prompt (e.g. the boxed-answer instruction)")
    shuffle: bool = field(True, help="reshuffle the prompts every epoch (seeded by train.seed)")
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


@dataclass(kw_only=True)
class HttpVerifierConfig:
    """A remote verifier (``reward.verifier: http``): each response is POSTed as JSON (prompt_ids, response_ids,
    response_text, ground_truth) to ``url``, which answers ``{"score": float}``. Reference server:
    ``python -m megatron_vespo.rewards.server``."""

    url: str = field("", help="endpoint the requests are POSTed to, e.g. http://127.0.0.1:8020/score")
    timeout_s: float = field(5.0, gt=0, help="per-attempt HTTP timeout (must be <= reward.timeout_s, which bounds "
                             "all attempts of one response together)")
    retries: int = field(2, ge=0, le=20, help="extra attempts after a connection error, a timeout or a 5xx/429 answer "
                         "(4xx answers are not retried)")
    backoff_s: float = field(0.2, ge=0, le=60, help="wait before the first retry; doubled before each further one")
    max_concurrency: int = field(16, ge=1, le=1024, help="requests in flight at once (all scorers of the run together)")

    def validate(self, path: str) -> None:
        if self.url:
            import re

            if not re.match(r"^https?://[^/\s:?#]+", self.url):
                raise ConfigError(f"{path}.url", f"must be an http:// or https:// URL with a host; got {self.url!r}")


@dataclass(kw_only=True)
class RewardConfig:
    verifier: str = field("synthetic", help="registered verifier name (synthetic, math) or http (reward.http)")
    timeout_s: float = field(10.0, gt=0, help="a verifier call slower than this scores 0 and is counted")
    http: HttpVerifierConfig = field(default_factory=HttpVerifierConfig, help="the remote verifier of verifier: http")

    def validate(self, path: str) -> None:
        if self.verifier != "http":
            return
        if not self.http.url:
            raise ConfigError(f"{path}.http.url", "is required with verifier: http")
        if self.http.timeout_s > self.timeout_s:
            # reward.timeout_s bounds a response's whole scoring: a longer attempt would always be cut short.
            raise ConfigError(f"{path}.http.timeout_s", f"must be <= {path}.timeout_s={self.timeout_s} (the bound on "
                              f"all attempts of one response); got {self.http.timeout_s}")


@dataclass(kw_only=True)
class OverlongConfig:
    """DAPO's overlong handling: a soft length penalty on the reward and masking of truncated responses.

    Penalty of a response of L tokens (L counts every generated token, a stop token included), with
    B = buffer_len and M = rollout.max_response_len: 0 for L <= M - B, else -penalty_factor * (L - (M - B)) / B,
    reaching -penalty_factor at L = M. It is added to the verifier's score before the GRPO advantage.
    """

    buffer_len: int = field(0, ge=0, help="soft overlong penalty: responses longer than max_response_len - "
                            "buffer_len get a penalty growing linearly to -penalty_factor at max_response_len; "
                            "0: no penalty")
    penalty_factor: float = field(1.0, ge=0, help="the penalty at max_response_len (reward units)")
    mask_truncated: bool = field(False, help="loss mask 0 for responses that hit max_response_len without a stop "
                                 "(finish reason 'length'): none of their tokens is trained; they still count in "
                                 "their group's advantage")


@dataclass(kw_only=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: prompt groups whose rewards all agree (zero variance: every GRPO advantage is 0,
    so they carry no gradient) are filtered out and more prompts are generated until the mini-batches are full.

    The rewards compared are those the advantage uses (after rollout.overlong's penalty, over the group's
    complete responses). Sync mode: after the first generation round, up to max_extra_rounds more rounds draw
    new prompts (each sized by the fraction kept so far, at most one rollout batch). Async mode: the generator
    keeps generating; a mini-batch may wait for up to max_extra_rounds x train.mini_batch_prompts filtered
    groups. When that budget is spent, on_exhausted decides.
    """

    enabled: bool = field(False, help="filter zero-variance groups and generate more until the mini-batches are full")
    max_extra_rounds: int = field(4, ge=0, help="sync: generation rounds after the first per rollout batch; async: "
                                  "filtered groups a mini-batch may wait for, in units of train.mini_batch_prompts")
    on_exhausted: Literal["fill", "error"] = field(
        "fill", help="when the budget is spent and the batch is not full: fill: complete it with filtered groups "
        "(zero advantage, as without dynamic sampling), so every rollout batch still has its N mini-batches; "
        "error: stop the run (the data is too easy or too hard for the policy)")


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling on the fleet. The returned log-probs are μ (the behaviour policy)."""

    n_samples: int = field(8, ge=1, help="responses per prompt (one GRPO group)")
    temperature: float = field(1.0, gt=0, help="sampling temperature; the trainer's log-probs use the same")
    top_p: float = field(1.0, gt=0, le=1)
    top_k: int = field(-1, ge=-1, help="-1: no top-k filtering; else >= 1 (SGLang refuses 0)")
    max_prompt_len: int = field(1024, gt=0, help="longer prompts are dropped from the dataset (and counted)")
    max_response_len: int = field(15360, gt=0, help="max_new_tokens of every request")
    stop_token_ids: list[int] = field(default_factory=list, help="token ids that end a response")
    max_concurrency: int = field(256, gt=0, help="prompts in flight at once")
    request_timeout_s: float = field(600.0, gt=0, help="per-attempt HTTP timeout of a /generate call")
    server_unavailable_s: float = field(
        900.0, gt=0, help="how long generation keeps retrying while no server answers (a restart of the only "
        "server, or of the router) before the run fails")
    fleet: Optional[FleetConfig] = field(
        None, help="servers + router to start; null: cpu_servers CPU servers booted from the initial weights")
    cpu_servers: int = field(1, ge=1, help="number of local CPU rollout servers when fleet is null")
    cpu_server_dtype: Literal["float32", "bfloat16"] = field(
        "float32", help="dtype of the local CPU servers (bfloat16: a train/inference mismatch against an fp32 trainer)")
    cpu_server_deterministic: bool = field(
        False, help="local CPU servers run one sequence per forward, so results do not depend on request timing "
        "(bitwise-reproducible runs and resumes; slower), and sample as SGLang's deterministic inference does")
    return_routed_experts: bool = field(False, help="MoE: ask the servers for the experts each token was routed to "
                                        "(requests then go to the servers directly: the router drops the field)")
    weight_sync: WeightSyncConfig = field(
        default_factory=lambda: WeightSyncConfig(transport="disk"),
        help="how new weights reach the fleet (disk_dir empty: <run.output_dir>/weights)")
    overlong: OverlongConfig = field(default_factory=OverlongConfig,
                                     help="DAPO's soft overlong penalty and masking of truncated responses")
    dynamic_sampling: DynamicSamplingConfig = field(
        default_factory=DynamicSamplingConfig, help="DAPO's dynamic sampling: filter zero-variance prompt groups")
    dump_dir: str = field("", help="save every scored batch here as it is trained (batch_<step>.safetensors: tokens, "
                          "μ log-probs, advantages, rewards, versions, routed experts); empty: off")
    replay_dir: str = field("", help="train on the batches a run saved with dump_dir instead of generating: no fleet "
                            "starts, one file per rollout step, in order; empty: off")
    function: str = field(
        "", help="custom rollout function 'package.module:fn' (async; gets the generation client, the prompt and the "
        "sampling settings, returns the group's samples with a loss mask: README, 'Custom and multi-turn rollouts'); "
        "empty: single-turn generation")

    def validate(self, path: str) -> None:
        if self.top_k == 0:  # every server would answer 400 to every request
            raise ConfigError(f"{path}.top_k", "must be -1 (no top-k filtering) or >= 1; got 0")
        if self.overlong.buffer_len >= self.max_response_len:
            # The penalty would start at length 0 or below: every response penalised, not just long ones.
            raise ConfigError(f"{path}.overlong.buffer_len", f"must be < rollout.max_response_len="
                              f"{self.max_response_len} (the penalty starts at max_response_len - buffer_len); "
                              f"got {self.overlong.buffer_len}")

        if self.dump_dir and self.replay_dir:
            raise ConfigError(f"{path}.dump_dir", "cannot be combined with rollout.replay_dir (a replay generates "
                              "nothing new to save)")
        if self.function:
            if not ROLLOUT_FUNCTION_RE.fullmatch(self.function):
                raise ConfigError(f"{path}.function", f"expected 'package.module:function'; got {self.function!r}")
            if self.return_routed_experts:
                # A custom function's samples hold tokens no request generated (tool output): the engine has
                # no routed-expert rows aligned with them, so r3 / routing-flip metrics cannot follow.
                raise ConfigError(f"{path}.return_routed_experts", "cannot be combined with rollout.function (the "
                                  "samples of a custom rollout have tokens no request generated; the engine's "
                                  "routed experts do not line up with them)")
            if self.replay_dir:
                raise ConfigError(f"{path}.function", "cannot be combined with rollout.replay_dir (a replay "
                                  "generates nothing)")
        if self.replay_dir and self.dynamic_sampling.enabled:
            raise ConfigError(f"{path}.dynamic_sampling.enabled", "cannot be combined with rollout.replay_dir (a "
                              "replay trains the saved batches as they are and generates nothing)")


@dataclass(kw_only=True)
class TrainInferenceGateConfig:
    """Stop a run whose trainer and rollout engines disagree on the log-probs of the same tokens under the
    same weights (a lag-0 mini-batch): wrong weights, dtype or model config on one side."""

    enabled: bool = field(False, help="compare the trainer's log-probs with the engine's (μ) on the first mini-batch "
                          "trained at lag 0 and stop the run if they differ by more than the thresholds")
    every_step: bool = field(False, help="also check every later mini-batch trained at lag 0 (sync: the first of "
                             "each rollout batch; async: mini-batches whose every sample has lag 0)")
    max_logp_gap_mean: float = field(0.1, gt=0, help="largest allowed mean |log π_θ - log μ| per response token "
                                     "(mismatch/logp_gap_mean)")
    max_logp_gap_max: Optional[float] = field(None, gt=0, help="largest allowed |log π_θ - log μ| of any one token "
                                              "(mismatch/logp_gap_max); null: not checked")

    def validate(self, path: str) -> None:
        if self.every_step and not self.enabled:
            raise ConfigError(f"{path}.every_step", "only applies with enabled: true")
        if self.max_logp_gap_max is not None and self.max_logp_gap_max < self.max_logp_gap_mean:
            raise ConfigError(f"{path}.max_logp_gap_max", f"must be >= max_logp_gap_mean={self.max_logp_gap_mean} "
                              f"(a token's gap is at least the mean's); got {self.max_logp_gap_max}")


@dataclass(kw_only=True)
class RunLoopConfig:
    """The driver loop around the trainer."""

    rollout_steps: int = field(100, ge=1, help="rollout batches (each: train.staleness optimizer steps); "
                               "async mode trains rollout_steps x train.staleness mini-batches")
    output_dir: str = field("outputs/run", help="metrics.jsonl, plot, initial HF weights, weight-sync versions")
    stop_at_reward: Optional[float] = field(None, help="stop early once a rollout batch's mean reward reaches this")
    plot: bool = field(True, help="write reward / W / phi curves (metrics.png) at the end")
    max_failed_steps: int = field(
        3, ge=1, help="stop with an error after this many consecutive rollout batches in which every response "
        "failed verification or was aborted (a run that cannot learn)")
    train_inference_gate: TrainInferenceGateConfig = field(
        default_factory=TrainInferenceGateConfig,
        help="stop the run when the trainer's and the engine's log-probs differ at lag 0 (see the README)")


@dataclass(kw_only=True)
class AsyncConfig:
    """Fully asynchronous training (train.mode: async): the fleet generates continuously.

    The run trains run.rollout_steps x train.staleness mini-batches of train.mini_batch_prompts groups (the
    samples of the synchronous run of the same config), one optimizer step each.
    """

    push_every_steps: int = field(1, ge=1, help="optimizer steps between weight pushes to the fleet")
    max_staleness: int = field(4, ge=0, help="bound on a sample's lag: trainer version minus the oldest version "
                               "that generated any of its tokens")
    over_staleness: Literal["drop", "throttle"] = field(
        "drop", help="drop: samples past the bound are discarded and counted; throttle: generation waits")
    partial_rollouts: bool = field(True, help="on a push, abort in-flight requests, keep the generated prefix "
                                   "and its log-probs, continue with the new weights")
    buffer_groups: int = field(0, ge=0, help="max finished prompt groups waiting in the buffer; 0: two mini-batches")

    def capacity(self, mini_batch_prompts: int) -> int:
        """Finished groups the buffer holds at most (``buffer_groups``, or two mini-batches)."""
        return self.buffer_groups or 2 * mini_batch_prompts

    def validate(self, path: str) -> None:
        # Steps between pushes train on weights pushed up to push_every_steps - 1 steps earlier.
        if self.max_staleness < self.push_every_steps - 1:
            raise ConfigError(f"{path}.max_staleness",
                              f"must be >= push_every_steps - 1 = {self.push_every_steps - 1} (the lag of the last "
                              f"step before each push); got {self.max_staleness}")


@dataclass(kw_only=True)
class EvalSetConfig:
    """One evaluation benchmark: mean accuracy over k samples per prompt."""

    name: str = field(help="metric prefix: eval/<name>/accuracy")
    path: str = field("", help="jsonl/parquet with the training schema; empty: held-out synthetic prompts")
    num_prompts: int = field(0, ge=0, help="0: all rows")
    n_samples: int = field(4, ge=1, help="k: samples per prompt")
    verifier: str = field("", help="empty: reward.verifier")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = field(0, ge=0, help="evaluate every K optimizer steps (and at the end); 0: never")
    temperature: float = field(1.0, gt=0)
    top_p: float = field(1.0, gt=0, le=1)
    max_response_len: int = field(0, ge=0, help="0: rollout.max_response_len")
    sets: list[EvalSetConfig] = field(default_factory=list, help="benchmarks")

    def check_set_names(self) -> None:
        """Set names become metric names (``eval/<name>/...``): non-empty, no '/', unique."""
        names = [s.name for s in self.sets]
        for i, name in enumerate(names):
            if not name or "/" in name:
                raise ConfigError(f"eval.sets[{i}].name", f"must be a non-empty metric name without '/'; got {name!r}")
            if name in names[:i]:
                raise ConfigError(f"eval.sets[{i}].name", f"duplicate eval set name {name!r}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Training checkpoints: model, optimizer, LR schedule, RNG, data position, driver state."""

    dir: str = field("", help="empty: <run.output_dir>/checkpoints")
    save_every_steps: int = field(0, ge=0, help="save every K rollout steps (async mode: K mini-batches) and at the "
                                  "end; 0: never")
    keep_last: int = field(2, ge=1, help="checkpoints kept (older ones are deleted after a save succeeds)")
    resume: Literal["auto", "never", "must"] = field(
        "auto", help="auto: resume from <dir>/latest when it exists; must: fail without one")
    load_dir: str = field("", help="resume from this checkpoint directory instead of <dir>/latest")
    init_from: str = field("", help="initial policy weights when not resuming: a Hugging Face directory (converted "
                           "once into <dir>/init) or a Megatron dist checkpoint from tools/convert_hf_to_mcore.py")


@dataclass(kw_only=True)
class LoggingConfig:
    """Metric sinks; the JSONL file is always written. One metric name set for all sinks."""

    tensorboard: bool = field(False, help="TensorBoard event files under <run.output_dir>/tensorboard")
    wandb: bool = field(False, help="wandb: online when WANDB_API_KEY is set, offline otherwise")
    wandb_project: str = field("megatron-vespo")
    run_name: str = field("", help="empty: the output directory's name")


@dataclass(kw_only=True)
class RunConfig:
    """A whole run. ``model`` is read from the file named in the run YAML."""

    model: ModelConfig = field(help="path to a model YAML (or an inline mapping)")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run: RunLoopConfig = field(default_factory=RunLoopConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, path: str) -> None:
        from megatron_vespo.models.layout import validate_layout  # late: layout imports this module

        validate_layout(self.model, self.parallel, self.precision, world_size=None)
        self.train.recompute.check_model(self.model, self.parallel, "train.recompute")
        if self.correction.mode != "none" and not self.train.recompute_old_logprobs:
            raise ConfigError("correction.mode",
                              f"{self.correction.mode!r} weighs π_old/μ and needs train.recompute_old_logprobs: true")
        if self.rollout.replay_dir and self.eval.sets and self.eval.every_steps:
            # Evaluation generates on the fleet, and a replay starts none.
            raise ConfigError("eval.every_steps", "must be 0 with rollout.replay_dir (a replay starts no fleet to "
                              f"evaluate on); got {self.eval.every_steps}")
        if self.train.routing_replay != "none":
            mode = self.train.routing_replay
            if not self.model.is_moe:
                raise ConfigError("train.routing_replay", f"{mode!r} replays MoE routing; the model has no experts")
            if mode == "r3" and not self.rollout.return_routed_experts:
                raise ConfigError("train.routing_replay", "'r3' replays the experts the rollout engine routed each "
                                  "token to and needs rollout.return_routed_experts: true")
            if mode == "r2" and not self.train.recompute_old_logprobs:
                raise ConfigError("train.routing_replay", "'r2' replays the routing recorded in the π_old pass and "
                                  "needs train.recompute_old_logprobs: true")
        fleet = self.rollout.fleet
        if fleet is not None and fleet.placement.colocate and self.train.mode != "sync":
            raise ConfigError("rollout.fleet.placement.colocate", "needs train.mode: sync (colocated engines release "
                              "the GPUs while the trainer updates; the asynchronous mode generates while it trains); "
                              f"got train.mode: {self.train.mode}")
        if fleet is not None and fleet.placement.colocate and self.rollout.replay_dir:
            raise ConfigError("rollout.fleet.placement.colocate", "cannot be combined with rollout.replay_dir (a replay "
                              "starts no engines to share the GPUs with)")
        if self.train.routing_replay == "r3" and self.rollout.replay_dir:
            raise ConfigError("train.routing_replay", "'r3' cannot train from rollout.replay_dir: the dumped batches "
                              "hold the response rows but not the prompt rows r3 replays")
        if self.loss.kl.enabled:
            self._check_kl()
        if self.loss.norm_constant is not None and self.loss.resolved_aggregation != "seq-mean-token-sum-norm":
            raise ConfigError("loss.norm_constant", "is only used by aggregation 'seq-mean-token-sum-norm'")
        if self.loss.resolved_aggregation == "seq-mean-token-sum-norm" and self.loss.norm_constant is None:
            raise ConfigError("loss.norm_constant", "is required for aggregation 'seq-mean-token-sum-norm'")
        # A stop token the model cannot emit is a typo (or the wrong model), found otherwise only by the server.
        for i, token in enumerate(self.rollout.stop_token_ids):
            if not 0 <= token < self.model.vocab_size:
                raise ConfigError(f"rollout.stop_token_ids[{i}]", f"token id {token} is outside the vocabulary "
                                  f"[0, model.vocab_size={self.model.vocab_size})")

    def _check_kl(self) -> None:
        """Rules of ``loss.kl`` that need the rest of the run: where the reference comes from, and a replay
        (whose saved advantages are trained as they are) cannot take a reward penalty."""
        if not (self.loss.kl.reference or self.checkpoint.init_from):
            raise ConfigError("loss.kl.reference", "is required when loss.kl.coef > 0 and checkpoint.init_from is "
                              "empty (the reference defaults to the initial weights, and a random initialisation is "
                              "no reference)")
        if self.loss.kl.mode == "reward" and self.rollout.replay_dir:
            raise ConfigError("loss.kl.mode", "'reward' cannot train from rollout.replay_dir: the saved advantages "
                              "are trained as they are (use mode 'loss', or coef 0)")

    @property
    def kl_reference(self) -> tuple[str, str]:
        """Where the reference weights of ``loss.kl`` come from: (path, the config field naming it):
        ``loss.kl.reference``, else ``checkpoint.init_from``."""
        if self.loss.kl.reference:
            return self.loss.kl.reference, "loss.kl.reference"
        return self.checkpoint.init_from, "checkpoint.init_from"

    def check_trainable(self) -> None:
        """Rules that only a training run needs (tools that merely read a run config, e.g. evaluation, do
        not); run by the launch before any process group exists and by ``megatron-vespo check``."""
        longest = self.rollout.max_prompt_len + self.rollout.max_response_len
        if longest > self.model.max_position_embeddings:
            raise ConfigError("rollout.max_response_len",
                              f"max_prompt_len + max_response_len = {longest} exceeds the model's "
                              f"max_position_embeddings={self.model.max_position_embeddings}")
        if self.eval.sets and self.eval.every_steps and self.eval.max_response_len:
            longest = self.rollout.max_prompt_len + self.eval.max_response_len
            if longest > self.model.max_position_embeddings:
                raise ConfigError("eval.max_response_len",
                                  f"rollout.max_prompt_len + eval.max_response_len = {longest} exceeds the model's "
                                  f"max_position_embeddings={self.model.max_position_embeddings}")
        if self.parallel.context > 1:
            # PolicyTrainer refuses it after the model is built: say so before anything starts.
            raise ConfigError("parallel.context", f"context parallelism is not supported by the train step yet "
                              f"(packed sequences are not split over CP ranks); got {self.parallel.context}")
        if self.rollout.n_samples < 2:
            raise ConfigError("rollout.n_samples", "GRPO needs at least 2 responses per prompt")
        if self.train.mode == "async" and \
                self.asynchronous.capacity(self.train.mini_batch_prompts) < self.train.mini_batch_prompts:
            raise ConfigError("asynchronous.buffer_groups",
                              f"must hold at least one mini-batch (train.mini_batch_prompts="
                              f"{self.train.mini_batch_prompts}); got {self.asynchronous.buffer_groups}")

