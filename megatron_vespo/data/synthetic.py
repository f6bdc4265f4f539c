"""The synthetic verifiable task: "reverse" or "sort" a few digits, over a 16-token vocabulary.

Token ids: digits 0-9 are themselves; then one token per task, the separator and end-of-sequence.
A prompt is ``[task, d1, ..., dk, SEP]``; the answer is the k transformed digits (then EOS). The
task needs no tokenizer, so the quickstart runs with a randomly initialised tiny model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SyntheticVocab:
    """Token ids of the synthetic task (vocab_size is the smallest model vocabulary that fits)."""

    reverse: int = 10
    sort: int = 11
    sep: int = 12
    eos: int = 13
    vocab_size: int = 16

    def task_token(self, task: str) -> int:
        if task not in ("reverse", "sort"):
            raise ValueError(f"synthetic task must be 'reverse' or 'sort'; got {task!r}")
        return self.reverse if task == "reverse" else self.sort


VOCAB = SyntheticVocab()


def synthetic_answer(task: str, digits: list[int]) -> list[int]:
    return list(reversed(digits)) if task == "reverse" else sorted(digits)


def synthetic_rows(task: str, num_digits: int) -> list[dict[str, Any]]:
    """Every digit string of length ``num_digits`` (10^k rows, capped at 100k) as dataset rows
    ``{"prompt_ids", "ground_truth"}``; the ground truth is the list of answer token ids."""
    head = VOCAB.task_token(task)
    rows = []
    for digits in itertools.islice(itertools.product(range(10), repeat=num_digits), 100_000):
        digits = list(digits)
        rows.append({"prompt_ids": [head, *digits, VOCAB.sep], "ground_truth": synthetic_answer(task, digits)})
    return rows
