"""CPU rollout server (not SGLang): HF transformers generation behind SGLang's native HTTP API."""

# Request limits (server arguments --max-request-samples / --max-body-bytes; see app.py). A trainer
# request is one prompt with n = its group size (tens of samples); 1024 leaves room for batched prompts,
# while 1,000,000 would hold the event loop for ~40 s and take 1.5 GB before generating anything.
# 32 MiB holds ~4M token ids. Here, not in app.py, so that --help does not import torch.
DEFAULT_MAX_REQUEST_SAMPLES = 1024
DEFAULT_MAX_BODY_BYTES = 32 << 20
