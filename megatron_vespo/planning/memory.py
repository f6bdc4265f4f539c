"""Per-GPU memory estimates for a run, before launch: trainer ranks and rollout engines.

Trainer rank (the worst pipeline stage), in bytes:

- weights: the rank's parameter shard x 2 (bf16/fp16) or 4 (fp32). Vocabulary, attention and dense
  MLP weights are split by TP; experts by EP x ETP; norms and the router are whole on every rank.
  The first stage holds the embedding, the last the output layer (and the final norm).
- reference (``loss.kl`` on): the frozen reference model's weights, the same shard again (no grads or
  optimizer state).
- gradients: 4 bytes per parameter (Megatron's DDP grad buffer in fp32, ``grad_reduce_in_fp32``).
- optimizer: Adam m and v in fp32 (8 bytes/param) plus an fp32 master copy (4) when the model is not
  fp32. With the distributed optimizer, dense state is sharded over DP x CP and expert state over
  the expert data-parallel group (TP x CP x DP / (EP x ETP) ranks). With ``optimizer.cpu_offload``
  its ``offload_fraction`` lives in host memory (reported per rank, not counted against the GPU).
- activations (no recompute): per layer and token, in the activation dtype, with s = TP under
  sequence parallelism (else 1) and t = TP:
    attention  2h/s (norm in/out) + (3q + 3kv)/t  (Q, K, V, normed/rotated Q and K, attention output;
               flash attention: no [s x s] scores)
    MLP        2h/s (norm in/out) + dense: 3f/t (gate, up, activation) | MoE: k·ETP/s · (2h + 3f_e/ETP)
               (each routed copy: permuted input, gate, up, activation, expert output; balanced routing)
               + router logits E/s in fp32
  x micro_batch_tokens / CP tokens x layers on the stage x micro-batches in flight (1F1B: PP - stage).
  Recompute (``train.recompute``, or ``plan --recompute``): full/uniform with n layers per unit keeps
  only each unit's input (h/s per unit) plus one unit's working set during its backward; full/block
  with n keeps only the input of the first n layers of the stage and everything of the others;
  selective drops the listed modules' internals: core_attn the attention output (q/t), mlp the
  dense MLP's 3f/t, moe every routed copy and the router logits, moe_act one f_e/ETP per copy,
  layernorm the norm outputs (h/s per block). The last stage adds the logits [tokens, V/TP]
  (activation dtype) and two fp32 chunks of the log-prob kernel ([logprob_chunk_tokens, V/TP],
  forward and backward).
- overhead: a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.

Rollout engine (one SGLang server with --tp T GPUs), per GPU:
  weights = total params x bytes / T; KV budget = GPU memory x mem_fraction_static - weights;
  KV bytes per token = 2 (K and V) x layers x max(1, kv_heads / T) x head_dim x bytes;
  tokens = KV budget / KV bytes per token (every GPU of an engine holds the same tokens).
  SGLang 0.5.23 sizes weights + KV as mem_fraction_static x the memory free when it starts (the rest holds
  its activations and CUDA graphs); the plan assumes it starts on an otherwise empty GPU.

Colocated (``rollout.fleet.placement.colocate``): every engine GPU also holds a trainer rank, and the GPU
alternates between two phases (sync mode: generation, then the N optimizer steps):
  trainer phase = the trainer rank above + what the released engine keeps (its CUDA context and
                  communicators: the overhead allowance; weights, KV cache and CUDA graphs are released);
  rollout phase = what the offloaded trainer keeps (the overhead allowance: its parameters, gradients and
                  optimizer state are in host memory) + engine static memory (mem_fraction_static x GPU
                  memory: weights and KV) + the engine's activations and CUDA graphs (``engine_runtime_gib``;
                  SGLang itself reserves at least 10 GiB for them on GPUs over 60 GB).
  The larger one binds. Host memory: each rank offloads its weights, gradients and (GPU part of the)
  optimizer state to pinned memory, x the GPUs of a node, plus what optimizer.cpu_offload keeps there.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_vespo.config.schema import RecomputeConfig, RunConfig
from megatron_vespo.models.layout import moe_layer_pattern, validate_layout
from megatron_vespo.planning.params import ParamCount, count_params
from typed_config import ConfigError

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "auto": 2, "": 2}


class PlanError(ValueError):
    """The run cannot work as configured (memory does not fit); the message says what to change."""


@dataclass(frozen=True)
class TrainerEstimate:
    world_size: int
    data_parallel: int
    expert_data_parallel: int
    stage: int  # the pipeline stage the numbers are for (the largest)
    params_per_rank: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    recompute: str
    optimizer_host: float = 0.0  # optimizer state offloaded to host memory (optimizer.cpu_offload)
    reference: float = 0.0  # loss.kl's frozen reference model (weights only)

    @property
    def total(self) -> float:
        return (self.weights + self.reference + self.gradients + self.optimizer + self.activations + self.logits
                + self.overhead)


@dataclass(frozen=True)
class ServerEstimate:
    index: int
    kind: str
    gpus: int
    weights_per_gpu: float = 0.0
    kv_budget_per_gpu: float = 0.0
    kv_bytes_per_token_per_gpu: float = 0.0

    @property
    def kv_tokens(self) -> int:
        if not self.kv_bytes_per_token_per_gpu:
            return 0
        return int(self.kv_budget_per_gpu // self.kv_bytes_per_token_per_gpu)


@dataclass(frozen=True)
class FleetEstimate:
    servers: list[ServerEstimate] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.servers)

    @property
    def kv_tokens(self) -> int:
        return sum(s.kv_tokens for s in self.servers)


@dataclass(frozen=True)
class ColocatedEstimate:
    """One GPU shared by a trainer rank and an engine TP rank, in each of the phases it alternates between."""

    trainer_rank: float  # the trainer's estimate (TrainerEstimate.total)
    trainer_resident: float  # what the offloaded trainer keeps while the engines generate (CUDA context, NCCL)
    engine_resident: float  # what a released engine keeps while the trainer steps (the same allowance; 0: no engine)
    engine_weights: float  # per GPU, of the engine with the largest static memory
    engine_static: float  # weights + KV: mem_fraction_static x GPU memory
    engine_runtime: float  # activations + CUDA graphs while generating
    mem_fraction_static: float
    engine_index: int  # that engine's rollout.fleet.servers index
    host_per_gpu: float  # trainer state in pinned host memory while the engines generate
    gpus_per_node: int

    @property
    def trainer_phase(self) -> float:
        return self.trainer_rank + self.engine_resident

    @property
    def rollout_phase(self) -> float:
        return self.trainer_resident + self.engine_static + self.engine_runtime

    @property
    def binding(self) -> str:
        """The phase with the larger peak: the one that decides whether the GPU fits."""
        return "trainer" if self.trainer_phase >= self.rollout_phase else "rollout"

    @property
    def host_per_node(self) -> float:
        return self.host_per_gpu * self.gpus_per_node


@dataclass(frozen=True)
class RunPlan:
    params: ParamCount
    trainer: TrainerEstimate
    fleet: FleetEstimate
    gpu_memory: float
    max_sequence_tokens: int
    colocated: Optional[ColocatedEstimate] = None

    @property
    def total_gpus(self) -> int:
        if self.colocated is not None:  # the engines run on the trainer's GPUs
            return self.trainer.world_size
        return self.trainer.world_size + self.fleet.gpus


def minimal_world_size(cfg: RunConfig) -> int:
    """The smallest trainer world size the layout allows (DP grows until ETP x EP fits a stage)."""
    p = cfg.parallel
    dp = 1
    while (p.tensor * p.context * dp) % (p.expert * p.expert_tensor):
        dp += 1
    return p.tensor * p.pipeline * p.context * dp


def _stage_layers(pattern: list[int], pp: int, stage: int) -> tuple[int, int]:
    """(layers, MoE layers) on one pipeline stage (layers are split evenly)."""
    per = len(pattern) // pp
    chunk = pattern[stage * per:(stage + 1) * per]
    return len(chunk), sum(chunk)


def _activation_bytes_per_token_layer(cfg: RunConfig, moe_layer: bool,
                                      dropped: frozenset[str] = frozenset()) -> float:
    """Activation bytes one token keeps in one layer; ``dropped``: selective-recompute modules."""
    m, p = cfg.model, cfg.parallel
    act = DTYPE_BYTES[cfg.precision.params_dtype]
    h, t = m.hidden_size, p.tensor
    s = t if p.sequence_parallel else 1
    norms = (1 if "layernorm" in dropped else 2) * h / s  # norm input and output, per block
    q, kv = m.num_attention_heads * m.kv_channels, m.num_key_value_heads * m.kv_channels
    attention = norms + (3 * q + 3 * kv) / t - (q / t if "core_attn" in dropped else 0)
    if moe_layer:
        if "moe" in dropped:
            return act * (attention + norms)
        etp = p.expert_tensor
        f_terms = 2 if "moe_act" in dropped else 3
        mlp = norms + m.num_experts_per_tok * etp / s * (2 * h + f_terms * m.moe_intermediate_size / etp)
        return act * (attention + mlp) + 4 * m.num_experts / s
    mlp = norms + (0 if "mlp" in dropped else 3 * m.intermediate_size / t)
    return act * (attention + mlp)


def _stage_activations_per_token(cfg: RunConfig, stage_pattern: list[int],
                                 recompute: RecomputeConfig) -> tuple[float, float]:
    """(bytes one token keeps per micro-batch in flight on a stage, the extra working set of the
    recompute running in the backward, once per stage)."""
    full = [_activation_bytes_per_token_layer(cfg, bool(x)) for x in stage_pattern]
    if not full:
        return 0.0, 0.0
    layer_input = DTYPE_BYTES[cfg.precision.params_dtype] * cfg.model.hidden_size / (
        cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1)
    if recompute.granularity == "full":
        n = min(recompute.resolved_num_layers, len(full))
        if recompute.resolved_method == "uniform":
            units = math.ceil(len(full) / n)
            return units * layer_input, n * max(full)
        return n * layer_input + sum(full[n:]), max(full[:n])
    if recompute.granularity == "selective":
        dropped = frozenset(recompute.resolved_modules)
        kept = [_activation_bytes_per_token_layer(cfg, bool(x), dropped) for x in stage_pattern]
        return sum(kept), max(f - k for f, k in zip(full, kept))
    return sum(full), 0.0


def estimate_trainer(cfg: RunConfig, world_size: int, recompute: Optional[RecomputeConfig] = None,
                     overhead_gib: float = 2.0) -> TrainerEstimate:
    """The worst pipeline stage's memory; ``recompute`` overrides ``cfg.train.recompute``."""
    m, p = cfg.model, cfg.parallel
    recompute = cfg.train.recompute if recompute is None else recompute
    validate_layout(m, p, cfg.precision, world_size=world_size)
    counts = count_params(m)
    pattern = moe_layer_pattern(m)
    tp, pp, cp = p.tensor, p.pipeline, p.context
    dp = world_size // (tp * pp * cp)
    expert_dp = tp * cp * dp // (p.expert * p.expert_tensor)
    pbytes = DTYPE_BYTES[cfg.precision.params_dtype]
    tokens = cfg.train.micro_batch_tokens / cp
    # Megatron pads the vocabulary (make_vocab_size_divisible_by x TP): shards and logits have padded rows.
    vocab_shard = m.padded_vocab_size(tp) / tp
    vocab_padding = m.padded_vocab_size(tp) / m.vocab_size  # counts.embedding / output are HF (unpadded) sizes

    best: Optional[TrainerEstimate] = None
    for stage in range(pp):
        layers, moe_layers = _stage_layers(pattern, pp, stage)
        first, last = stage == 0, stage == pp - 1
        split_by_tp = layers * counts.attention_per_layer + (layers - moe_layers) * counts.dense_mlp_per_layer
        split_by_tp += round(counts.embedding * vocab_padding) * first
        # The output layer (or, when tied and PP > 1, the embedding's copy on the last stage).
        split_by_tp += round((counts.output or (counts.embedding if pp > 1 else 0)) * vocab_padding) * last
        replicated = layers * counts.norms_per_layer + moe_layers * counts.router_per_layer + counts.final_norm * last
        experts = moe_layers * counts.num_experts * counts.expert_per_expert // (p.expert * p.expert_tensor)
        dense = split_by_tp // tp + replicated
        params = dense + experts

        state_bytes = 8 + (4 if pbytes != 4 else 0)  # Adam m, v (+ fp32 master)
        if cfg.optimizer.distributed:
            optimizer = state_bytes * (dense / (dp * cp) + experts / expert_dp)
        else:
            optimizer = state_bytes * params
        offloaded = cfg.optimizer.resolved_offload_fraction
        optimizer, optimizer_host = optimizer * (1 - offloaded), optimizer * offloaded
        in_flight = pp - stage
        kept, working = _stage_activations_per_token(
            cfg, pattern[stage * (len(pattern) // pp):(stage + 1) * (len(pattern) // pp)], recompute)
        activations = in_flight * tokens * kept + tokens * working
        logits = 0.0
        if last:
            logits = tokens * vocab_shard * pbytes + 2 * min(cfg.train.logprob_chunk_tokens, tokens) * vocab_shard * 4
        est = TrainerEstimate(
            world_size=world_size, data_parallel=dp, expert_data_parallel=expert_dp, stage=stage,
            params_per_rank=int(params), weights=params * pbytes, gradients=params * 4.0, optimizer=optimizer,
            activations=activations, logits=logits, overhead=overhead_gib * GIB,
            recompute=describe_recompute(recompute), optimizer_host=optimizer_host,
            reference=params * pbytes if cfg.loss.kl.enabled else 0.0,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def estimate_fleet(cfg: RunConfig, gpu_memory_bytes: float) -> FleetEstimate:
    m = cfg.model
    fleet = cfg.rollout.fleet
    if fleet is None:  # rollout.cpu_servers local CPU servers
        return FleetEstimate([ServerEstimate(index=i, kind="cpu", gpus=0) for i in range(cfg.rollout.cpu_servers)])
    total_params = count_params(m).total
    servers = []
    for i, server in enumerate(fleet.servers):
        if server.kind != "sglang":
            servers.append(ServerEstimate(index=i, kind=server.kind, gpus=0))
            continue
        tp = server.tp
        wbytes = 1 if server.quantization == "fp8" else DTYPE_BYTES.get(server.dtype, 2)
        kv_bytes = 4 if DTYPE_BYTES.get(server.dtype, 2) == 4 else 2
        weights = total_params * wbytes / tp
        budget = gpu_memory_bytes * server.mem_fraction_static - weights
        kv_heads_per_gpu = max(1.0, m.num_key_value_heads / tp)
        per_token = 2 * m.num_hidden_layers * kv_heads_per_gpu * m.kv_channels * kv_bytes
        servers.append(ServerEstimate(index=i, kind="sglang", gpus=tp, weights_per_gpu=weights,
                                      kv_budget_per_gpu=budget, kv_bytes_per_token_per_gpu=per_token))
    return FleetEstimate(servers)


def estimate_colocated(cfg: RunConfig, trainer: TrainerEstimate, fleet: FleetEstimate, gpu_memory_bytes: float,
                       engine_runtime_gib: float, gpus_per_node: int) -> ColocatedEstimate:
    """The two phases of a GPU shared by ``trainer``'s rank and the engine of ``fleet`` with the most static
    memory (every engine GPU also holds a trainer rank, so the worst engine decides)."""
    assert cfg.rollout.fleet is not None
    if fleet.gpus > trainer.world_size:
        raise ConfigError("rollout.fleet.servers", f"colocated engines take {fleet.gpus} GPUs, more than the "
                          f"{trainer.world_size} trainer GPUs they share: lower their tp or raise the trainer GPUs")
    configs = cfg.rollout.fleet.servers
    engines = [s for s in fleet.servers if s.kind == "sglang"]
    worst = max(engines, key=lambda s: configs[s.index].mem_fraction_static, default=None)
    fraction = configs[worst.index].mem_fraction_static if worst else 0.0
    host = trainer.weights + trainer.gradients + trainer.optimizer + trainer.optimizer_host
    return ColocatedEstimate(
        trainer_rank=trainer.total, trainer_resident=trainer.overhead,
        engine_resident=trainer.overhead if worst else 0.0,
        engine_weights=worst.weights_per_gpu if worst else 0.0, engine_static=fraction * gpu_memory_bytes,
        engine_runtime=engine_runtime_gib * GIB if worst else 0.0, mem_fraction_static=fraction,
        engine_index=worst.index if worst else -1, host_per_gpu=host, gpus_per_node=gpus_per_node)


def describe_recompute(recompute: RecomputeConfig) -> str:
    """'none', 'full (uniform, 1 layer)', 'selective (core_attn, moe)': for the plan's report."""
    if recompute.granularity == "full":
        n = recompute.resolved_num_layers
        return f"full ({recompute.resolved_method}, {n} layer{'s' if n > 1 else ''})"
    if recompute.granularity == "selective":
        return f"selective ({', '.join(recompute.resolved_modules)})"
    return "none"


def plan_run(cfg: RunConfig, trainer_gpus: Optional[int] = None, gpu_memory_gib: float = 80.0,
             recompute: Optional[str] = None, overhead_gib: float = 2.0, engine_runtime_gib: float = 10.0,
             gpus_per_node: int = 8) -> RunPlan:
    """Estimate the run; raise ConfigError for an impossible layout or argument, PlanError when memory
    does not fit.

    ``trainer_gpus``: None plans the smallest valid world size (0 is an error, not "not given").
    ``recompute``: None plans ``cfg.train.recompute``; ``none``, ``full`` or ``selective`` (with
    RecomputeConfig's defaults: uniform, 1 layer; core_attn) plans that instead (``plan --recompute``).
    ``engine_runtime_gib`` and ``gpus_per_node``: only colocated runs use them (rollout phase; host memory)."""
    for name, value in (("trainer_gpus", trainer_gpus), ("gpus_per_node", gpus_per_node)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(name, f"must be >= 1; got {value}")
    # NaN compares false with everything: without these a NaN or negative size "fits" or yields nonsense.
    if not (math.isfinite(gpu_memory_gib) and gpu_memory_gib > 0):
        raise ConfigError("gpu_memory_gib", f"must be a finite number > 0; got {gpu_memory_gib}")
    for name, value in (("overhead_gib", overhead_gib), ("engine_runtime_gib", engine_runtime_gib)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(name, f"must be a finite number >= 0; got {value}")
    world = minimal_world_size(cfg) if trainer_gpus is None else trainer_gpus
    if recompute is not None and recompute not in ("none", "full", "selective"):
        raise ConfigError("recompute", f"expected none, full or selective; got {recompute!r}")
    assumed = None if recompute is None else RecomputeConfig(granularity=recompute)
    cfg.parallel.check_world_size(world)  # names the parallel size at fault before validate_layout's checks
    gpu_memory = gpu_memory_gib * GIB
    trainer = estimate_trainer(cfg, world, assumed, overhead_gib)
    fleet = estimate_fleet(cfg, gpu_memory)
    colocated = None
    if cfg.rollout.fleet is not None and cfg.rollout.fleet.placement.colocate:
        colocated = estimate_colocated(cfg, trainer, fleet, gpu_memory, engine_runtime_gib, gpus_per_node)
    plan = RunPlan(params=count_params(cfg.model), trainer=trainer, fleet=fleet, gpu_memory=gpu_memory,
                   max_sequence_tokens=cfg.rollout.max_prompt_len + cfg.rollout.max_response_len, colocated=colocated)
    check_fits(plan, cfg)
    return plan


def check_fits(plan: RunPlan, cfg: RunConfig) -> None:
    t, mem, co = plan.trainer, plan.gpu_memory, plan.colocated
    trainer_peak = co.trainer_phase if co else t.total
    if trainer_peak > mem:
        hint = "raise parallel.tensor/expert/pipeline, lower train.micro_batch_tokens"
        if not t.recompute.startswith("full"):
            hint += ", or recompute activations (train.recompute.granularity: full; plan --recompute full)"
        beside = f" beside the released engines ({co.engine_resident / GIB:.1f} GiB)" if co else ""
        raise PlanError(f"trainer rank (pipeline stage {t.stage}) needs about {trainer_peak / GIB:.1f} GiB{beside}, "
                        f"more than the {mem / GIB:.0f} GiB of GPU memory: {hint}")
    if co and co.rollout_phase > mem:
        raise PlanError(f"rollout.fleet.servers[{co.engine_index}]: the colocated rollout phase needs about "
                        f"{co.rollout_phase / GIB:.1f} GiB (mem_fraction_static {co.mem_fraction_static:g} x "
                        f"{mem / GIB:.0f} GiB + {co.engine_runtime / GIB:.1f} GiB activations/CUDA graphs + "
                        f"{co.trainer_resident / GIB:.1f} GiB the offloaded trainer keeps), more than the GPU's "
                        f"{mem / GIB:.0f} GiB: lower mem_fraction_static")
    for s in plan.fleet.servers:
        if s.kind != "sglang":
            continue
        where = f"rollout.fleet.servers[{s.index}]"
        if s.kv_budget_per_gpu <= 0:
            raise PlanError(f"{where}: the weights ({s.weights_per_gpu / GIB:.1f} GiB per GPU at tp={s.gpus}) do "
                            f"not fit in mem_fraction_static x {mem / GIB:.0f} GiB: raise tp or mem_fraction_static")
        if s.kv_tokens < plan.max_sequence_tokens:
            raise PlanError(f"{where}: KV cache holds {s.kv_tokens} tokens, fewer than one full sequence "
                            f"(max_prompt_len + max_response_len = {plan.max_sequence_tokens})")


def _human(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_plan(plan: RunPlan, cfg: RunConfig) -> str:
    """The table ``megatron-vespo plan`` prints."""
    p, c, t = cfg.parallel, plan.params, plan.trainer
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        "== parameters ==",
        f"  total            {c.total:>16,d}  ({_human(c.total)})",
        f"  active per token {c.active:>16,d}  ({_human(c.active)})",
        f"  embedding+output {c.embedding + c.output:>16,d}",
        f"  attention        {c.attention:>16,d}",
        f"  dense MLP        {c.dense_mlp:>16,d}",
        f"  experts          {c.experts:>16,d}",
        f"  norms+router     {c.replicated:>16,d}",
        "",
        f"== trainer: {t.world_size} GPUs  TP={p.tensor} PP={p.pipeline} CP={p.context} DP={t.data_parallel} "
        f"EP={p.expert} ETP={p.expert_tensor} expert-DP={t.expert_data_parallel} "
        f"SP={'on' if p.sequence_parallel else 'off'} ==",
        f"  per-rank estimate (pipeline stage {t.stage}, {cfg.precision.params_dtype}, "
        f"{cfg.train.micro_batch_tokens} tokens/micro-batch, recompute {t.recompute})",
        f"  parameters       {t.params_per_rank:>16,d}",
        f"  weights          {gib(t.weights)}",
        *([f"  reference (KL)   {gib(t.reference)}"] if t.reference else []),
        f"  gradients (fp32) {gib(t.gradients)}",
        f"  optimizer        {gib(t.optimizer)}  ({'distributed' if cfg.optimizer.distributed else 'replicated'}"
        + (f"; {gib(t.optimizer_host).strip()} offloaded to host memory per rank)" if t.optimizer_host else ")"),
        f"  activations      {gib(t.activations)}",
        f"  logits/log-probs {gib(t.logits)}",
        f"  overhead         {gib(t.overhead)}",
        f"  total            {gib(t.total)}  of {plan.gpu_memory / GIB:.0f} GiB",
        "",
    ]
    fleet = plan.fleet
    lines.append(f"== fleet: {len(fleet.servers)} server(s), {fleet.gpus} GPUs, KV cache {fleet.kv_tokens:,d} tokens ==")
    groups: list[list[ServerEstimate]] = []  # consecutive servers with the same estimate share a line
    for s in fleet.servers:
        if groups and dataclasses.replace(groups[-1][-1], index=s.index) == s:
            groups[-1].append(s)
        else:
            groups.append([s])
    for group in groups:
        s = group[0]
        who = f"server {s.index}" if len(group) == 1 else f"servers {s.index}-{group[-1].index}"
        if s.kind != "sglang":
            lines.append(f"  {who}: {s.kind} (no GPU)")
            continue
        seqs = s.kv_tokens // plan.max_sequence_tokens
        lines.append(f"  {who}: sglang tp={s.gpus}  weights {s.weights_per_gpu / GIB:.2f} GiB/GPU  "
                     f"KV {s.kv_budget_per_gpu / GIB:.2f} GiB/GPU = {s.kv_tokens:,d} tokens "
                     f"({seqs} full-length sequences) each")
    if plan.colocated is not None:
        lines += ["", *_format_colocated(plan.colocated, plan.gpu_memory),
                  "", f"== GPUs: {plan.total_gpus}, shared by the trainer ({t.world_size}) and the fleet "
                  f"({fleet.gpus}, colocated) =="]
    else:
        lines += ["", f"== GPUs: trainer {t.world_size} + fleet {fleet.gpus} = {plan.total_gpus} =="]
    return "\n".join(lines) + "\n"


def _format_colocated(co: ColocatedEstimate, gpu_memory: float) -> list[str]:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    other = co.rollout_phase if co.binding == "trainer" else co.trainer_phase
    engine = (f" + engine static {g(co.engine_static)} (weights {g(co.engine_weights)} + KV "
              f"{g(co.engine_static - co.engine_weights)}, mem_fraction_static {co.mem_fraction_static:g} of server "
              f"{co.engine_index}) + activations/CUDA graphs {g(co.engine_runtime)}" if co.engine_index >= 0
              else " (no GPU engine in the fleet)")
    return [
        "== colocated: per GPU holding a trainer rank and an engine rank (the two phases alternate) ==",
        f"  trainer phase    {co.trainer_phase / GIB:8.2f} GiB  trainer rank {g(co.trainer_rank)} + released engine "
        f"{g(co.engine_resident)}",
        f"  rollout phase    {co.rollout_phase / GIB:8.2f} GiB  offloaded trainer {g(co.trainer_resident)}{engine}",
        f"  binding phase    {co.binding}: {g(max(co.trainer_phase, co.rollout_phase))} of {gpu_memory / GIB:.0f} GiB "
        f"(the other phase {g(other)})",
        f"  host memory      {co.host_per_gpu / GIB:8.2f} GiB  per GPU, the offloaded trainer state (weights, "
        f"gradients, optimizer): {g(co.host_per_node)} GiB pinned per node of {co.gpus_per_node} GPUs",
    ]
