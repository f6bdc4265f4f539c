"""A multi-turn rollout with a tool: the policy adds two 2-digit numbers by calling a calculator.

Token ids are the synthetic task's (:mod:`megatron_vespo.data.synthetic`: digits 0-9, ``SEP`` 12, ``EOS``
13) plus the two ids that 16-token vocabulary leaves free: ``CALL`` (14), the calculator's tag, and
``RESULT`` (15), which ends the calculator's output.

- Prompt: ``a1 a2 b1 b2 SEP`` (the problem a + b); ground truth: the 3 digits of the sum (zero-padded).
- The policy calls the calculator by emitting ``CALL`` (a stop token of the request). The rollout function
  then appends the calculator's output ``s1 s2 s3 RESULT`` (loss mask 0: not the policy's) and generation
  continues from there (at most ``MAX_CALLS`` calls per sample).
- Reward (verifier ``calculator``): per-digit credit of the final answer, the tokens after the last
  ``RESULT`` up to ``EOS``; 0 when the calculator was never called (the task's rule: the answer comes after
  the calculator's result).

A 2-layer model cannot learn 2-digit addition in a few dozen steps, but it can learn to call the tool and
copy its output: the answer is reachable through the tool only. A learned sample:
``CALL | 1 0 7 RESULT | 1 0 7 EOS`` (| separates the policy's tokens from the calculator's).

Run it (from the repository root, so that ``examples`` is importable)::

    python -m examples.calculator_tool outputs/calculator/prompts.jsonl
    python -m megatron_vespo.cli train examples/calculator_tool.yaml
"""
from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Optional

from megatron_vespo.data.synthetic import VOCAB
from megatron_vespo.rewards.registry import ScoreRequest, register_verifier
from megatron_vespo.rewards.synthetic import synthetic_partial_credit
from megatron_vespo.rollout_function import RolloutClient, RolloutPrompt, RolloutResult, RolloutSampling

CALL = 14  # the policy's call of the calculator
RESULT = 15  # ends the calculator's output
MAX_CALLS = 2
ANSWER_DIGITS = 3


def problem_of(prompt_ids: list[int]) -> tuple[int, int]:
    """The two operands of a prompt ``a1 a2 b1 b2 SEP``."""
    if len(prompt_ids) != 5 or prompt_ids[-1] != VOCAB.sep or not all(0 <= t <= 9 for t in prompt_ids[:4]):
        raise ValueError(f"not a calculator prompt (a1 a2 b1 b2 SEP): {prompt_ids}")
    a1, a2, b1, b2 = prompt_ids[:4]
    return 10 * a1 + a2, 10 * b1 + b2


def digits(value: int) -> list[int]:
    return [int(c) for c in f"{value:0{ANSWER_DIGITS}d}"]


def calculator(prompt_ids: list[int]) -> list[int]:
    """The tool: the sum of the prompt's problem, then ``RESULT``."""
    a, b = problem_of(prompt_ids)
    return digits(a + b) + [RESULT]


async def _one_sample(client: RolloutClient, prompt: RolloutPrompt, sampling: RolloutSampling,
                      index: int) -> RolloutResult:
    ids: list[int] = []
    logprobs: list[Optional[float]] = []
    mask: list[int] = []
    stops = list(sampling.params.get("stop_token_ids", []))
    finish = "length"
    for turn in range(MAX_CALLS + 1):
        budget = sampling.max_response_len - len(ids)
        if budget <= 0:
            finish = "length"
            break
        params = {**sampling.params, "max_new_tokens": budget,
                  "stop_token_ids": stops + [CALL] if turn < MAX_CALLS else stops}
        # key: one request id (hence sampling seed) per sample and turn, whatever order the calls finish in
        (out,) = await client.generate(prompt.prompt_ids + ids, params, n=1, key=f"{index}.{turn}")
        ids += out.output_ids
        logprobs += out.output_logprobs
        mask += [1] * len(out.output_ids)
        finish = out.finish_reason.type
        if not (finish == "stop" and out.output_ids and out.output_ids[-1] == CALL and turn < MAX_CALLS):
            break
        tool = calculator(prompt.prompt_ids)[:sampling.max_response_len - len(ids)]
        ids += tool
        logprobs += [None] * len(tool)  # the environment's tokens have no behaviour log-prob
        mask += [0] * len(tool)
    return RolloutResult(output_ids=ids, output_logprobs=logprobs, loss_mask=mask, finish_reason=finish)


async def rollout(client: RolloutClient, prompt: RolloutPrompt, sampling: RolloutSampling) -> list[RolloutResult]:
    """``rollout.function: examples.calculator_tool:rollout``: the group's samples, each a conversation
    with the calculator."""
    return list(await asyncio.gather(*(_one_sample(client, prompt, sampling, i) for i in range(sampling.n))))


def final_answer(response_ids: list[int]) -> Optional[list[int]]:
    """The tokens after the calculator's last output, up to EOS; None when there is no calculator output."""
    if RESULT not in response_ids:
        return None
    answer = response_ids[len(response_ids) - response_ids[::-1].index(RESULT):]
    return answer[:answer.index(VOCAB.eos)] if VOCAB.eos in answer else answer


@register_verifier("calculator")
def calculator_reward(request: ScoreRequest) -> float:
    """Per-digit credit of the final answer (the synthetic task's partial credit on it); 0 without one."""
    answer = final_answer(request.response_ids)
    if answer is None:
        return 0.0
    return synthetic_partial_credit(ScoreRequest(response_ids=answer, response_text=None,
                                                 ground_truth=request.ground_truth, prompt_ids=request.prompt_ids))


def write_prompts(path: Path) -> int:
    """Every problem a + b (a, b in 0..99) as a jsonl dataset; the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for a, b in itertools.product(range(100), repeat=2):
            row = {"prompt_ids": [a // 10, a % 10, b // 10, b % 10, VOCAB.sep], "ground_truth": digits(a + b)}
            f.write(json.dumps(row) + "\n")
    return 100 * 100


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/calculator/prompts.jsonl")
    print(f"{write_prompts(target)} prompts written to {target}")
