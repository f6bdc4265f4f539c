"""What one weight push moves, and about how long it takes at a stated bandwidth (``megatron-vespo plan``).

Every engine receives the whole model in HF tensors, in the trainer's parameter dtype (the exporter
does not convert): ``bytes per engine = parameters (a tied output layer once) x dtype bytes``. The
pipeline stages send their own shares one after another (``driver/publisher.py``), each stage's share
cut into buckets of ``rollout.weight_sync.bucket_bytes`` (a tensor larger than a bucket goes alone).

Estimated time, at ``bandwidth`` bytes/s per link, ignoring per-call latencies:

- ``distributed`` (broadcast): the stages' groups send in turn and a broadcast delivers every byte to
  every engine at the speed of one link (NCCL pipelines the ring), so ``total bytes / bandwidth``;
- ``ipc``: a device-to-device copy on the node: the same formula at the copy bandwidth;
- ``disk``: the stages write ``total bytes`` once, then every engine reads them; reads share the
  filesystem, so ``bytes x (1 + engines) / bandwidth`` when the bandwidth is the filesystem's.

Peak extra memory on a stage's source rank during a push: at most two buckets (the one being sent and
the next being assembled), the largest single tensor when it is larger than a bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.models.layout import moe_layer_pattern
from megatron_vespo.planning.params import count_params

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class PushEstimate:
    transport: str
    engines: int
    bytes_per_engine: int
    stage_bytes: tuple[int, ...]
    stage_buckets: tuple[int, ...]
    largest_tensor_bytes: int
    bucket_bytes: int
    bandwidth: float  # bytes/s

    @property
    def seconds(self) -> float:
        if self.transport == "disk":
            return self.bytes_per_engine * (1 + max(1, self.engines)) / self.bandwidth
        return self.bytes_per_engine / self.bandwidth

    @property
    def peak_extra_per_source_rank(self) -> int:
        """Two buckets: a bucket is ``bucket_bytes``, the largest tensor when larger, the stage's share when smaller."""
        return 2 * min(max(self.bucket_bytes, self.largest_tensor_bytes), max(self.stage_bytes))


def estimate_push(cfg: RunConfig, bandwidth_gb_s: float) -> PushEstimate:
    """The push of ``cfg``'s model through ``cfg.rollout.weight_sync`` at ``bandwidth_gb_s`` GB/s (1e9 bytes/s)."""
    m, pp = cfg.model, cfg.parallel.pipeline
    counts = count_params(m)
    element = DTYPE_BYTES[cfg.precision.params_dtype]
    pattern = moe_layer_pattern(m)
    per = len(pattern) // pp
    stage_params = []
    for stage in range(pp):
        chunk = pattern[stage * per:(stage + 1) * per]
        layers, moe_layers = len(chunk), sum(chunk)
        n = (layers * (counts.attention_per_layer + counts.norms_per_layer)
             + (layers - moe_layers) * counts.dense_mlp_per_layer
             + moe_layers * (counts.router_per_layer + counts.num_experts * counts.expert_per_expert))
        n += counts.embedding * (stage == 0)
        n += (counts.output + counts.final_norm) * (stage == pp - 1)  # a tied output layer is not sent again
        stage_params.append(n)
    bucket = cfg.rollout.weight_sync.bucket_bytes
    largest = max(m.vocab_size * m.hidden_size, m.num_attention_heads * m.kv_channels * m.hidden_size,
                  m.intermediate_size * m.hidden_size, m.moe_intermediate_size * m.hidden_size) * element
    stage_bytes = tuple(n * element for n in stage_params)
    engines = len(cfg.rollout.fleet.servers) if cfg.rollout.fleet is not None else cfg.rollout.cpu_servers
    return PushEstimate(transport=cfg.rollout.weight_sync.transport, engines=engines,
                        bytes_per_engine=sum(stage_bytes), stage_bytes=stage_bytes,
                        stage_buckets=tuple(max(1, math.ceil(b / bucket)) for b in stage_bytes),
                        largest_tensor_bytes=largest, bucket_bytes=bucket, bandwidth=bandwidth_gb_s * 1e9)


def _size(n: float) -> str:
    for scale, unit in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_push(est: PushEstimate) -> str:
    """The plan's weight-sync section."""
    stages = ", ".join(f"stage {i}: {_size(b)} in ~{n} bucket(s)"
                       for i, (b, n) in enumerate(zip(est.stage_bytes, est.stage_buckets)))
    how = {"distributed": "stages broadcast in turn, every byte once per link",
           "ipc": "device copies on the node",
           "disk": f"written once, read by each of {est.engines} engine(s) from the shared filesystem"}[est.transport]
    return "\n".join([
        f"== weight sync: {est.transport}, {est.engines} engine(s) ==",
        f"  bytes pushed per engine    {_size(est.bytes_per_engine):>12}  ({est.bytes_per_engine:,d} bytes; {stages})",
        f"  estimated push time        {est.seconds:>10.2f} s  at {est.bandwidth / 1e9:g} GB/s ({how})",
        f"  peak extra per source rank {_size(est.peak_extra_per_source_rank):>12}  (two buckets: "
        f"{_size(est.bucket_bytes)} each, or the largest tensor, {_size(est.largest_tensor_bytes)})",
    ]) + "\n"


__all__ = ["PushEstimate", "estimate_push", "format_push"]
