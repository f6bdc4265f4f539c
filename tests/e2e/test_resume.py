"""Exact resume through the real CLI: SIGKILL after a checkpoint, and SIGKILL in the middle of a save.

Three runs of ``megatron-vespo train`` over the same tiny config (quickstart model, a CPU rollout
server behind the real sglang-router, disk weight sync), ``ROLLOUT_STEPS`` rollout steps of
``STALENESS`` optimizer steps each, a checkpoint after every rollout step:

1. uninterrupted (the reference);
2. killed with SIGKILL (the whole process group: trainer, server, router) as soon as ``latest``
   names ``step_1``, then started again with the same command: it resumes and finishes;
3. killed in the middle of the save of ``step_2`` (model and optimizer files written into the
   temporary directory, no manifest, no rename) by ``kill_during_save.py``, a launcher of the same
   CLI that SIGKILLs itself at that point, then resumed with the plain command.

The resumed runs must equal the reference bitwise: every metric (timings aside) of every optimizer
step, the weights of the final checkpoint and of every weight push, and the optimizer state.

Determinism: the CPU server batches whatever requests are waiting, so which sequences share a
forward (and the width of their left padding) depends on timing, and with it the last bits of the
log-probs μ (two uninterrupted runs differ at ~1e-7). The runs therefore use a CPU server started
with ``--max-batch-size 1``: every sequence is decoded on its own, and its numbers depend only on
its prompt, its seed (derived from the request id, which names the rollout step) and the weights.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_vespo.logging_utils import read_metrics
from tests.process_tree import ProcessTree

REPO = Path(__file__).resolve().parents[2]
ROLLOUT_STEPS, STALENESS = 3, 2


def _bootstrap_hf_dir(path: Path) -> Path:
    """An HF directory of the quickstart architecture for the servers to boot from (the trainer
    pushes its own weights before the first rollout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_vespo.checkpoint.hf_io import hf_config_from_model
    from megatron_vespo.config import load_run_config

    cfg = load_run_config(REPO / "configs/quickstart.yaml", [])
    hf = hf_config_from_model(cfg.model, torch.float32, extra={"bos_token_id": None, "eos_token_id": None,
                                                               "pad_token_id": None})
    config = AutoConfig.for_model(**hf)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _command(out: Path, hf_dir: Path, launcher: list[str] | None = None) -> list[str]:
    """The train command; ``launcher`` replaces ``python -m megatron_vespo.cli`` (same CLI arguments)."""
    fleet = ("{servers: [{kind: cpu, model_path: '%s', extra_args: ['--max-batch-size', '1']}], log_dir: '%s'}"
             % (hf_dir, out / "fleet_logs"))
    launcher = launcher or [sys.executable, "-m", "megatron_vespo.cli"]
    return [*launcher, "train", str(REPO / "configs/quickstart.yaml"),
            f"run.rollout_steps={ROLLOUT_STEPS}", f"run.output_dir={out}", "run.stop_at_reward=null",
            "run.plot=false", f"train.staleness={STALENESS}", "train.mini_batch_prompts=2", "rollout.n_samples=8",
            f"rollout.fleet={fleet}", "checkpoint.save_every_steps=1", "checkpoint.keep_last=2"]


def _run(cmd: list[str], log: Path) -> int:
    """The exit status of ``cmd``; its whole process tree is killed afterwards (and on timeout)."""
    with ProcessTree(cmd, log, cwd=REPO) as run:
        return run.wait(timeout_s=400)


def _finish(cmd: list[str], log: Path) -> None:
    code = _run(cmd, log)
    assert code == 0, log.read_text()[-4000:]


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint's torch_dist files (model and optimizer state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = step_dir.parent / f"{step_dir.name}.flat.pt"
    dcp_to_torch_save(step_dir / "dist", flat)
    state = torch.load(flat, weights_only=True)
    flat.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _pushed_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    def load_dir(d: Path) -> dict[str, torch.Tensor]:  # every stage's shard files of one version
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    return {d.name: load_dir(d) for d in sorted((out / "weights").iterdir()) if d.is_dir()}


def _assert_same_run(reference: Path, resumed: Path) -> None:
    ref, got = read_metrics(reference / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["train_step"] for r in got] == list(range(1, ROLLOUT_STEPS * STALENESS + 1))
    assert _comparable(got) == _comparable(ref)
    final = f"step_{ROLLOUT_STEPS}"
    a, b = _checkpoint_tensors(reference / "checkpoints" / final), _checkpoint_tensors(resumed / "checkpoints" / final)
    assert sorted(a) == sorted(b) and any("exp_avg" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # The weights pushed to the fleet (the disk transport keeps the newest versions) carry the same bits.
    ref_pushes, got_pushes = _pushed_weights(reference), _pushed_weights(resumed)
    last = f"v{ROLLOUT_STEPS * STALENESS}"
    assert last in ref_pushes and last in got_pushes
    for version in sorted(set(ref_pushes) & set(got_pushes)):
        a, b = ref_pushes[version], got_pushes[version]
        assert sorted(a) == sorted(b) and [n for n in a if not torch.equal(a[n], b[n])] == [], version


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    hf_dir = _bootstrap_hf_dir(root / "boot_hf")
    reference = root / "reference"
    _finish(_command(reference, hf_dir), root / "reference.log")
    return root, hf_dir, reference


def test_uninterrupted_run_writes_rotating_checkpoints(setup):
    _, _, reference = setup
    ckpt = reference / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{ROLLOUT_STEPS}"
    # keep_last=2: only the newest two survive; no temporary directory is left.
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", f"step_{ROLLOUT_STEPS - 1}", f"step_{ROLLOUT_STEPS}"]


def test_sigkill_after_a_checkpoint_resumes_bitwise(setup):
    root, hf_dir, reference = setup
    out, log = root / "killed", root / "killed.log"
    cmd = _command(out, hf_dir)
    run = ProcessTree(cmd, log, cwd=REPO)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not (latest.is_file() and latest.read_text().strip()):
        assert run.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    run.kill()
    killed_at = read_metrics(out / "metrics.jsonl")
    assert len(killed_at) < ROLLOUT_STEPS * STALENESS  # it really was interrupted
    _finish(cmd, log)
    text = log.read_text()
    assert "[checkpoint] resumed from" in text
    _assert_same_run(reference, out)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resumes_bitwise(setup):
    root, hf_dir, reference = setup
    out, log = root / "killed_in_save", root / "killed_in_save.log"
    cmd = _command(out, hf_dir)
    killer = _command(out, hf_dir, launcher=[sys.executable, "-m", "tests.e2e.kill_during_save", "2"])
    code = _run(killer, log)
    assert code == -signal.SIGKILL, log.read_text()[-4000:]
    ckpt = out / "checkpoints"
    # The save of step 2 died after writing part of its temporary directory: step 1 is still the latest,
    # complete and valid; the half-written directory is there but is no checkpoint.
    from megatron_vespo.checkpoint.training import read_manifest

    assert (ckpt / "latest").read_text().strip() == "step_1"
    assert read_manifest(ckpt / "step_1")["step"] == 1
    stale = [p for p in ckpt.iterdir() if p.name.startswith(".tmp-step_2")]
    assert len(stale) == 1 and (stale[0] / "dist").is_dir() and not (stale[0] / "checkpoint.json").exists()
    _finish(cmd, log)
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())  # cleaned up by the resumed run
    assert f"[checkpoint] resumed from {ckpt / 'step_1'}" in log.read_text()
    _assert_same_run(reference, out)


def test_relaunching_the_finished_run_says_so_and_exits_0_without_starting_anything(setup):
    """The reference run's command again: it had finished, so the relaunch says so (step and checkpoint),
    exits 0 before the fleet boots, and changes nothing (checkpoints, metrics)."""
    root, hf_dir, reference = setup
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in reference.rglob("*") if p.is_file()
             and "fleet_logs" not in p.parts}
    log = root / "finished.log"
    _finish(_command(reference, hf_dir), log)
    text = log.read_text()
    last = reference / "checkpoints" / f"step_{ROLLOUT_STEPS}"
    assert (f"the run already finished at step {ROLLOUT_STEPS} (all {ROLLOUT_STEPS} steps done); its last "
            f"checkpoint is {last}") in text
    assert "[fleet]" not in text and "run summary" not in text
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in reference.rglob("*") if p.is_file()
            and "fleet_logs" not in p.parts} == files
