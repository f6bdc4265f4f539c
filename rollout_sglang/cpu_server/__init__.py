"""CPU rollout server (not SGLang): HF transformers generation behind SGLang's native HTTP API."""
