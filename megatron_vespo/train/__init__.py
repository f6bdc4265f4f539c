"""Training-side building blocks: token log-probs over vocab-parallel logits, THD sequence packing."""
