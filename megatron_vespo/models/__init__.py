"""The policy model on Megatron-Core.

- :mod:`~megatron_vespo.models.layout` — parallel-layout rules, checked before any process group;
- :mod:`~megatron_vespo.models.provider` — model YAML -> ``TransformerConfig`` + layer spec -> ``GPTModel``;
- :mod:`~megatron_vespo.models.full_state` — canonical weight shards; full (unsharded) weights loaded into any layout;
- :mod:`~megatron_vespo.models.trainable` — model chunks wrapped for training (DDP) + Megatron optimizer.

Submodules are imported on use: ``megatron_vespo.config`` imports ``layout`` and must stay light.
"""
