"""Experiment grids: many ``megatron-vespo train`` runs, their metrics summarised into one table and plot.

- :mod:`~megatron_vespo.experiments.grid`: runs a list of training runs as subprocesses, a few at a
  time, each with a timeout, every one dying with this process;
- :mod:`~megatron_vespo.experiments.summary`: one run's ``metrics.jsonl`` -> final/best reward, steps to
  a threshold, collapse, W tail; several runs -> one table row; the markdown table;
- :mod:`~megatron_vespo.experiments.sweep`: ``megatron-vespo sweep`` (loss x staleness x seed).

``benchmarks/bench_replay_ab.py`` is another grid built on the first two.
"""
