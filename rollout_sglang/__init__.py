"""SGLang rollout fleet: client, launcher/supervisor, router, weight sync, and a CPU rollout server.

It imports nothing from ``megatron_vespo`` (the trainer uses it, never the other way round); what it
offers the trainer's driver is stated in ``contracts``.

Modules (one concept each):

- ``contracts``: :class:`GenerationTarget`, :class:`WeightSync` / :class:`StagedWeightSync` /
  :class:`WeightSender`, :class:`RolloutFleet` (what the driver uses).
- ``client``: :class:`SGLangClient`, async client for SGLang's native HTTP API (generation with n
  samples, log-probs, routed experts, weight version; control calls; retries with backoff).
- ``types`` / ``errors``: :class:`Sample`, :class:`FinishReason`, strict response parsing; error types.
- ``config``: typed fleet / router / server / weight-sync configs (built with
  ``typed_config.build``).
- ``launch``: command lines for ``sglang.launch_server``, the CPU server and ``sglang_router``; the
  :class:`ServerLauncher` interface and :class:`LocalLauncher` (subprocesses on this node).
- ``ray_launcher``: :class:`RayLauncher`, one Ray actor per server in a placement group (multi-node fleets).
- ``router``: :class:`RouterProcess`, the real sglang-router with run-time worker add/remove.
- ``die_with_parent``: how every process the fleet starts locally is killed when the trainer dies.
- ``fleet``: :class:`Fleet`, M server processes (local or Ray) behind the router, supervised; fan-out
  control calls (weight versions, abort, pause/continue).
- ``worker_pool``: :class:`WorkerPool`, requests that bypass the router (routed experts) to its healthy
  workers directly; :func:`generation_target` picks the router's client or the pool.
- ``process_group``: a weight-update process group built exactly the way SGLang builds its side.
- ``weight_sync``: one module per transport, each with the fleet owner's side and a per-stage sender:
  ``disk`` (shards per stage, one index, commit by rename), ``distributed`` (a broadcast group per
  stage; gloo on CPU, NCCL on GPU), ``ipc`` (CUDA IPC handles for engines on the trainer's node, each
  engine TP rank from its own GPU); ``common`` bucketing and the open/commit bookkeeping;
  ``make_weight_sync`` / ``make_sender``.
- ``cpu_server``: the CPU rollout server (not SGLang): HF transformers Qwen3 / Qwen3-MoE on CPU.
"""
