"""Prompt rows from jsonl/parquet files (or the synthetic task), tokenised and length-filtered.

A row needs ``prompt_ids`` (a list of token ids) or ``prompt`` (text, tokenised with
``data.tokenizer``), plus the ground-truth field the verifier checks. Bad rows fail loudly, naming
the file and row; prompts longer than ``rollout.max_prompt_len`` are dropped and counted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_vespo.config.schema import DataConfig, RunConfig
from megatron_vespo.data.synthetic import synthetic_rows
from typed_config import ConfigError


class DataError(ValueError):
    """A problem with the prompt data, naming the file and row."""


@dataclass(frozen=True)
class PromptRow:
    index: int  # row number in the source (after nothing is dropped: the original position)
    prompt_ids: list[int]
    ground_truth: Any
    text: Optional[str] = None  # the row's 'prompt' text (rollout functions may read it); None for token-id rows


@dataclass
class PromptDataset:
    rows: list[PromptRow]
    source: str
    num_filtered_too_long: int = 0


def _decode_utf8(path: Path) -> str:
    """The text of ``path``; DataError naming the file, line and byte when it is not UTF-8 (a traceback
    from ``read_text`` names neither)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                        "save the file as UTF-8") from None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.parquet`` file as dicts."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_decode_utf8(path).splitlines(), start=1):
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


def _tokenize(tokenizer: Any, text: str, cfg: DataConfig) -> list[int]:
    text = text + cfg.prompt_suffix
    if cfg.apply_chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_vocab(ids: list[int], vocab_size: Optional[int], where: str, what: str) -> None:
    """DataError for the first id outside ``[0, vocab_size)``: the server would reject it (or index out
    of its embedding) only at the first request, long after the launch."""
    if vocab_size is None:
        return
    for position, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise DataError(f"{where}: token id {token} at position {position} of {what} is outside the model's "
                            f"vocabulary [0, {vocab_size}) (model.vocab_size)")


def build_rows(raw_rows: Iterable[dict[str, Any]], source: str, cfg: DataConfig, max_prompt_len: int,
               tokenizer: Any = None, vocab_size: Optional[int] = None) -> PromptDataset:
    """Validate and tokenise raw rows; drop (and count) prompts longer than ``max_prompt_len``. With
    ``vocab_size`` (the model's) every token id must lie in ``[0, vocab_size)``."""
    rows: list[PromptRow] = []
    too_long = 0
    for i, raw in enumerate(raw_rows):
        where = f"{source} row {i}"
        if cfg.ground_truth_key not in raw:
            raise DataError(f"{where}: missing field {cfg.ground_truth_key!r} (data.ground_truth_key); "
                            f"fields: {sorted(raw)}")
        text = raw.get("prompt") if isinstance(raw.get("prompt"), str) else None
        if raw.get("prompt_ids") is not None:
            ids = raw["prompt_ids"]
            if not isinstance(ids, (list, tuple)) or not ids or \
                    not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise DataError(f"{where}: 'prompt_ids' must be a non-empty list of token ids")
            ids = list(ids)
            _check_vocab(ids, vocab_size, where, "'prompt_ids'")
        elif raw.get("prompt") is not None:
            if not isinstance(raw["prompt"], str):
                raise DataError(f"{where}: 'prompt' must be text; got {type(raw['prompt']).__name__}")
            if tokenizer is None:
                raise DataError(f"{where}: text 'prompt' needs a tokenizer (set data.tokenizer)")
            ids = _tokenize(tokenizer, raw["prompt"], cfg)
            _check_vocab(ids, vocab_size, where, "the tokenised 'prompt' (data.tokenizer)")
        else:
            raise DataError(f"{where}: missing field 'prompt' or 'prompt_ids'; fields: {sorted(raw)}")
        if len(ids) > max_prompt_len:
            too_long += 1
            continue
        rows.append(PromptRow(index=i, prompt_ids=ids, ground_truth=raw[cfg.ground_truth_key], text=text))
    if not rows:
        why = f" ({too_long} longer than rollout.max_prompt_len={max_prompt_len})" if too_long else ""
        raise DataError(f"{source}: no usable prompts{why}")
    return PromptDataset(rows=rows, source=source, num_filtered_too_long=too_long)


def load_tokenizer(cfg: DataConfig) -> Optional[Any]:
    """The tokenizer ``data.tokenizer`` names (None when empty); ConfigError naming the field when it
    cannot be loaded."""
    if not cfg.tokenizer:
        return None
    name = os.path.expanduser(cfg.tokenizer)
    # A path that does not exist would otherwise be tried as a Hub repository id (a slow network
    # failure with a long traceback).
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # Hub ids are "org/name"
    if looks_like_path and not Path(name).exists():
        raise ConfigError("data.tokenizer", f"{cfg.tokenizer}: no such tokenizer directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("data.tokenizer", f"cannot load a tokenizer from {cfg.tokenizer!r}: {first}") from None


def load_prompt_dataset(cfg: DataConfig, max_prompt_len: int, tokenizer: Any = None,
                        vocab_size: Optional[int] = None) -> PromptDataset:
    """The dataset named by ``cfg`` (file, or the synthetic task when ``cfg.path`` is empty); with
    ``vocab_size`` every token id is checked against the model's vocabulary."""
    if not cfg.path:
        task = cfg.synthetic
        return build_rows(synthetic_rows(task.task, task.num_digits), f"synthetic:{task.task}{task.num_digits}",
                          cfg, max_prompt_len, vocab_size=vocab_size)
    path = Path(cfg.path)
    return build_rows(read_rows(path), str(path), cfg, max_prompt_len, tokenizer, vocab_size=vocab_size)


def check_run_data(cfg: RunConfig) -> list[str]:
    """Everything a training run reads from its data before the first request, read now: the
    tokenizer, the training prompts and every eval set's file, each token id checked against
    ``model.vocab_size``. Raises DataError / ConfigError naming the file, row or field; returns one
    summary line per dataset. ``megatron-vespo check`` and ``train`` run it before launching."""
    tokenizer = load_tokenizer(cfg.data)
    vocab = cfg.model.vocab_size
    max_prompt_len = cfg.rollout.max_prompt_len
    train = load_prompt_dataset(cfg.data, max_prompt_len, tokenizer, vocab_size=vocab)
    lines = [f"data: {train.source}: {len(train.rows)} prompts ({train.num_filtered_too_long} longer than "
             f"rollout.max_prompt_len={max_prompt_len} dropped)"]
    if cfg.eval.sets and cfg.eval.every_steps:  # the trainer loads eval sets only when it evaluates
        for i, set_cfg in enumerate(cfg.eval.sets):  # an empty path: the synthetic task's prompts
            found = load_prompt_dataset(dataclasses.replace(cfg.data, path=set_cfg.path), max_prompt_len,
                                        tokenizer, vocab_size=vocab)
            used = min(set_cfg.num_prompts or len(found.rows), len(found.rows))
            lines.append(f"eval.sets[{i}] ({set_cfg.name}): {used} prompts of {found.source}")
    return lines


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
