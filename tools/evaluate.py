#!/usr/bin/env python
"""Command line of :func:`megatron_vespo.driver.evaluation.main` (run with --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable without installing the package

from megatron_vespo.driver.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
