"""Prompt datasets for the RL driver: files (jsonl/parquet) and the synthetic verifiable task."""
from megatron_vespo.data.dataset import (
    DataError, PromptDataset, PromptRow, PromptSampler, check_run_data, load_prompt_dataset,
)
from megatron_vespo.data.synthetic import SyntheticVocab, synthetic_rows

__all__ = ["DataError", "PromptDataset", "PromptRow", "PromptSampler", "SyntheticVocab", "check_run_data",
           "load_prompt_dataset", "synthetic_rows"]
