"""Bad input ends `megatron-vespo` with one line, ``error: ...`` naming the field, file or row, and a
non-zero status, never a traceback; and `check` rejects what `train` would reject.

Each case runs the CLI as a user does, ``python -m megatron_vespo.cli`` in a subprocess (its own
session, killed with everything it started on timeout). `check` and `plan` import no torch (about a
third of a second each); the `train` cases cost a torch start-up and, for the error raised inside the
run, a model build.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_vespo.yaml")  # tiny MoE, vocab_size 128, max_position_embeddings 512
# A plain single process without the debug switch, whatever the test runner's environment holds.
CLEARED_ENV = ("MEGATRON_VESPO_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_cmd(cmd: Sequence[str], timeout: float, env: Optional[dict[str, str]] = None) -> Result:
    """``cmd`` from the repository root in its own session; on timeout its whole tree is killed and the
    test fails with what it printed."""
    full_env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{err[-3000:]}")
    finally:
        _kill_tree(proc)  # anything it left behind (a fleet server) dies with the test
    return Result(proc.returncode, out, err)


def cli(*args: str, timeout: float = 60, env: Optional[dict[str, str]] = None) -> Result:
    return run_cmd([sys.executable, "-m", "megatron_vespo.cli", *args], timeout, env)


def assert_one_line_error(res: Result, *fragments: str) -> str:
    """rc != 0, no traceback, exactly one ``error:`` line, containing every fragment."""
    assert res.rc != 0, f"exit 0:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.error_lines) == 1, res.stderr[-3000:]
    line = res.error_lines[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 1: errors are one line, not tracebacks
def test_data_error_at_train_is_one_line_naming_file_and_row(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_ids": [1, 2], "ground_truth": 1}, {"prompt_ids": [3]}])
    res = cli("train", TINY, f"data.path={data}", f"run.output_dir={tmp_path / 'out'}", timeout=180)
    assert_one_line_error(res, str(data), "row 1", "missing field 'ground_truth'")


def test_non_utf8_data_file_is_one_line_naming_file_and_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt_ids": [1], "ground_truth": 1}\n{"prompt_ids": [2], "ground_truth": "caf\xe9"}\n')
    res = cli("check", TINY, f"data.path={data}")
    assert_one_line_error(res, f"{data}:2", "not valid UTF-8")


def test_checkpoint_error_raised_inside_the_run_is_one_line(tmp_path):
    """A resume checkpoint whose manifest is complete (what `check` reads) but whose contents are not a
    checkpoint of this run (another model, empty files): found only once the trainer loads it, after
    torch, the process group and the model exist, and still one line naming the checkpoint."""
    from megatron_vespo.checkpoint.training import write_manifest

    ckpt = tmp_path / "step_1"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "dist" / ".metadata").write_bytes(b"")
    (ckpt / "state.json").write_text("{}")
    (ckpt / "model_config.yaml").write_text((REPO / "configs/models/tiny_dense.yaml").read_text())
    write_manifest(ckpt, {})
    res = cli("train", TINY, f"checkpoint.load_dir={ckpt}", f"run.output_dir={tmp_path / 'out'}", timeout=240)
    assert_one_line_error(res, str(ckpt))


def test_debug_shows_the_traceback(tmp_path):
    res = cli("check", TINY, "rollout.n_samples=1", env={"MEGATRON_VESPO_DEBUG": "1"})
    assert res.rc != 0 and "Traceback" in res.stderr and "rollout.n_samples" in res.stderr
    res = cli("check", "--debug", TINY, "rollout.n_samples=1")
    assert res.rc != 0 and "Traceback" in res.stderr


def test_torchrun_prints_the_error_once_and_fails(tmp_path):
    """Every rank fails the same way: one ``error:`` line for the launch, and torchrun's status is non-zero
    (torchrun then prints its own failure summary, which is not ours to shorten)."""
    from tests.multiproc.torchrun import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megatron_vespo.cli", "train", TINY,
           "rollout.n_samples=1", f"run.output_dir={tmp_path}"]
    res = run_cmd(cmd, timeout=180)
    assert res.rc != 0
    assert len(res.error_lines) == 1, res.stderr[-3000:]
    assert "rollout.n_samples: GRPO needs at least 2" in res.error_lines[0], res.error_lines  # rank 0's, usually


# ---------------------------------------------------- 2: `check` rejects what `train` rejects, by field
def test_shipped_tiny_config_passes_check():
    res = cli("check", TINY)
    assert res.rc == 0, res.stderr
    assert "# OK" in res.stderr


@pytest.mark.parametrize("overrides,field", [
    (["rollout.max_response_len=1000"], "rollout.max_response_len:"),  # 16 + 1000 > 512 positions
    (["rollout.n_samples=1"], "rollout.n_samples:"),                    # GRPO needs a group
    (["parallel.context=2"], "parallel.context:"),                      # not parallel.tensor
    (["train.seed=4294967296"], "train.seed:"),                         # NumPy seeds are 32-bit
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_check_rejects_what_train_rejects(overrides, field):
    assert_one_line_error(cli("check", TINY, *overrides), f"error: {field}")


def test_train_names_the_parallel_size_at_fault(tmp_path):
    line = assert_one_line_error(cli("train", TINY, "parallel.context=2", f"run.output_dir={tmp_path}", timeout=120))
    assert line.startswith("error: parallel.context:"), line


# ------------------------------------------------------------ 3: `plan` rejects impossible arguments
@pytest.mark.parametrize("flags,flag", [
    (["--gpu-memory-gib", "nan"], "--gpu-memory-gib"),
    (["--gpu-memory-gib", "-80"], "--gpu-memory-gib"),
    (["--overhead-gib", "-1"], "--overhead-gib"),
    (["--overhead-gib", "nan"], "--overhead-gib"),
    (["--trainer-gpus", "0"], "--trainer-gpus"),
], ids=lambda v: "=".join(v) if isinstance(v, list) else None)
def test_plan_rejects_bad_flags(flags, flag):
    assert_one_line_error(cli("plan", TINY, *flags), f"error: {flag}:")


# ------------------------------------------------------- 4: token ids checked against the vocabulary at load
def test_token_id_outside_the_vocabulary_is_found_at_load(tmp_path):
    data = write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [1, 2], "ground_truth": 1},
                                               {"prompt_ids": [5, 999], "ground_truth": 2}])
    assert_one_line_error(cli("check", TINY, f"data.path={data}"), str(data), "row 1", "999", "128")
    res = cli("train", TINY, f"data.path={data}", f"run.output_dir={tmp_path / 'out'}", timeout=120)
    assert_one_line_error(res, str(data), "row 1", "999", "128")


# ------------------------------------------------------- rollout dump / replay directories (issue 18)
def test_check_names_a_bad_replay_or_dump_directory(tmp_path):
    from megatron_vespo.data.rollout_dump import BatchContext, write_batch
    from megatron_vespo.train.sample import TrainSample

    quickstart = str(REPO / "configs" / "quickstart.yaml")
    res = cli("check", quickstart, "eval.every_steps=0", f"rollout.replay_dir={tmp_path / 'none'}")
    assert res.rc == 2 and "rollout.replay_dir" in assert_one_line_error(res, "is not a directory")
    other_model = BatchContext(vocab_size=32, max_position_embeddings=64, num_hidden_layers=2, num_moe_layers=2,
                               num_experts=4, experts_per_token=2, temperature=1.0)
    sample = TrainSample(prompt_ids=[1], response_ids=[2], rollout_logp=[-1.0], advantage=1.0)
    path = write_batch(tmp_path / "dump", 0, [[sample]], {}, other_model)
    res = cli("check", quickstart, "eval.every_steps=0", f"rollout.replay_dir={tmp_path / 'dump'}")
    assert_one_line_error(res, str(path), "vocabulary of 32 tokens", "model.vocab_size is 16")
    res = cli("check", quickstart, f"rollout.dump_dir={tmp_path / 'dump'}", f"run.output_dir={tmp_path / 'out'}")
    assert res.rc == 2 and assert_one_line_error(res, "rollout.dump_dir", "already holds 1 batch file(s)")
