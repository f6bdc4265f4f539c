#!/usr/bin/env python
"""PNG of a run's training curves (reward, W, φ) from its metrics.jsonl.

  python tools/plot_metrics.py outputs/quickstart/metrics.jsonl            # -> outputs/quickstart/metrics.png
  python tools/plot_metrics.py outputs/run/metrics.jsonl -o curves.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable without installing the package

from megatron_vespo.plotting import plot_metrics  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics.jsonl of a run (run.output_dir/metrics.jsonl)")
    parser.add_argument("-o", "--output", help="PNG path (default: metrics.png next to the metrics file)")
    args = parser.parse_args(argv)
    src = Path(args.metrics)
    if not src.is_file():
        print(f"error: {src}: file not found", file=sys.stderr)
        return 2
    try:
        out = plot_metrics(src, args.output or src.with_suffix(".png"))
    except (ValueError, KeyError) as exc:
        print(f"error: {src}: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
