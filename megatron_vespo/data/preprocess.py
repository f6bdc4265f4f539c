"""Math datasets -> the training schema: one row per problem, ``{"prompt", "ground_truth", "source"}``.

``prompt`` is the bare problem text (the run config adds ``data.prompt_suffix`` and the chat template),
``ground_truth`` the answer as a string (what the math verifier compares with), ``source`` the dataset
name. Rows come from the Hugging Face hub (needs the ``datasets`` package and network) or from a local
jsonl/parquet file with the same fields as the hub copy. Problems are deduplicated by default
(the hub's DAPO-Math-17k repeats each of its ~17.9k problems about 100 times).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_vespo.data.dataset import DataError, read_rows

# DAPO-Math-17k wraps each problem in its own answer-format instruction; we keep only the problem,
# since our runs ask for a boxed answer instead (data.prompt_suffix; docs/scale_out.md §3).
_DAPO_PREFIX = re.compile(r"^Solve the following math problem step by step\. The last line of your response should "
                          r"be of the form Answer: \$Answer \(without quotes\) where \$Answer is the answer to the "
                          r"problem\.\s*")
_DAPO_SUFFIX = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def strip_dapo_instruction(text: str) -> str:
    return _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", text)).strip()


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives on the hub and which of its fields hold the problem and the answer."""

    name: str
    hub_id: str
    split: str
    problem_field: str  # dotted path; a list of chat messages is reduced to the user turn's content
    answer_field: str  # dotted path
    hub_config: Optional[str] = None
    strip_dapo: bool = False
    default_format: str = "jsonl"


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (
        DatasetSpec("dapo_math_17k", "BytedTsinghua-SIA/DAPO-Math-17k", "train", "prompt",
                    "reward_model.ground_truth", strip_dapo=True, default_format="parquet"),
        DatasetSpec("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer"),
        DatasetSpec("aime25", "math-ai/aime25", "test", "problem", "answer"),
        DatasetSpec("amc23", "math-ai/amc23", "test", "question", "answer"),
        DatasetSpec("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    )
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _lookup(row: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = row
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: missing field {'.'.join(dotted.split('.')[:i + 1])!r}; has {have}")
        value = value[part]
    return value


def _problem_text(value: Any, where: str) -> str:
    if isinstance(value, list):  # chat messages: the user's turn
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) != 1 or not isinstance(users[0], str):
            raise DataError(f"{where}: expected exactly one user message with text content; got {value!r:.200}")
        value = users[0]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: problem must be non-empty text; got {value!r:.200}")
    return value.strip()


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: answer must be text or a number; got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 27.0 -> "27" (AMC answers are stored as floats)
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: empty answer")
    return text


def convert_rows(rows: Iterable[dict[str, Any]], spec: DatasetSpec, origin: str,
                 dedupe: bool = True, limit: Optional[int] = None) -> list[dict[str, str]]:
    """Source rows -> training rows; a bad row raises DataError naming ``origin`` and the row number."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{origin} row {i}"
        problem = _problem_text(_lookup(row, spec.problem_field, where), where)
        if spec.strip_dapo:
            problem = strip_dapo_instruction(problem)
        answer = _answer_text(_lookup(row, spec.answer_field, where), where)
        if dedupe:
            if problem in seen:
                continue
            seen.add(problem)
        out.append({"prompt": problem, "ground_truth": answer, "source": spec.name})
        if limit is not None and len(out) >= limit:
            break
    return out


def load_hub_rows(spec: DatasetSpec) -> list[dict[str, Any]]:
    """The dataset split from the Hugging Face hub (needs the ``datasets`` package and network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.name}: reading {spec.hub_id} from the hub needs the 'datasets' package "
                        "(pip install datasets), or pass a local jsonl/parquet copy with --input") from None
    return list(datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split))


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise DataError(f"{path}: unsupported output type {path.suffix!r} (use .jsonl or .parquet)")
    return path


def preprocess(name: str, output_dir: str | Path, input_path: Optional[str | Path] = None,
               fmt: Optional[str] = None, dedupe: bool = True, limit: Optional[int] = None) -> tuple[Path, int]:
    """Convert one dataset (from ``input_path`` or the hub) into ``<output_dir>/<name>.<fmt>``."""
    spec = get_spec(name)
    if input_path is not None:
        raw, origin = read_rows(Path(input_path)), str(input_path)
    else:
        raw, origin = load_hub_rows(spec), f"{spec.hub_id}[{spec.split}]"
    rows = convert_rows(raw, spec, origin, dedupe=dedupe, limit=limit)
    if not rows:
        raise DataError(f"{origin}: no rows")
    out = write_rows(rows, Path(output_dir) / f"{name}.{fmt or spec.default_format}")
    return out, len(rows)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Write math datasets in the training schema (prompt, ground_truth, source). Train set: "
                    "dapo_math_17k (parquet); eval sets: aime24, aime25, amc23, math500 (jsonl).")
    parser.add_argument("datasets", nargs="+", help=f"names ({', '.join(DATASETS)}) or 'all'")
    parser.add_argument("--input", help="local jsonl/parquet copy with the hub's fields (one dataset only); "
                        "default: download from the Hugging Face hub")
    parser.add_argument("--output-dir", default="data", help="where <name>.<format> is written (default: data)")
    parser.add_argument("--format", choices=["jsonl", "parquet"], help="default: parquet for the train set, "
                        "jsonl for eval sets")
    parser.add_argument("--limit", type=int, help="keep the first N (deduplicated) problems")
    parser.add_argument("--keep-duplicates", action="store_true", help="do not drop repeated problems")
    args = parser.parse_args(argv)
    names = list(DATASETS) if args.datasets == ["all"] else args.datasets
    if args.input and len(names) != 1:
        parser.error("--input converts exactly one dataset")
    try:
        for name in names:
            out, count = preprocess(name, args.output_dir, args.input, args.format,
                                    dedupe=not args.keep_duplicates, limit=args.limit)
            print(f"{name}: {count} rows -> {out}")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
