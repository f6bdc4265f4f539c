"""A response resumed after aborts keeps, per segment, the routed-expert rows that produced its tokens.

Segments are built the way servers return them (SGLang's layout: one row per position fed forward,
``prompt + output - 1``). Row values encode (segment, position) so any misalignment shows.
"""
from __future__ import annotations

import numpy as np
import pytest

from megatron_vespo.driver.generator import _Response
from megatron_vespo.driver.rollout import response_routed_experts
from rollout_sglang.types import FinishReason, Sample

LAYERS, TOPK = 3, 2


def segment(seg: int, prompt_len: int, out: list[int], aborted: bool, rows: int | None = None) -> Sample:
    n_rows = prompt_len + len(out) - 1 if rows is None else rows
    # Row i of segment s holds 100 * s + i in every (layer, k) slot.
    routed = np.broadcast_to((100 * seg + np.arange(n_rows))[:, None, None], (n_rows, LAYERS, TOPK)).astype(np.int32)
    finish = FinishReason("abort", message="push") if aborted else FinishReason("length", length=len(out))
    return Sample(rid=f"r.{seg}", prompt_ids=[], output_ids=list(out), output_logprobs=[-1.0] * len(out),
                  finish_reason=finish, weight_version=str(seg), prompt_tokens=prompt_len,
                  completion_tokens=len(out), routed_experts=routed)


def test_segments_keep_the_rows_of_their_own_tokens():
    prompt = [5, 6, 7, 8]  # P = 4
    r = _Response.start(prompt, segment(0, 4, [1, 2, 3], aborted=True), oldest=0, newest=0, keep_routed=True)
    second_prompt = prompt + r.output_ids  # 7 tokens: the continuation prefills prompt + prefix
    r.add_segment(segment(1, len(second_prompt), [4, 5], aborted=False), second_prompt)
    merged = r.merged()
    assert merged.output_ids == [1, 2, 3, 4, 5]
    assert merged.routed_experts.shape == (4 - 1 + 5, LAYERS, TOPK)
    aligned = response_routed_experts(merged, len(prompt))[:, 0, 0].tolist()
    # Tokens 1..3: segment 0's positions 3, 4, 5; tokens 4, 5: segment 1's positions 6, 7.
    assert aligned == [3, 4, 5, 106, 107]
    assert merged.routed_experts[:3, 0, 0].tolist() == [0, 1, 2]  # the first segment's prompt rows


def test_an_abort_before_the_first_token_contributes_no_rows():
    prompt = [5, 6, 7]
    r = _Response.start(prompt, segment(0, 3, [], aborted=True, rows=0), oldest=0, newest=0, keep_routed=True)
    r.add_segment(segment(1, 3, [9, 9], aborted=False), list(prompt))
    merged = r.merged()
    assert response_routed_experts(merged, 3)[:, 0, 0].tolist() == [102, 103]
    assert merged.routed_experts[:2, 0, 0].tolist() == [100, 101]  # prompt rows from the segment that had them


def test_without_routed_experts_nothing_is_kept():
    r = _Response.start([1, 2], segment(0, 2, [3], aborted=False), oldest=0, newest=0, keep_routed=False)
    assert r.merged().routed_experts is None


def test_a_segment_with_too_few_rows_is_an_error():
    prompt = [5, 6, 7, 8]
    with pytest.raises(ValueError, match="routed positions"):
        _Response.start(prompt, segment(0, 4, [1, 2], aborted=True, rows=3), oldest=0, newest=0, keep_routed=True)


def routed_item(finish: dict, out: list[int], rows: int) -> dict:
    import base64

    routed = np.zeros((rows, LAYERS, TOPK), np.int32)
    return {"output_ids": out, "meta_info": {
        "finish_reason": finish, "completion_tokens": len(out), "prompt_tokens": 4, "weight_version": "0",
        "output_token_logprobs": [[-0.5, t, None] for t in out],
        "routed_experts": base64.b64encode(routed.tobytes()).decode()}}


@pytest.mark.parametrize("rows", [0, 3, 5])
def test_an_aborted_response_may_carry_fewer_routed_rows(rows):
    from rollout_sglang.types import parse_generate_item

    item = routed_item({"type": "abort", "message": "push"}, [1, 2], rows)
    s = parse_generate_item(item, server="s", rid="r", prompt_ids=[5, 6, 7, 8], expect_logprobs=True,
                            expect_routed_experts=True, routed_experts_shape=(LAYERS, TOPK))
    assert s.aborted and s.routed_experts.shape == (rows, LAYERS, TOPK)


def test_a_finished_response_needs_every_routed_row():
    from rollout_sglang.errors import ResponseFormatError
    from rollout_sglang.types import parse_generate_item

    item = routed_item({"type": "length", "length": 2}, [1, 2], 4)
    with pytest.raises(ResponseFormatError, match="meta_info.routed_experts.*expected 5 tokens"):
        parse_generate_item(item, server="s", rid="r", prompt_ids=[5, 6, 7, 8], expect_logprobs=True,
                            expect_routed_experts=True, routed_experts_shape=(LAYERS, TOPK))
    too_many = routed_item({"type": "abort", "message": "x"}, [1, 2], 6)
    with pytest.raises(ResponseFormatError, match="routed_experts"):
        parse_generate_item(too_many, server="s", rid="r", prompt_ids=[5, 6, 7, 8], expect_logprobs=True,
                            expect_routed_experts=True, routed_experts_shape=(LAYERS, TOPK))


def test_r3_samples_carry_each_segments_rows_and_the_first_segments_prompt_rows():
    """Routing replay r3 in the asynchronous mode: the training sample of a resumed response replays
    the prompt rows of the segment that prefilled the prompt and, per token, the row of the segment
    (and weights) that sampled it."""
    from megatron_vespo.config.schema import AdvantageConfig
    from megatron_vespo.data.dataset import PromptRow
    from megatron_vespo.driver.rollout import RolloutGroup, build_rollout_batch
    from megatron_vespo.rollout_function import RolloutResult

    prompt = [5, 6, 7, 8]
    responses = []
    for k in range(2):
        r = _Response.start(prompt, segment(0, 4, [1, 2, 3], aborted=True), oldest=0, newest=0, keep_routed=True)
        r.add_segment(segment(1, 7, [4, 5], aborted=False), prompt + r.output_ids)
        responses.append(RolloutResult.from_sample(r.merged()))
    group = RolloutGroup(PromptRow(index=0, prompt_ids=prompt, ground_truth=None), responses)
    batch = build_rollout_batch([group], [1.0, 0.0], AdvantageConfig(), keep_prompt_routed=True)
    sample = batch.groups[0][0]
    assert sample.rollout_prompt_routed_experts[:, 0, 0].tolist() == [0, 1, 2]
    assert sample.rollout_routed_experts[:, 0, 0].tolist() == [3, 4, 5, 106, 107]
    plain = build_rollout_batch([group], [1.0, 0.0], AdvantageConfig())  # replay-free: no prompt rows kept
    assert plain.groups[0][0].rollout_prompt_routed_experts is None
