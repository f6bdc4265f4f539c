"""Dataset preprocessing from local files shaped like the hub copies (no hub access in tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_vespo.config.schema import DataConfig
from megatron_vespo.data.dataset import DataError, build_rows, read_rows
from megatron_vespo.data.preprocess import DATASETS, load_hub_rows, preprocess

REPO = Path(__file__).resolve().parents[2]
DAPO_WRAP = ("Solve the following math problem step by step. The last line of your response should be of the form "
             "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
             "Remember to put your answer on its own line after \"Answer:\".")


def dapo_row(problem: str, answer: str, index: int) -> dict:
    """A row as in BytedTsinghua-SIA/DAPO-Math-17k: chat prompt, nested ground truth."""
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_WRAP.format(problem)}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lean"},
            "extra_info": {"index": str(index)}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dapo_parquet_is_unwrapped_and_deduplicated(tmp_path):
    rows = [dapo_row("What is $1+1$?", "2", 0), dapo_row("Find $x$ if $2x=6$.", "3", 1)] * 3
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out, count = preprocess("dapo_math_17k", tmp_path / "data", src)
    assert out == tmp_path / "data/dapo_math_17k.parquet" and count == 2
    assert read_rows(out) == [
        {"prompt": "What is $1+1$?", "ground_truth": "2", "source": "dapo_math_17k"},
        {"prompt": "Find $x$ if $2x=6$.", "ground_truth": "3", "source": "dapo_math_17k"},
    ]
    _, kept = preprocess("dapo_math_17k", tmp_path / "dup", src, dedupe=False)
    assert kept == 6


@pytest.mark.parametrize("name, problem_key, answer", [
    ("aime24", "problem", "204"), ("aime25", "problem", "70"), ("amc23", "question", 27.0),
    ("math500", "problem", "\\frac{14}{3}"),
])
def test_eval_sets_from_jsonl(tmp_path, name, problem_key, answer):
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{problem_key: f"  A {name} problem.  ", "answer": answer,
                                                      "id": 7}])
    out, count = preprocess(name, tmp_path / "data", src)
    assert out.suffix == ".jsonl" and count == 1
    row = read_rows(out)[0]
    expected = "27" if answer == 27.0 else answer  # float answers are written as integers
    assert row == {"prompt": f"A {name} problem.", "ground_truth": expected, "source": name}


def test_output_feeds_the_prompt_loader(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"problem": "Compute 3!", "answer": "6"}])
    out, _ = preprocess("math500", tmp_path, src)

    class CharTokenizer:  # a real (if trivial) tokenizer: one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    cfg = DataConfig(path=str(out), prompt_suffix=" Box it.")
    dataset = build_rows(read_rows(out), str(out), cfg, max_prompt_len=64, tokenizer=CharTokenizer())
    assert dataset.rows[0].ground_truth == "6"
    assert "".join(map(chr, dataset.rows[0].prompt_ids)) == "Compute 3! Box it."


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    src = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no answer"}])
    with pytest.raises(DataError, match=r"aime\.jsonl row 1: missing field 'answer'"):
        preprocess("aime24", tmp_path / "out", src)
    nested = tmp_path / "dapo.jsonl"
    write_jsonl(nested, [{"prompt": [{"role": "user", "content": "x"}], "reward_model": {"style": "rule"}}])
    with pytest.raises(DataError, match=r"row 0: missing field 'reward_model.ground_truth'"):
        preprocess("dapo_math_17k", tmp_path / "out", nested)
    with pytest.raises(DataError, match="unknown dataset"):
        preprocess("gsm8k", tmp_path / "out", src)


def test_hub_needs_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="needs the 'datasets' package.*--input"):
        load_hub_rows(DATASETS["aime24"])


def test_command_line(tmp_path):
    src = write_jsonl(tmp_path / "amc.jsonl", [{"question": "q1", "answer": 1.5}, {"question": "q2", "answer": 2}])
    proc = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "amc23", "--input", str(src),
                           "--output-dir", str(tmp_path / "d"), "--format", "parquet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "amc23: 2 rows" in proc.stdout
    assert [r["ground_truth"] for r in read_rows(tmp_path / "d/amc23.parquet")] == ["1.5", "2"]
    bad = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "amc23", "--input",
                          str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "file not found" in bad.stderr
