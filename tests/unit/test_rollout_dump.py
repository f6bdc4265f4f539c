"""Saved rollout batches (rollout.dump_dir / rollout.replay_dir): exact round trip, atomic writes, and
every mismatch or damaged file refused with an error naming it."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.data.rollout_dump import (
    BatchContext, RolloutDumpError, check_dump_dir, check_replay_dir, list_batch_files, read_batch, read_header,
    write_batch,
)
from megatron_vespo.preflight import preflight
from megatron_vespo.train.sample import TrainSample

REPO = Path(__file__).resolve().parents[2]
CTX = BatchContext(vocab_size=16, max_position_embeddings=64, num_hidden_layers=2, num_moe_layers=2, num_experts=4,
                   experts_per_token=2, temperature=1.0)


def samples() -> list[list[TrainSample]]:
    rng = np.random.default_rng(0)
    routed = rng.integers(0, 4, size=(3, 2, 2)).astype(np.uint8)
    a = TrainSample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6], rollout_logp=[-0.1, -1e-9, -2.0000000000000004],
                    advantage=0.7071067690849304, rollout_routed_experts=routed, reward=1.0, weight_version="3")
    b = TrainSample(prompt_ids=[7], response_ids=[8, 9], rollout_logp=[-0.5, -3.25], advantage=-1.25,
                    response_mask=[1.0, 0.0], reward=None, weight_version="2")
    c = TrainSample(prompt_ids=[1, 1], response_ids=[], rollout_logp=[], advantage=0.0, reward=0.0,
                    rollout_routed_experts=np.zeros((0, 1, 4), dtype=np.int16), weight_version="3")
    return [[a, b], [c]]


def test_round_trip_is_exact(tmp_path):
    metrics = {"rollout/reward_mean": 0.5, "reward/first_error": "x", "async/sample_lags": [0, 1], "bad": float("nan")}
    path = write_batch(tmp_path, 7, samples(), metrics, CTX)
    assert path.name == "batch_000007.safetensors" and [p.name for p in tmp_path.iterdir()] == [path.name]
    saved = read_batch(path, CTX)
    assert saved.step == 7 and [len(mb) for mb in saved.mini_batches] == [2, 1]
    assert saved.metrics == {"rollout/reward_mean": 0.5, "reward/first_error": "x", "async/sample_lags": [0, 1],
                             "bad": None}
    assert saved.rewards == [1.0, None, 0.0] and saved.weight_versions == ["3", "2", "3"]
    for want, got in zip([s for mb in samples() for s in mb], [s for mb in saved.mini_batches for s in mb]):
        routed_want, routed_got = want.rollout_routed_experts, got.rollout_routed_experts
        assert dataclasses.replace(want, rollout_routed_experts=None) == \
            dataclasses.replace(got, rollout_routed_experts=None)  # floats bit for bit
        if routed_want is None:
            assert routed_got is None
        else:
            assert routed_got.dtype == routed_want.dtype and np.array_equal(routed_got, routed_want)


def test_files_are_listed_in_step_order_and_rewritten_atomically(tmp_path):
    for step in (10, 2, 1):
        write_batch(tmp_path, step, samples(), {}, CTX)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".batch_000003.safetensors.tmp-1").write_bytes(b"torn")  # a killed writer's leftover
    assert [p.name for p in list_batch_files(tmp_path)] == [f"batch_{s:06d}.safetensors" for s in (1, 2, 10)]
    write_batch(tmp_path, 2, samples()[:1], {}, CTX)  # a resumed run rewrites its step: replaced whole
    assert [len(mb) for mb in read_batch(tmp_path / "batch_000002.safetensors", CTX).mini_batches] == [2]


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 12}, r"generated with a vocabulary of 16 tokens; this run's model.vocab_size is 12"),
    ({"temperature": 0.7}, r"temperature 1.0; this run's rollout.temperature is 0.7"),
    ({"num_experts": 0}, r"sample 0 carries routed experts but this run's model has no experts"),
    ({"experts_per_token": 4, "num_moe_layers": 3, "num_hidden_layers": 3}, r"sample 0: routed experts of shape"),
    ({"max_position_embeddings": 5}, r"sample 0 has 6 tokens; model.max_position_embeddings is 5"),
])
def test_a_batch_that_does_not_fit_the_run_is_refused_naming_the_file(tmp_path, change, message):
    path = write_batch(tmp_path, 0, samples(), {}, CTX)
    expected = dataclasses.replace(CTX, **change)
    with pytest.raises(RolloutDumpError, match=message) as err:
        read_batch(path, expected)
    assert str(err.value).startswith(str(path))


def test_token_ids_and_log_probs_are_checked(tmp_path):
    bad_token = [[TrainSample(prompt_ids=[1], response_ids=[16], rollout_logp=[-1.0], advantage=1.0)]]
    path = write_batch(tmp_path, 0, bad_token, {}, CTX)
    with pytest.raises(RolloutDumpError, match=r"token id 16 outside the vocabulary \[0, model.vocab_size=16\)"):
        read_batch(path, CTX)
    bad_logp = [[TrainSample(prompt_ids=[1], response_ids=[2], rollout_logp=[float("nan")], advantage=1.0)]]
    path = write_batch(tmp_path, 1, bad_logp, {}, CTX)
    with pytest.raises(RolloutDumpError, match="non-finite or positive log-probabilities"):
        read_batch(path, CTX)


def test_damaged_or_foreign_files_are_refused_naming_the_file(tmp_path):
    from safetensors.numpy import save_file

    good = write_batch(tmp_path, 0, samples(), {}, CTX)
    torn = tmp_path / "batch_000001.safetensors"
    torn.write_bytes(good.read_bytes()[:-10])
    foreign = tmp_path / "batch_000002.safetensors"
    save_file({"x": np.zeros(3)}, str(foreign))
    pickled = tmp_path / "batch_000003.safetensors"  # never unpickled: safetensors reads a JSON header only
    pickled.write_bytes(pickle.dumps({"__reduce__": "boom"}))
    for path, message in [(torn, "not a readable safetensors file"), (foreign, "not a rollout batch written by"),
                          (pickled, "not a readable safetensors file")]:
        with pytest.raises(RolloutDumpError, match=message) as err:
            read_batch(path, CTX)
        assert str(path) in str(err.value)
    assert read_header(good)["mini_batch_sizes"] == [2, 1]


def test_replay_and_dump_directories_are_checked_by_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^rollout.replay_dir: '.*missing' is not a directory"):
        check_replay_dir(str(tmp_path / "missing"), CTX)
    with pytest.raises(ConfigError, match=r"^rollout.replay_dir: .* holds no batch_<step>.safetensors files"):
        check_replay_dir(str(tmp_path), CTX)
    write_batch(tmp_path, 0, samples(), {}, CTX)
    assert len(check_replay_dir(str(tmp_path), CTX)) == 1
    with pytest.raises(ConfigError, match=r"^rollout.dump_dir: .* already holds 1 batch file\(s\) of another run"):
        check_dump_dir(str(tmp_path), fresh_run=True)
    check_dump_dir(str(tmp_path), fresh_run=False)  # a resumed run continues its own dump
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^rollout.dump_dir: .* exists and is not a directory"):
        check_dump_dir(str(tmp_path / "file"), fresh_run=True)


def test_check_validates_replay_runs(tmp_path):
    base = REPO / "configs/quickstart.yaml"
    with pytest.raises(ConfigError, match=r"^rollout.dump_dir: cannot be combined with rollout.replay_dir"):
        load_run_config(base, [f"rollout.replay_dir={tmp_path}", f"rollout.dump_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^eval.every_steps: must be 0 with rollout.replay_dir"):
        load_run_config(base, [f"rollout.replay_dir={tmp_path}"])
    cfg = load_run_config(base, [f"rollout.replay_dir={tmp_path}", "eval.every_steps=0",
                                 f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"^rollout.replay_dir: .* holds no batch"):
        preflight(cfg, world_size=1)
    ctx = BatchContext.from_config(cfg)
    assert (ctx.vocab_size, ctx.num_moe_layers, ctx.experts_per_token) == (16, 2, 2)
    routed = np.zeros((1, ctx.num_moe_layers, ctx.experts_per_token), np.uint8)
    write_batch(tmp_path, 0, [[TrainSample(prompt_ids=[1], response_ids=[2], rollout_logp=[-1.0], advantage=1.0,
                                           rollout_routed_experts=routed)]], {}, ctx)
    assert preflight(cfg, world_size=1)[0].startswith(f"replay: 1 saved batch(es) in {tmp_path}, 1 trained")
    header = json.loads(json.dumps(read_header(tmp_path / "batch_000000.safetensors")))
    assert header["context"]["temperature"] == cfg.rollout.temperature
