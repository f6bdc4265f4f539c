"""SGLang rollout fleet: client, launcher/supervisor, router, weight sync, and a CPU rollout server.

Modules (one concept each):

- ``client``: :class:`SGLangClient`, async client for SGLang's native HTTP API (generation with n
  samples, log-probs, routed experts, weight version; control calls; retries with backoff).
- ``types`` / ``errors``: :class:`Sample`, :class:`FinishReason`, strict response parsing; error types.
- ``config``: typed fleet / router / server / weight-sync configs (built with
  ``megatron_vespo.config.typed.build``).
- ``launch``: command lines for ``sglang.launch_server``, the CPU server and ``sglang_router``; the
  :class:`ServerLauncher` interface and :class:`LocalLauncher` (subprocesses on this node).
- ``ray_launcher``: :class:`RayLauncher`, one Ray actor per server in a placement group (multi-node fleets).
- ``router``: :class:`RouterProcess`, the real sglang-router with run-time worker add/remove.
- ``fleet``: :class:`Fleet`, M server processes (local or Ray) behind the router, supervised.
- ``process_group``: a weight-update process group built exactly the way SGLang builds its side.
- ``weight_sync``: :class:`DiskWeightSync`, :class:`DistributedWeightSync` (gloo on CPU, NCCL on GPU),
  :class:`IPCWeightSync` (CUDA IPC handles for engines on the trainer's node), ``make_weight_sync``.
- ``cpu_server``: the CPU rollout server (not SGLang): HF transformers Qwen3 / Qwen3-MoE on CPU.
"""
