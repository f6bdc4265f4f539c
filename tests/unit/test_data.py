"""Prompt datasets: jsonl/parquet rows, errors naming the row, length filtering, the synthetic task."""
from __future__ import annotations

import json

import pytest

from megatron_vespo.config.schema import DataConfig
from megatron_vespo.data import DataError, PromptSampler, load_prompt_dataset, synthetic_rows
from megatron_vespo.data.synthetic import VOCAB
from megatron_vespo.driver.rollout import split_mini_batches
from megatron_vespo.train.sample import TrainSample


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_with_ids_and_length_filter(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt_ids": [1, 2, 3], "ground_truth": "a"},
        {"prompt_ids": list(range(20)), "ground_truth": "b"},  # too long
        {"prompt_ids": [4], "ground_truth": "c"},
    ])
    ds = load_prompt_dataset(DataConfig(path=str(path)), max_prompt_len=8)
    assert [(r.index, r.prompt_ids, r.ground_truth) for r in ds.rows] == [(0, [1, 2, 3], "a"), (2, [4], "c")]
    assert ds.num_filtered_too_long == 1


def test_parquet_rows_and_custom_answer_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt_ids": [5, 6], "answer": "12"}]), path)
    ds = load_prompt_dataset(DataConfig(path=str(path), ground_truth_key="answer"), max_prompt_len=8)
    assert ds.rows[0].prompt_ids == [5, 6] and ds.rows[0].ground_truth == "12"


@pytest.mark.parametrize("rows, fragment", [
    ([{"prompt_ids": [1]}, {"prompt_ids": [2], "ground_truth": 1}], "row 0: missing field 'ground_truth'"),
    ([{"prompt_ids": [1], "ground_truth": 1}, {"ground_truth": 2}], "row 1: missing field 'prompt' or 'prompt_ids'"),
    ([{"prompt_ids": [], "ground_truth": 1}], "row 0: 'prompt_ids' must be a non-empty list"),
    ([{"prompt_ids": ["a"], "ground_truth": 1}], "row 0: 'prompt_ids' must be a non-empty list"),
    ([{"prompt": "text", "ground_truth": 1}], "row 0: text 'prompt' needs a tokenizer"),
    ([{"prompt_ids": list(range(30)), "ground_truth": 1}], "no usable prompts (1 longer than"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_prompt_dataset(DataConfig(path=str(path)), max_prompt_len=8)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_empty_missing_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompt_dataset(DataConfig(path=str(empty)), max_prompt_len=8)
    with pytest.raises(DataError, match="file not found"):
        load_prompt_dataset(DataConfig(path=str(tmp_path / "missing.jsonl")), max_prompt_len=8)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt_ids": [1], "ground_truth": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompt_dataset(DataConfig(path=str(broken)), max_prompt_len=8)
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        (tmp_path / "d.csv").write_text("x")
        load_prompt_dataset(DataConfig(path=str(tmp_path / "d.csv")), max_prompt_len=8)


def test_token_ids_are_checked_against_the_vocabulary_at_load(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [1, 2], "ground_truth": 1},
                                               {"prompt_ids": [3, 128, 4], "ground_truth": 2}])
    assert len(load_prompt_dataset(DataConfig(path=str(path)), max_prompt_len=8).rows) == 2  # no vocab: not checked
    with pytest.raises(DataError) as info:
        load_prompt_dataset(DataConfig(path=str(path)), max_prompt_len=8, vocab_size=128)
    assert f"{path} row 1: token id 128 at position 1" in str(info.value) and "[0, 128)" in str(info.value)
    with pytest.raises(DataError, match=r"synthetic:reverse3 row 0: token id 10 .* \[0, 8\)"):
        load_prompt_dataset(DataConfig(), max_prompt_len=8, vocab_size=8)
    bools = write_jsonl(tmp_path / "bools.jsonl", [{"prompt_ids": [True], "ground_truth": 1}])
    with pytest.raises(DataError, match="must be a non-empty list of token ids"):
        load_prompt_dataset(DataConfig(path=str(bools)), max_prompt_len=8)


def test_unreadable_files_are_data_errors_naming_the_file(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt_ids": [1], "ground_truth": 1}\n{"prompt_ids": [2], "ground_truth": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_prompt_dataset(DataConfig(path=str(latin)), max_prompt_len=8)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DataError, match=r"fake.parquet: not a readable parquet file"):
        load_prompt_dataset(DataConfig(path=str(fake)), max_prompt_len=8)


def test_missing_tokenizer_directory_is_a_config_error(tmp_path):
    from megatron_vespo.config import ConfigError
    from megatron_vespo.data.dataset import load_tokenizer

    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*no such tokenizer directory"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope")))


def test_text_prompts_use_the_tokenizer_and_suffix(tmp_path):
    class CharTokenizer:  # a real (if trivial) tokenizer object with the HF call signature
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab", "ground_truth": "1"}])
    ds = load_prompt_dataset(DataConfig(path=str(path), prompt_suffix="!"), max_prompt_len=8, tokenizer=CharTokenizer())
    assert ds.rows[0].prompt_ids == [ord("a"), ord("b"), ord("!")]


@pytest.mark.parametrize("task, digits, answer", [("reverse", [1, 2, 3], [3, 2, 1]), ("sort", [3, 1, 2], [1, 2, 3])])
def test_synthetic_task_rows(task, digits, answer):
    rows = synthetic_rows(task, 3)
    assert len(rows) == 1000
    head = VOCAB.reverse if task == "reverse" else VOCAB.sort
    row = next(r for r in rows if r["prompt_ids"] == [head, *digits, VOCAB.sep])
    assert row["ground_truth"] == answer
    assert max(max(r["prompt_ids"]) for r in rows) < VOCAB.vocab_size
    ds = load_prompt_dataset(DataConfig(), max_prompt_len=5)
    assert len(ds.rows) == 1000 and ds.source == "synthetic:reverse3"


def test_sampler_covers_each_epoch_once_and_reshuffles():
    ds = load_prompt_dataset(DataConfig(), max_prompt_len=5)
    sampler = PromptSampler(ds, seed=0)
    first = [r.index for r in sampler.next_batch(1000)]
    second = [r.index for r in sampler.next_batch(1000)]
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != second and sampler.epoch == 1


def test_mini_batches_keep_groups_whole_and_in_order():
    # prompt_ids identify (prompt, sample); sample 0 of every group has an empty response
    groups = [[TrainSample(prompt_ids=[p, k], response_ids=[1] if k else [], rollout_logp=[0.0] if k else [],
                           advantage=0.0) for k in range(3)] for p in range(4)]
    mbs = split_mini_batches(groups, 2)
    assert [[tuple(s.prompt_ids) for s in mb] for mb in mbs] == [[(0, 1), (0, 2), (1, 1), (1, 2)],
                                                                [(2, 1), (2, 2), (3, 1), (3, 2)]]
    with pytest.raises(ValueError, match="do not split"):
        split_mini_batches(groups, 3)
