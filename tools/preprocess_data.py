#!/usr/bin/env python
"""Command line of :mod:`megatron_vespo.data.preprocess` (run with --help).

  python tools/preprocess_data.py all                          # from the Hugging Face hub
  python tools/preprocess_data.py aime24 --input aime24.parquet  # from a local copy
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable without installing the package

from megatron_vespo.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
