"""Evaluation: mean accuracy over k samples per prompt on each benchmark of ``cfg.eval``.

An :class:`Evaluator` lives on rank 0 (it needs no trainer). For every set it generates
``n_samples`` responses per prompt through a given URL (the fleet's router, or one server) with the
eval sampling parameters and the run's rollout function (``rollout.function``: a multi-turn task is
evaluated the way it is trained), scores them with the set's verifier and reports

- ``eval/<name>/accuracy``: the mean score over all prompts and samples (mean@k; with a 0/1
  verifier this is the paper's "mean accuracy over k samples"),
- ``eval/<name>/pass@k``: the fraction of prompts with at least one sample scoring >= 1.0,
- ``eval/<name>/verifier_errors`` and ``eval/<name>/verifier_timeouts`` (such samples score 0),
- ``eval/<name>/response_len_mean`` and ``eval/<name>/num_prompts``.

Sets come from a jsonl/parquet file in the training schema (:mod:`megatron_vespo.data.dataset`;
``num_prompts`` > 0 keeps the first rows) or, with an empty ``path``, from the synthetic task: the
task has no held-out split (training samples every digit string), so the set is ``num_prompts``
strings drawn with a seed different from the training sampler's.

Deterministic given the seed: request ids (hence the servers' sampling seeds) depend only on the
seed, the set name and the prompt index, so every evaluation of the same weights samples the same
responses, and evaluations at different steps compare the policies on the same random numbers.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_vespo.config.schema import EvalConfig, EvalSetConfig, RunConfig
from megatron_vespo.data.dataset import PromptRow, build_rows, load_prompt_dataset
from megatron_vespo.data.synthetic import synthetic_rows
from megatron_vespo.driver.rollout import RolloutGroup, response_text, run_groups
from megatron_vespo.rollout_function import RolloutSampling, load_rollout_function
from megatron_vespo.rewards.registry import ScoreRequest, Verifier, get_verifier, score_all
from rollout_sglang.client import SGLangClient
from typed_config import ConfigError

HELD_OUT_SEED_OFFSET = 7919  # synthetic eval prompts: a seed other than the training sampler's
CORRECT = 1.0  # a sample counts for pass@k when its score reaches this


@dataclass
class EvalSet:
    name: str
    rows: list[PromptRow]
    n_samples: int
    verifier: Verifier


@dataclass
class SetResult:
    name: str
    scores: list[list[float]]  # [prompt][sample]
    response_lengths: list[int]
    verifier_errors: int
    verifier_timeouts: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        flat = [s for row in self.scores for s in row]
        p = f"eval/{self.name}"
        return {
            f"{p}/accuracy": sum(flat) / len(flat),
            f"{p}/pass@k": sum(1 for row in self.scores if max(row) >= CORRECT) / len(self.scores),
            f"{p}/verifier_errors": float(self.verifier_errors),
            f"{p}/verifier_timeouts": float(self.verifier_timeouts),
            f"{p}/response_len_mean": sum(self.response_lengths) / len(self.response_lengths),
            f"{p}/num_prompts": float(len(self.scores)),
            f"{p}/n_samples": float(len(self.scores[0])),
            f"time/eval_{self.name}_s": self.seconds,  # under time/ like every wall-clock metric
        }


def load_eval_set(set_cfg: EvalSetConfig, index: int, cfg: RunConfig, seed: int, tokenizer: Any = None,
                  verifier_lookup: Optional[Callable[[str], Verifier]] = None) -> EvalSet:
    """The prompts and verifier of ``cfg.eval.sets[index]``; errors name the config field or the row."""
    where = f"eval.sets[{index}]"
    verifier_name = set_cfg.verifier or cfg.reward.verifier
    try:
        # The run's reward section: the http verifier is built from it (shared with training's scoring).
        verifier = (verifier_lookup or (lambda name: get_verifier(name, cfg.reward)))(verifier_name)
    except KeyError as exc:
        raise ConfigError(f"{where}.verifier", str(exc.args[0]).split(": ", 1)[-1]) from None
    max_prompt_len = cfg.rollout.max_prompt_len
    if set_cfg.path:
        data_cfg = dataclasses.replace(cfg.data, path=set_cfg.path)
        rows = load_prompt_dataset(data_cfg, max_prompt_len, tokenizer).rows
        if set_cfg.num_prompts:
            rows = rows[:set_cfg.num_prompts]
    else:
        task = cfg.data.synthetic
        source = f"synthetic:{task.task}{task.num_digits} (eval set {set_cfg.name!r})"
        rows = build_rows(synthetic_rows(task.task, task.num_digits), source, cfg.data, max_prompt_len).rows
        if set_cfg.num_prompts and set_cfg.num_prompts < len(rows):
            rows = random.Random(seed + HELD_OUT_SEED_OFFSET).sample(rows, set_cfg.num_prompts)
    return EvalSet(name=set_cfg.name, rows=rows, n_samples=set_cfg.n_samples, verifier=verifier)


def eval_sampling_params(eval_cfg: EvalConfig, cfg: RunConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": eval_cfg.max_response_len or cfg.rollout.max_response_len,
                              "temperature": eval_cfg.temperature, "top_p": eval_cfg.top_p}
    if cfg.rollout.stop_token_ids:
        params["stop_token_ids"] = list(cfg.rollout.stop_token_ids)
    return params


class Evaluator:
    """Rank 0: ``run(url, step)`` evaluates every configured set; ``due(step)`` says when to."""

    def __init__(self, cfg: RunConfig, tokenizer: Any = None, seed: Optional[int] = None):
        self.cfg = cfg
        self.eval_cfg = cfg.eval
        self.tokenizer = tokenizer
        self.seed = cfg.train.seed if seed is None else seed
        self.eval_cfg.check_set_names()
        self.sets = [load_eval_set(s, i, cfg, self.seed, tokenizer) for i, s in enumerate(self.eval_cfg.sets)]
        self.params = eval_sampling_params(self.eval_cfg, cfg)
        self.runner = load_rollout_function(cfg.rollout.function)
        self.last_step: Optional[int] = None  # the optimizer step evaluated last (never twice)

    def due(self, optimizer_step: int, previous: Optional[int] = None) -> bool:
        """True when a multiple of ``eval.every_steps`` lies in ``(previous, optimizer_step]`` (previous
        defaults to ``optimizer_step - 1``; a loop doing N steps per rollout passes the count before
        them). Never when every_steps is 0 or there is no set."""
        k = self.eval_cfg.every_steps
        if not self.sets or k <= 0:
            return False
        previous = optimizer_step - 1 if previous is None else previous
        return optimizer_step // k > max(previous, 0) // k

    def maybe_run(self, url: str, step: int, previous: int, final: bool = False,
                  one_request_per_sample: bool = False) -> dict[str, float]:
        """During training: evaluate when :meth:`due` (a multiple of ``eval.every_steps`` in
        ``(previous, step]``) or at the end of the run (``final``), unless ``step`` was evaluated
        already. The ``eval/*`` metrics with ``time/eval_s``; empty when nothing ran."""
        if step == self.last_step or not (self.due(step, previous=previous) or final):
            return {}
        t0 = time.monotonic()
        metrics = self.run(url, step, one_request_per_sample)
        self.last_step = step
        metrics["time/eval_s"] = time.monotonic() - t0
        print("[eval] step " + str(step) + ": " + ", ".join(
            f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k.endswith("/accuracy")), flush=True)
        return metrics

    def run(self, url: str, step: int = 0, one_request_per_sample: bool = False) -> dict[str, float]:
        """Evaluate every set through ``url``; the metrics of all sets (``eval/step`` included).
        ``one_request_per_sample``: see :class:`~rollout_sglang.client.SGLangClient`."""
        metrics: dict[str, float] = {"eval/step": float(step)}
        for result in self.evaluate(url, one_request_per_sample):
            metrics.update(result.metrics())
        return metrics

    def evaluate(self, url: str, one_request_per_sample: bool = False) -> list[SetResult]:
        return [self._evaluate_set(url, s, one_request_per_sample) for s in self.sets]

    def _evaluate_set(self, url: str, eval_set: EvalSet, one_request_per_sample: bool) -> SetResult:
        t0 = time.monotonic()
        groups = asyncio.run(self._generate(url, eval_set, one_request_per_sample))
        responses = [g.responses for g in groups]
        requests = [ScoreRequest(response_ids=list(r.output_ids), response_text=response_text(self.tokenizer, r),
                                 ground_truth=row.ground_truth, prompt_ids=list(row.prompt_ids))
                    for row, group in zip(eval_set.rows, responses) for r in group]
        flat, stats = score_all(eval_set.verifier, requests, self.cfg.reward.timeout_s)
        k = eval_set.n_samples
        return SetResult(name=eval_set.name, scores=[flat[i * k:(i + 1) * k] for i in range(len(eval_set.rows))],
                         response_lengths=[len(r.output_ids) for group in responses for r in group],
                         verifier_errors=stats.errors, verifier_timeouts=stats.timeouts,
                         seconds=time.monotonic() - t0)

    async def _generate(self, url: str, eval_set: EvalSet, one_request_per_sample: bool) -> list[RolloutGroup]:
        sampling = RolloutSampling(n=eval_set.n_samples, params=self.params,
                                   max_response_len=self.params["max_new_tokens"])
        async with SGLangClient(url, request_timeout_s=self.cfg.rollout.request_timeout_s,
                                one_request_per_sample=one_request_per_sample) as client:
            return await run_groups(client, eval_set.rows, self.runner, sampling, f"eval-{self.seed}-{eval_set.name}",
                                    self.cfg.rollout.max_concurrency, self.tokenizer)


def format_table(metrics: dict[str, float], names: Sequence[str]) -> str:
    """A plain-text table: one row per set (accuracy, pass@k, prompts x samples, errors)."""
    lines = [f"{'set':<16} {'accuracy':>9} {'pass@k':>8} {'prompts':>8} {'k':>3} {'errors':>7} {'timeouts':>9}"]
    for name in names:
        p = f"eval/{name}"
        lines.append(f"{name:<16} {metrics[p + '/accuracy']:>9.4f} {metrics[p + '/pass@k']:>8.4f} "
                     f"{int(metrics[p + '/num_prompts']):>8} {int(metrics[p + '/n_samples']):>3} "
                     f"{int(metrics[p + '/verifier_errors']):>7} {int(metrics[p + '/verifier_timeouts']):>9}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/evaluate.py``: evaluate an HF checkpoint (CPU servers booted here) or a running server."""
    import argparse

    from megatron_vespo.config.loader import load_run_config
    from megatron_vespo.data.dataset import load_tokenizer

    parser = argparse.ArgumentParser(description="Mean accuracy over k samples per prompt on the eval sets of a "
                                                 "run config (its `eval` section; data/reward/rollout as in training).")
    parser.add_argument("config", help="run YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.sets[0].n_samples=8")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="HF model directory: boot CPU rollout servers on it")
    source.add_argument("--url", help="a running SGLang-API server or sglang-router")
    parser.add_argument("--servers", type=int, default=1, help="CPU servers to boot with --checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="CPU server dtype")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)

    cfg = load_run_config(args.config, args.overrides)
    if not cfg.eval.sets:
        raise SystemExit(f"{args.config}: eval.sets is empty: nothing to evaluate")
    evaluator = Evaluator(cfg, tokenizer=load_tokenizer(cfg.data))
    if args.url:
        metrics = evaluator.run(args.url)
    else:
        import tempfile

        from rollout_sglang.config import FleetConfig, ServerConfig
        from rollout_sglang.fleet import Fleet

        server = ServerConfig(kind="cpu", model_path=args.checkpoint, dtype=args.dtype)
        with tempfile.TemporaryDirectory(prefix="evaluate-logs-") as logs:
            fleet_cfg = FleetConfig(servers=[server] * args.servers, log_dir=logs)
            with Fleet(fleet_cfg) as fleet:
                metrics = evaluator.run(fleet.router_url, one_request_per_sample=fleet.one_request_per_sample)
    print(format_table(metrics, [s.name for s in evaluator.sets]), flush=True)
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
