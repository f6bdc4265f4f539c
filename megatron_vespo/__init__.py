"""megatron-vespo: VESPO reinforcement learning for MoE language models on Megatron-Core."""
__version__ = "0.1.0"
