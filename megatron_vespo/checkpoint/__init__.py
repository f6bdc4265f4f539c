"""Checkpoints in Hugging Face form and their bridge to Megatron-Core.

- :mod:`~megatron_vespo.checkpoint.hf_mapping` — the declarative HF <-> Megatron table for Qwen3 /
  Qwen3-MoE (:class:`Qwen3Mapping`), applied one tensor group at a time;
- :mod:`~megatron_vespo.checkpoint.hf_io` — streaming safetensors reader/writer, ``config.json`` <->
  :class:`ModelConfig`, atomic output directories;
- :mod:`~megatron_vespo.checkpoint.export` — HF-named weights of a live parallel model in
  size-bounded buckets (the source for weight sync).

The converters are ``tools/convert_hf_to_mcore.py`` and ``tools/convert_mcore_to_hf.py``.
Submodules are imported on use (``export`` needs Megatron-Core; the others only torch).
"""
