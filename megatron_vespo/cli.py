"""`megatron-vespo` command line: subcommands are added as the pieces behind them exist.

Errors meant for the user (a bad config, data file, checkpoint, plan, or rollout fleet; an input file
that cannot be read) end a command with one line, ``error: ...`` naming the field, file or row, on
stderr and a non-zero exit status (2: config, 3: plan, 1: the others). ``--debug`` or
``MEGATRON_VESPO_DEBUG=1`` shows the full traceback instead. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from megatron_vespo.config import ConfigError, RunConfig, describe_fields, load_run_config, to_dict
from megatron_vespo.preflight import preflight

EXIT_ERROR, EXIT_CONFIG, EXIT_PLAN = 1, 2, 3
# plan_run's parameters and the `plan` flags that set them.
PLAN_FLAGS = {"trainer_gpus": "--trainer-gpus", "gpu_memory_gib": "--gpu-memory-gib", "overhead_gib": "--overhead-gib",
              "recompute": "--recompute", "engine_runtime_gib": "--engine-runtime-gib",
              "gpus_per_node": "--gpus-per-node"}

# The project's user-facing error classes, by module. They are looked up only in modules already
# imported (an error cannot come from a module that was never loaded), so that `check` and `plan` do
# not import torch just to name the classes they might have to catch.
USER_ERRORS = (
    ("typed_config", "ConfigError"),
    ("megatron_vespo.planning.memory", "PlanError"),
    ("megatron_vespo.data.dataset", "DataError"),
    ("megatron_vespo.checkpoint.hf_io", "CheckpointError"),
    ("megatron_vespo.checkpoint.hf_mapping", "MappingError"),
    ("rollout_sglang.errors", "RolloutError"),
    ("megatron_vespo.driver.base", "RankZeroError"),
    ("megatron_vespo.driver.run_health", "CannotLearnError"),
    ("megatron_vespo.experiments.sweep", "SweepError"),
)
# Reading an input file the user named (a YAML, a data file, a tokenizer or checkpoint directory).
INPUT_ERRORS = (UnicodeDecodeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def config_reference_markdown() -> str:
    """Markdown table of every run-config field (docs/config_reference.md is generated from this)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, tp, default, help_text in describe_fields(RunConfig):
        lines.append(f"| `{name}` | {tp.replace('|', '/')} | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- commands
def _env_world_size() -> Optional[int]:
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else None


def _rank() -> int:
    value = os.environ.get("RANK", "")
    return int(value) if value.isdigit() else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from megatron_vespo.planning import minimal_world_size

    if args.trainer_gpus is not None and args.trainer_gpus < 1:
        raise ConfigError("--trainer-gpus", f"must be >= 1; got {args.trainer_gpus}")
    cfg = load_run_config(args.run_yaml, args.overrides)
    world = args.trainer_gpus or _env_world_size()
    notes = []
    if world is None:  # `train` without torchrun runs one process; a layout may need more (torchrun)
        world = minimal_world_size(cfg)
        if world > 1:
            notes.append(f"layout checked for {world} trainer processes, the smallest valid number: run `train` "
                         f"under torchrun (--trainer-gpus N checks another world size)")
    notes = preflight(cfg, world, files=not args.config_only) + notes
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    print(f"# OK: {args.run_yaml} is valid", file=sys.stderr)
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    print(config_reference_markdown(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import warnings

    cfg = load_run_config(args.run_yaml, args.overrides)
    # The checks of `check`, before torch and Megatron are even imported. Files only on rank 0, the
    # rank that reads them (the others are stopped by torchrun when rank 0 fails).
    preflight(cfg, _env_world_size() or 1, files=_rank() == 0)

    from megatron_vespo.driver import run_training

    # Expected on CPU (no TE/Apex: Megatron falls back to torch); one line each per rank is noise.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed.*")
    summary = run_training(cfg)
    if summary is not None:  # rank 0
        print("\n== megatron-vespo run summary ==")
        print(summary.text(cfg.run.stop_at_reward), flush=True)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from megatron_vespo.planning import format_plan, minimal_world_size, plan_run

    cfg = load_run_config(args.run_yaml, args.overrides)
    if args.trainer_gpus is None:
        print(f"# trainer GPUs not given: planning the smallest valid world size, {minimal_world_size(cfg)} "
              "(pass --trainer-gpus)", file=sys.stderr)
    try:
        plan = plan_run(cfg, trainer_gpus=args.trainer_gpus, gpu_memory_gib=args.gpu_memory_gib,
                        recompute=args.recompute, overhead_gib=args.overhead_gib,
                        engine_runtime_gib=args.engine_runtime_gib, gpus_per_node=args.gpus_per_node)
    except ConfigError as exc:  # plan_run checks its arguments by parameter name: name the flag instead
        if exc.path in PLAN_FLAGS:
            raise ConfigError(PLAN_FLAGS[exc.path], exc.message) from None
        raise
    print(format_plan(plan, cfg), end="")
    from megatron_vespo.planning.weight_sync import estimate_push, format_push

    print("\n" + format_push(estimate_push(cfg, args.weight_sync_gb_s)), end="")
    print(f"# OK: {args.run_yaml} fits", file=sys.stderr)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from megatron_vespo.experiments.sweep import parse_list, run_sweep

    run_sweep(args.run_yaml, args.overrides, losses=parse_list(args.losses, "--losses"),
              staleness=parse_list(args.staleness, "--staleness", int), seeds=args.seeds, jobs=args.jobs,
              out=args.out, threshold=args.threshold, timeout_s=args.timeout_s,
              optimizer_steps=args.optimizer_steps, command="megatron-vespo " + " ".join(sys.argv[1:]))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line too (its default prints the usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_CONFIG, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatron-vespo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error (also: MEGATRON_VESPO_DEBUG=1)")
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand from resetting the top-level value.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (also: MEGATRON_VESPO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", parents=[common], help="validate a run YAML (+ overrides) as `train` would, "
                           "data and checkpoint files included, and print the resolved config")
    check.add_argument("run_yaml")
    check.add_argument("overrides", nargs="*", help="a.b=value overrides")
    check.add_argument("--trainer-gpus", type=int, default=None,
                       help="trainer world size to check the layout for (default: WORLD_SIZE, else the smallest "
                       "valid one)")
    check.add_argument("--config-only", action="store_true",
                       help="validate the config alone: do not read data, tokenizer or checkpoint files (e.g. on a "
                       "machine without them)")
    check.set_defaults(func=_cmd_check)
    train = sub.add_parser("train", parents=[common],
                           help="RL training, sync or async per train.mode (run under torchrun for several ranks)")
    train.add_argument("run_yaml")
    train.add_argument("overrides", nargs="*", help="a.b=value overrides")
    train.set_defaults(func=_cmd_train)
    plan = sub.add_parser("plan", parents=[common],
                          help="validate a run for a trainer world size and print per-GPU memory estimates "
                          "(parameters, gradients, optimizer, activations, KV cache) and the GPU split")
    plan.add_argument("run_yaml")
    plan.add_argument("overrides", nargs="*", help="a.b=value overrides")
    plan.add_argument("--trainer-gpus", type=int, default=None,
                      help="trainer world size (torchrun NNODES x nproc_per_node); default: the smallest valid one")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument("--recompute", choices=["none", "full", "selective"], default=None,
                      help="activation recompute to assume instead of the config's train.recompute "
                           "(full: uniform, 1 layer; selective: core_attn)")
    plan.add_argument("--overhead-gib", type=float, default=2.0,
                      help="per-GPU allowance for CUDA context, NCCL buffers and fragmentation (default 2)")
    plan.add_argument("--engine-runtime-gib", type=float, default=10.0,
                      help="colocated runs: a generating engine's activations and CUDA graphs per GPU, beyond "
                           "mem_fraction_static (default 10, SGLang's own floor on GPUs over 60 GB)")
    plan.add_argument("--gpus-per-node", type=int, default=8,
                      help="colocated runs: GPUs of a node, for the host memory the offloaded trainer needs "
                           "(default 8)")
    plan.add_argument("--weight-sync-gb-s", type=float, default=10.0,
                      help="bandwidth for the push-time estimate, GB/s per link (default 10, ~100 Gb/s networks)")
    plan.set_defaults(func=_cmd_plan)
    from megatron_vespo.experiments.sweep import DEFAULT_LOSSES, DEFAULT_STALENESS  # no torch behind it

    sweep = sub.add_parser("sweep", parents=[common],
                           help="train a run config over the grid loss x staleness x seed (each run a `train` "
                           "process) and write one table (markdown + JSON) and one reward plot per staleness")
    sweep.add_argument("run_yaml")
    sweep.add_argument("overrides", nargs="*", help="a.b=value overrides applied to every run")
    sweep.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                       help=f"comma-separated loss.name values (default {','.join(DEFAULT_LOSSES)})")
    sweep.add_argument("--staleness", default=",".join(map(str, DEFAULT_STALENESS)),
                       help="comma-separated train.staleness values: the sync loop's N, optimizer steps per rollout "
                       f"batch (default {','.join(map(str, DEFAULT_STALENESS))})")
    sweep.add_argument("--seeds", type=int, default=1,
                       help="runs per (loss, staleness): train.seed, train.seed + 1, ... (default 1)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    sweep.add_argument("--out", default=None, help="directory of the runs, logs, table and plots "
                       "(default: <run.output_dir>/sweep); must not hold another sweep")
    sweep.add_argument("--threshold", type=float, default=0.5,
                       help="reward for the 'steps to threshold' column (default 0.5)")
    sweep.add_argument("--optimizer-steps", type=int, default=None,
                       help="optimizer steps per run: sets run.rollout_steps = K / N for each staleness N (K must be "
                       "a multiple of every N); default: the config's run.rollout_steps")
    sweep.add_argument("--timeout-s", type=float, default=None, help="stop a run after this many seconds "
                       "(it is marked failed); default: no limit")
    sweep.set_defaults(func=_cmd_sweep)
    ref = sub.add_parser("config-reference", help="print the config reference as a markdown table")
    ref.set_defaults(func=_cmd_config_reference)
    return parser


# ------------------------------------------------------------------------------------------- errors
def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-facing error classes of the modules loaded so far, and the input-file errors."""
    found = [getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules]
    return tuple(t for t in found if isinstance(t, type)) + INPUT_ERRORS


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: the project's errors as their message (it names the field, file or row),
    others prefixed with their class (``UnicodeDecodeError: ...``)."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    ours = any(isinstance(exc, t) for t in user_error_types() if t not in INPUT_ERRORS)
    return text if ours else f"{type(exc).__name__}: {text}"


def _exit_code(exc: BaseException) -> int:
    from megatron_vespo.planning import PlanError  # no torch behind it

    return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_PLAN if isinstance(exc, PlanError) else EXIT_ERROR


def _first_to_report(text: str, rank: int) -> bool:
    """Under a multi-process launch the ranks usually fail with the same error: only the first rank of
    this node to claim the message prints it (rank 0 gets a head start), so the user reads it once."""
    world = _env_world_size() or 1
    if world <= 1:
        return True
    if rank > 0:
        time.sleep(0.5)
    try:  # one launch = this node's launcher (our parent, e.g. torchrun's agent) and its start time
        import psutil

        launch = f"{os.getppid()}:{psutil.Process(os.getppid()).create_time()}"
    except Exception:  # noqa: BLE001 -- no psutil or no parent: the parent's pid alone
        launch = str(os.getppid())
    key = hashlib.sha1(f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{launch}:{text}".encode()).hexdigest()[:20]
    folder = Path(tempfile.gettempdir()) / f"megatron-vespo-errors-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        for old in folder.iterdir():  # markers of earlier launches: only the last hour's can matter
            try:
                if time.time() - old.stat().st_mtime > 3600:
                    old.unlink()
            except OSError:  # another rank pruned it first
                pass
        os.close(os.open(folder / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError:  # cannot tell: better twice than never
        return True


def report_error(exc: BaseException) -> Optional[int]:
    """Print ``exc`` as one ``error:`` line (once per launch) and return the exit status; None when it
    is not a user-facing error (the caller re-raises it: a bug keeps its traceback)."""
    if not isinstance(exc, user_error_types()):
        return None
    rank = _rank()
    if type(exc).__name__ == "RankZeroError" and rank > 0:
        return EXIT_ERROR  # rank 0 reports the cause itself
    text = error_line(exc)
    if _first_to_report(text, rank):
        where = f"[rank {rank}] " if rank > 0 else ""
        print(f"error: {where}{text}", file=sys.stderr, flush=True)
    return _exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`plan run.yaml --trainer-gpus 16 a.b=1`): argparse leaves
    # such trailing positionals unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    debug = args.debug or os.environ.get("MEGATRON_VESPO_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 -- user errors become one line; the rest is re-raised
        code = None if debug else report_error(exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
