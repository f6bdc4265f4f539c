"""Training checkpoints: the directory protocol (atomic publish, ``latest``, keep-last-K, stale
temporary directories), validation errors that name the file, and the RNG / data-position round
trips. Model and optimizer save/load through Megatron are covered by
``tests/multiproc/test_checkpoint_reshard.py`` and ``tests/e2e/test_resume.py``."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vespo.checkpoint.hf_io import CheckpointError, save_model_config
from megatron_vespo.checkpoint.training import (
    MANIFEST_FILE, TMP_PREFIX, TrainingCheckpointer, capture_rng_state, new_tmp_dir, publish, read_latest,
    read_manifest, remove_stale_tmp_dirs, restore_rng_state, step_dirs, write_manifest,
)
from megatron_vespo.config import load_run_config
from megatron_vespo.data.dataset import DataError, PromptSampler, build_rows
from megatron_vespo.config.schema import DataConfig

REPO = Path(__file__).resolve().parents[2]


def _write_checkpoint(root: Path, step: int, keep_last: int = 2, payload: bytes = b"weights") -> Path:
    tmp = new_tmp_dir(root, step)
    (tmp / "dist").mkdir()
    (tmp / "dist" / "data.bin").write_bytes(payload * step)
    (tmp / "state.pt").write_bytes(b"state")
    write_manifest(tmp, {"step": step})
    return publish(tmp, root, step, keep_last)


def test_publish_moves_latest_and_keeps_the_last_k(tmp_path):
    for step in range(1, 5):
        final = _write_checkpoint(tmp_path, step, keep_last=2)
        assert read_latest(tmp_path) == final == tmp_path / f"step_{step}"
        assert read_manifest(final)["step"] == step
    assert [s for s, _ in step_dirs(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3", "step_4"]


def test_republishing_a_step_replaces_it(tmp_path):
    _write_checkpoint(tmp_path, 1, payload=b"a")
    _write_checkpoint(tmp_path, 1, payload=b"b")
    assert (tmp_path / "step_1" / "dist" / "data.bin").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_and_latest(tmp_path):
    good = _write_checkpoint(tmp_path, 1)
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    with pytest.raises(RuntimeError):  # a save that fails after writing part of its files
        tmp = new_tmp_dir(tmp_path, 2)
        (tmp / "dist").mkdir()
        (tmp / "dist" / "data.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    assert read_latest(tmp_path) == good
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert [s for s, _ in step_dirs(tmp_path)] == [1]  # the temporary directory is no step directory
    stale = remove_stale_tmp_dirs(tmp_path)
    assert [p.name.startswith(f"{TMP_PREFIX}2-") for p in stale] == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]
    assert read_manifest(good)["step"] == 1


def test_incomplete_or_corrupt_checkpoints_are_rejected_naming_the_file(tmp_path):
    final = _write_checkpoint(tmp_path, 3)
    (final / "dist" / "data.bin").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"data\.bin: 5 bytes, checkpoint\.json says 21"):
        read_manifest(final)
    (final / "dist" / "data.bin").unlink()
    with pytest.raises(CheckpointError, match=r"data\.bin: listed in checkpoint\.json but missing"):
        read_manifest(final)
    (final / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: not valid JSON"):
        read_manifest(final)
    (final / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        read_manifest(final)
    with pytest.raises(CheckpointError, match="not found"):
        read_manifest(tmp_path / "step_9")
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="latest: names '../elsewhere'"):
        read_latest(tmp_path)


def test_validation_rejects_a_checkpoint_of_another_model_or_precision(tmp_path):
    cfg = load_run_config(REPO / "configs/quickstart.yaml", [f"run.output_dir={tmp_path}"])
    checkpointer = TrainingCheckpointer(cfg, [], optimizer=None, scheduler=None)
    other = load_run_config(REPO / "configs/quickstart.yaml", ["model.num_experts=8"]).model

    def make(model_cfg, dtype: str) -> Path:
        tmp = new_tmp_dir(tmp_path / "ck", 1)
        save_model_config(model_cfg, tmp)
        write_manifest(tmp, {"step": 1, "layout": {}, "params_dtype": dtype, "distributed_optimizer": False})
        return publish(tmp, tmp_path / "ck", 1, keep_last=1)

    assert checkpointer.validate(make(cfg.model, "fp32"))["step"] == 1
    with pytest.raises(CheckpointError, match=r"model_config\.yaml: .*different model: num_experts: checkpoint 8 vs run 4"):
        checkpointer.validate(make(other, "fp32"))
    with pytest.raises(CheckpointError, match="params_dtype='bf16'"):
        checkpointer.validate(make(cfg.model, "bf16"))


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(state)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def _sampler(n: int, seed: int = 3) -> PromptSampler:
    rows = [{"prompt_ids": [i + 1], "answer": str(i)} for i in range(n)]
    return PromptSampler(build_rows(rows, "rows", DataConfig(ground_truth_key="answer"), 8), seed=seed)


def test_sampler_state_continues_exactly_across_epochs():
    reference = _sampler(5)
    resumed = _sampler(5, seed=77)  # a different seed: everything must come from the state
    reference.next_batch(7)  # into the second epoch
    state = reference.state_dict()
    resumed.load_state_dict(state)
    ref = [r.index for _ in range(4) for r in reference.next_batch(3)]
    got = [r.index for _ in range(4) for r in resumed.next_batch(3)]
    assert got == ref and resumed.epoch == reference.epoch
    with pytest.raises(DataError, match="6 prompts, but the checkpoint's sampler was over 5"):
        _sampler(6).load_state_dict(state)


def test_driver_state_codec_round_trips_data_and_refuses_code(tmp_path):
    """The driver state is JSON + safetensors: plain data, tuples, bytes, non-finite floats, non-string
    keys, tensors, arrays and this project's dataclasses come back as they were; other objects are
    refused when saved, and a document naming a class outside the project is refused when read."""
    import json

    from megatron_vespo.checkpoint.state_codec import read_state, write_state
    from megatron_vespo.data.dataset import PromptRow

    value = {"t": (1, (2, 3), None), "b": b"\x00\xff", "f": [float("nan"), float("inf")], "k": {1: "one"},
             "x": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": np.arange(4, dtype=np.uint16),
             "row": PromptRow(index=2, prompt_ids=[5], ground_truth={"answer": "7"}), "__t": "a key like the tag"}
    written = write_state(value, tmp_path / "s.json", tmp_path / "s.safetensors")
    assert [p.name for p in written] == ["s.json", "s.safetensors"]
    got = read_state(tmp_path / "s.json", tmp_path / "s.safetensors")
    assert got["t"] == (1, (2, 3), None) and got["b"] == b"\x00\xff" and got["k"] == {1: "one"}
    assert np.isnan(got["f"][0]) and got["f"][1] == float("inf") and got["__t"] == "a key like the tag"
    assert torch.equal(got["x"], value["x"]) and got["a"].dtype == np.uint16 and np.array_equal(got["a"], value["a"])
    assert got["row"] == value["row"]

    with pytest.raises(CheckpointError, match=r"state\.fn: a builtins\.function cannot be stored"):
        write_state({"fn": lambda: None}, tmp_path / "bad.json", tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"state\.a: a numpy array of Python objects"):
        write_state({"a": np.array([object()])}, tmp_path / "bad.json", tmp_path / "bad.safetensors")
    for name in ("subprocess:Popen", "os:system", "megatron_vespo.checkpoint.training:LoadedCheckpoint.__init__"):
        (tmp_path / "evil.json").write_text(json.dumps({"__t": "dataclass", "type": name, "v": {"args": "x"}}))
        with pytest.raises(CheckpointError, match=r"evil\.json: state: "):
            read_state(tmp_path / "evil.json", None)
