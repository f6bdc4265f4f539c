"""Prompt rows from jsonl/parquet files (or the synthetic task), tokenised and length-filtered.

A row needs ``prompt_ids`` (a list of token ids) or ``prompt`` (text, tokenised with
``data.tokenizer``), plus the ground-truth field the verifier checks. Bad rows fail loudly, naming
the file and row; prompts longer than ``rollout.max_prompt_len`` are dropped and counted.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_vespo.config.schema import DataConfig
from megatron_vespo.data.synthetic import synthetic_rows


class DataError(ValueError):
    """A problem with the prompt data, naming the file and row."""


@dataclass(frozen=True)
class PromptRow:
    index: int  # row number in the source (after nothing is dropped: the original position)
    prompt_ids: list[int]
    ground_truth: Any


@dataclass
class PromptDataset:
    rows: list[PromptRow]
    source: str
    num_filtered_too_long: int = 0


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.parquet`` file as dicts."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object; got {type(row).__name__}")
            rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


def _tokenize(tokenizer: Any, text: str, cfg: DataConfig) -> list[int]:
    text = text + cfg.prompt_suffix
    if cfg.apply_chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_rows(raw_rows: Iterable[dict[str, Any]], source: str, cfg: DataConfig, max_prompt_len: int,
               tokenizer: Any = None) -> PromptDataset:
    """Validate and tokenise raw rows; drop (and count) prompts longer than ``max_prompt_len``."""
    rows: list[PromptRow] = []
    too_long = 0
    for i, raw in enumerate(raw_rows):
        where = f"{source} row {i}"
        if cfg.ground_truth_key not in raw:
            raise DataError(f"{where}: missing field {cfg.ground_truth_key!r} (data.ground_truth_key); "
                            f"fields: {sorted(raw)}")
        if raw.get("prompt_ids") is not None:
            ids = raw["prompt_ids"]
            if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise DataError(f"{where}: 'prompt_ids' must be a non-empty list of token ids")
            ids = list(ids)
        elif raw.get("prompt") is not None:
            if not isinstance(raw["prompt"], str):
                raise DataError(f"{where}: 'prompt' must be text; got {type(raw['prompt']).__name__}")
            if tokenizer is None:
                raise DataError(f"{where}: text 'prompt' needs a tokenizer (set data.tokenizer)")
            ids = _tokenize(tokenizer, raw["prompt"], cfg)
        else:
            raise DataError(f"{where}: missing field 'prompt' or 'prompt_ids'; fields: {sorted(raw)}")
        if len(ids) > max_prompt_len:
            too_long += 1
            continue
        rows.append(PromptRow(index=i, prompt_ids=ids, ground_truth=raw[cfg.ground_truth_key]))
    if not rows:
        why = f" ({too_long} longer than rollout.max_prompt_len={max_prompt_len})" if too_long else ""
        raise DataError(f"{source}: no usable prompts{why}")
    return PromptDataset(rows=rows, source=source, num_filtered_too_long=too_long)


def load_tokenizer(cfg: DataConfig) -> Optional[Any]:
    if not cfg.tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer)


def load_prompt_dataset(cfg: DataConfig, max_prompt_len: int, tokenizer: Any = None) -> PromptDataset:
    """The dataset named by ``cfg`` (file, or the synthetic task when ``cfg.path`` is empty)."""
    if not cfg.path:
        task = cfg.synthetic
        return build_rows(synthetic_rows(task.task, task.num_digits), f"synthetic:{task.task}{task.num_digits}",
                          cfg, max_prompt_len)
    path = Path(cfg.path)
    return build_rows(read_rows(path), str(path), cfg, max_prompt_len, tokenizer)


class PromptSampler:
    """Endless batches of prompt rows: epoch after epoch, reshuffled per epoch with a fixed seed."""

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.rng = random.Random(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._order: list[int] = []
        self._pos = 0

    def _refill(self) -> None:
        self._order = list(range(len(self.dataset.rows)))
        if self.shuffle:
            self.rng.shuffle(self._order)
        self._pos = 0

    def state_dict(self) -> dict[str, Any]:
        """The data position (epoch, order, position, shuffle RNG) for training checkpoints."""
        return {"dataset_size": len(self.dataset.rows), "source": self.dataset.source, "shuffle": self.shuffle,
                "epoch": self.epoch, "order": list(self._order), "pos": self._pos, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken; the dataset must be the same size."""
        if state["dataset_size"] != len(self.dataset.rows):
            raise DataError(f"{self.dataset.source}: {len(self.dataset.rows)} prompts, but the checkpoint's sampler "
                            f"was over {state['dataset_size']} prompts of {state['source']}: not the same data")
        self.shuffle = state["shuffle"]
        self.epoch = state["epoch"]
        self._order = list(state["order"])
        self._pos = state["pos"]
        self.rng.setstate(state["rng"])

    def next_batch(self, size: int) -> list[PromptRow]:
        batch = []
        while len(batch) < size:
            if self._pos >= len(self._order):
                if self._order:
                    self.epoch += 1
                self._refill()
            batch.append(self.dataset.rows[self._order[self._pos]])
            self._pos += 1
        return batch
