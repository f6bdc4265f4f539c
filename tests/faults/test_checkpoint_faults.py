"""Training checkpoints under faults: each test is one defect a user reproduced before the fix.

1. code in a checkpoint ran on relaunch (``torch.load(weights_only=False)`` of the driver state);
2. flipped bytes in a ``.distcp`` file resumed silently with a wrong expert weight (no content hash);
3. a corrupt newest checkpoint: resume from it, or crash, instead of the newest complete one;
4. a missing ``latest`` with complete step directories silently started over;
5. a torn last line of ``metrics.jsonl`` failed the resume (JSONDecodeError, after the fleet booted);
6. relaunching a finished run trained on / said "nothing to do" instead of "already finished".

Cheap on purpose: one tiny Megatron model (tiny MoE, one process, gloo) is built once per module,
two checkpoints of it are saved once, and every test works on its own copy of them through the
same ``TrainingCheckpointer`` / ``RunCheckpoints`` the driver uses. The CLI side of defect 6 (exit
status 0, no fleet booted) is checked in ``tests/e2e/test_resume.py`` on that file's reference run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from megatron_vespo.checkpoint.hf_io import CheckpointError
from megatron_vespo.checkpoint.training import MANIFEST_FILE, TrainingCheckpointer, read_latest, step_dirs, \
    write_manifest
from megatron_vespo.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def driver_state(step: int) -> dict[str, Any]:
    """What the asynchronous driver saves (RunState, sampler, buffered groups with routed experts)."""
    from megatron_vespo.data.dataset import PromptRow
    from megatron_vespo.driver.generator import GroupPayload
    from megatron_vespo.driver.rollout import RolloutGroup
    from megatron_vespo.driver.rollout_buffer import FinishedGroup
    from megatron_vespo.rollout_function import RolloutResult
    from rollout_sglang.types import FinishReason

    row = PromptRow(index=7, prompt_ids=[1, 2, 3], ground_truth="321", text="three two one")
    sample = RolloutResult(rid="s1-async-3-0", output_ids=[3, 2, 1, 13, 9],
                           output_logprobs=[-0.1, -0.2, -0.3, -0.01, None], loss_mask=[1, 1, 1, 1, 0], text="321",
                           finish_reason=FinishReason(type="stop", matched=13), weight_version="2",
                           routed_experts=np.arange(32, dtype=np.int32).reshape(4, 4, 2))
    group = FinishedGroup(ticket=5, oldest_version=1, newest_version=2, response_oldest_versions=[1], completed_at=0.5,
                          payload=GroupPayload(group=RolloutGroup(row=row, responses=[sample], generations=2),
                                               rewards=[1.0], reward_stats={"mean": 1.0}, resumed_responses=0,
                                               submitted_version=1))
    return {"optimizer_steps": 2 * step, "rollout_step": step, "rewards": [0.25] * step, "seconds_to_target": None,
            "elapsed_s": 1.5, "weight_version": str(2 * step),
            "sampler": {"dataset_size": 10, "source": "rows", "shuffle": True, "epoch": 0, "order": [3, 1, 2],
                        "pos": step, "rng": random.Random(3).getstate()},
            "async": {"finished_groups": [group], "in_flight_rows": [row], "dropped_total": 0}, "finished": False}


@dataclasses.dataclass
class Trained:
    cfg: Any
    trainable: Any
    scheduler: Any
    pristine: Path  # run.output_dir with checkpoints/step_1, step_2 (latest)

    def copy(self, tmp_path: Path, **overrides: Any) -> tuple[TrainingCheckpointer, Path]:
        """A checkpointer over a private copy of the pristine run directory; ``overrides`` are
        ``section__field=value`` config changes."""
        run = tmp_path / "run"
        shutil.copytree(self.pristine, run)
        cfg = self.cfg
        changes: dict[str, dict[str, Any]] = {"run": {"output_dir": str(run)}, "checkpoint": {"dir": ""}}
        for key, value in overrides.items():
            section, name = key.split("__")
            changes.setdefault(section, {})[name] = value
        cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in changes.items()})
        ck = TrainingCheckpointer(cfg, self.trainable.model, self.trainable.optimizer, self.scheduler)
        return ck, run / "checkpoints"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    from megatron_vespo.distributed import destroy_distributed, init_distributed
    from megatron_vespo.models.trainable import build_model_and_optimizer
    from megatron_vespo.train.lr_schedule import build_lr_scheduler

    pristine = tmp_path_factory.mktemp("checkpoint_faults") / "run"
    cfg = load_run_config(REPO / "configs/quickstart.yaml",
                          ["model=models/tiny_moe.yaml", f"run.output_dir={pristine}", "run.rollout_steps=3"])
    init_distributed(cfg.parallel, 1234, model=cfg.model, precision=cfg.precision)
    try:
        trainable = build_model_and_optimizer(cfg)
        scheduler = build_lr_scheduler(trainable.optimizer, cfg.optimizer)
        trainable.optimizer.step()  # zero gradients: Adam's moments and step count exist, as after any step
        ck = TrainingCheckpointer(cfg, trainable.model, trainable.optimizer, scheduler)
        for step in (1, 2):
            ck.save(step, driver_state(step))
        yield Trained(cfg, trainable, scheduler, pristine)
    finally:
        destroy_distributed()


def rewrite_manifest(step_dir: Path) -> None:
    """What someone who can write the checkpoint directory can also do: a manifest matching the files."""
    manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
    info = {k: v for k, v in manifest.items() if k not in ("files", "format_version")}
    (step_dir / MANIFEST_FILE).unlink()
    write_manifest(step_dir, info)


def flip_bytes(path: Path, offset: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


def largest_distcp(step_dir: Path) -> Path:
    return max((step_dir / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)


def canonical(value: Any) -> Any:
    """``value`` with its types spelled out, comparable with ``==`` (arrays and dataclasses included)."""
    if dataclasses.is_dataclass(value):
        return type(value).__qualname__, {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return "ndarray", value.dtype.str, value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    return type(value).__name__, value


class Payload:
    """A pickled object that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return os.mkdir, (str(self.marker),)


# ---------------------------------------------------------------------------------------------- 1
def test_code_in_a_checkpoint_is_never_run_and_the_driver_state_round_trips_as_data(trained, tmp_path):
    ck, root = trained.copy(tmp_path)
    marker = tmp_path / "code_ran"

    # The driver state is data: its buffered groups, arrays and RNG tuples come back as they were...
    loaded = ck.load(root / "step_2")
    saved = driver_state(2)
    assert loaded.rng_restored and loaded.driver_state.keys() == saved.keys()
    assert isinstance(loaded.driver_state["sampler"]["rng"], tuple)
    random.Random().setstate(loaded.driver_state["sampler"]["rng"])
    got, want = loaded.driver_state["async"]["finished_groups"][0], saved["async"]["finished_groups"][0]
    assert type(got) is type(want) and type(got.payload.group.responses[0].finish_reason).__name__ == "FinishReason"
    experts = got.payload.group.responses[0].routed_experts
    assert experts.dtype == np.int32 and np.array_equal(experts, want.payload.group.responses[0].routed_experts)
    assert canonical(loaded.driver_state) == canonical(saved)
    assert not any(p.suffix == ".pt" and p.name != "common.pt" and p.parent.name != "rng" for p in root.rglob("*"))

    # ...so an object that would run code cannot even be saved (refused before anything is written)...
    with pytest.raises(CheckpointError, match=r"driver\.evil: a \S*Payload cannot be stored"):
        ck.save(3, {**driver_state(3), "evil": Payload(marker)})
    assert not (root / "step_3").exists()

    # ...and one planted in a file that is unpickled, with a manifest forged to match, is refused by name.
    for name in ("rng/rank_00000.pt", "dist/.metadata"):
        shutil.rmtree(root / "step_2")
        shutil.copytree(trained.pristine / "checkpoints" / "step_2", root / "step_2")
        target = root / "step_2" / name
        if target.suffix == ".pt":
            torch.save({"python": Payload(marker)}, target)
        else:
            target.write_bytes(pickle.dumps(Payload(marker)))
        rewrite_manifest(root / "step_2")
        with pytest.raises(CheckpointError, match=re.escape(str(target)) + r": not loaded.* refers to posix\.mkdir"):
            ck.load(root / "step_2")
        assert not marker.exists(), f"unpickling {name} ran code"


# ---------------------------------------------------------------------------------------------- 2
def test_altered_bytes_in_any_file_are_detected_by_hash_naming_the_file(trained, tmp_path):
    ck, root = trained.copy(tmp_path)
    step = root / "step_2"
    hex64 = r"[0-9a-f]{64}"

    distcp = largest_distcp(step)  # the expert weights and their Adam moments of this tiny MoE
    flip_bytes(distcp, distcp.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(distcp))}: sha256 {hex64}, checkpoint\.json says "
                                              rf"{hex64}; the checkpoint is corrupt$"):
        ck.load(step)

    # An overwritten region (torch used to raise its CheckpointException, a BaseException) and a corrupt
    # state file (a bare UnpicklingError before): the same one-line error naming the file.
    shutil.copy(trained.pristine / "checkpoints/step_2" / distcp.relative_to(step), distcp)
    with open(distcp, "r+b") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(distcp))}: sha256 "):
        ck.load(step)
    shutil.copy(trained.pristine / "checkpoints/step_2" / distcp.relative_to(step), distcp)
    state = step / "state.json"
    state.write_bytes(b"\x80\x04garbage".ljust(state.stat().st_size, b"x"))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(state))}: sha256 "):
        ck.load(step)
    manifest = json.loads((step / MANIFEST_FILE).read_text())
    assert all(set(entry) == {"size", "sha256"} for entry in manifest["files"].values())


# ---------------------------------------------------------------------------------------------- 3
def test_a_corrupt_newest_checkpoint_is_reported_kept_aside_and_the_run_resumes_the_previous_one(
        trained, tmp_path, capsys):
    from megatron_vespo.driver.run_state import RunCheckpoints

    ck, root = trained.copy(tmp_path)
    distcp = largest_distcp(root / "step_2")
    flip_bytes(distcp, distcp.stat().st_size // 3)
    flipped = distcp.read_bytes()
    resumed = RunCheckpoints(ck, save_every_steps=1, is_driver=True)
    state = resumed.resume()
    assert state["rollout_step"] == 1 and resumed.last_saved_step == 1
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith(f"[checkpoint] warning: not resuming from {root / 'step_2'}: ")
    assert warning[0].endswith("; the checkpoint is corrupt; trying step_1")
    assert re.search(rf"{re.escape(distcp.name)}: sha256 [0-9a-f]{{64}}, checkpoint\.json says [0-9a-f]{{64}}",
                     warning[0])
    aside = sorted(root.glob("step_2.corrupt-*"))
    assert len(aside) == 1 and f"moved aside to {aside[0]}" in out
    assert (aside[0] / "dist" / distcp.name).read_bytes() == flipped  # the evidence is kept as it was
    assert read_latest(root) == root / "step_1" and [s for s, _ in step_dirs(root)] == [1]
    # Training step 2 again saves a new step_2 and leaves the rejected one alone.
    ck.save(2, driver_state(2))
    assert [s for s, _ in step_dirs(root)] == [1, 2] and aside[0].is_dir()


# ---------------------------------------------------------------------------------------------- 4
def test_without_latest_the_newest_complete_step_is_resumed_and_none_complete_is_an_error(
        trained, tmp_path, capsys):
    ck, root = trained.copy(tmp_path)
    (root / "latest").unlink()
    assert ck.resume_directory() == root / "step_2"
    assert f"{root / 'latest'} is missing; using the newest complete step directory step_2" in capsys.readouterr().out
    assert read_latest(root) == root / "step_2"

    # Step directories but none complete: an error naming them; nothing renamed, nothing started over.
    for step in (1, 2):
        (root / f"step_{step}" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no complete training checkpoint to resume from \(step_2: .*"
                                              r"checkpoint\.json: missing.*; step_1: .*\).*checkpoint\.resume=never"):
        ck.resume_directory()
    assert [s for s, _ in step_dirs(root)] == [1, 2] and not list(root.glob("*.corrupt-*"))
    fresh, _ = trained.copy(tmp_path / "fresh", checkpoint__resume="never")
    assert fresh.resume_directory() is None  # a new run, asked for


# ---------------------------------------------------------------------------------------------- 5
def test_a_torn_last_metrics_line_is_tolerated_and_a_corrupt_one_is_named_before_anything_loads(
        trained, tmp_path, capsys, monkeypatch):
    from megatron_vespo.driver.run_state import RunCheckpoints
    from megatron_vespo.logging_utils import MetricsWriter, read_metrics

    ck, root = trained.copy(tmp_path)
    metrics = Path(ck.cfg.run.output_dir) / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train_step": 2 * s + k + 1}) for s in range(3) for k in range(2)]
    metrics.write_text("\n".join(lines) + "\n" + '{"step": 3, "train_st')  # killed in the middle of a write
    state = RunCheckpoints(ck, save_every_steps=1, is_driver=True).resume()
    assert state["rollout_step"] == 2
    writer = MetricsWriter(metrics, resume_step=state["rollout_step"])
    writer.write(2, {"train_step": 5})
    writer.close()
    assert [(r["step"], r["train_step"]) for r in read_metrics(metrics)] == [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]
    superseded = list(metrics.parent.glob("metrics.jsonl.superseded-*"))  # steps redone and the torn line: kept
    assert len(superseded) == 1 and superseded[0].read_text().splitlines() == lines[4:] + ['{"step": 3, "train_st']
    assert f"moved to {superseded[0]}" in capsys.readouterr().out

    # A bad line before the last one: the file and line are named, before any weight is loaded.
    metrics.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    monkeypatch.setattr(ck, "load", lambda directory: pytest.fail("loaded before the metrics were checked"))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(metrics))}:3: not a JSON record"):
        RunCheckpoints(ck, save_every_steps=1, is_driver=True).resume()
    assert metrics.read_text().count("\n") == 7  # unchanged


# ---------------------------------------------------------------------------------------------- 6
def test_relaunching_a_finished_run_says_it_finished_and_exits_0(trained, tmp_path, capsys):
    from megatron_vespo.driver.run_state import RunCheckpoints

    ck, root = trained.copy(tmp_path, run__rollout_steps=2)  # step_2 is the end of a 2-step run
    with pytest.raises(SystemExit) as info:
        RunCheckpoints(ck, save_every_steps=1, is_driver=True).resume()
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"the run already finished at step 2 (all 2 steps done); its last checkpoint is {root / 'step_2'}" in out
    # A longer run continues from it.
    longer, _ = trained.copy(tmp_path / "longer", run__rollout_steps=3)
    assert RunCheckpoints(longer, save_every_steps=1, is_driver=True).resume()["rollout_step"] == 2
