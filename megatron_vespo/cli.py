"""`megatron-vespo` command line: subcommands are added as the pieces behind them exist."""
from __future__ import annotations

import argparse
import sys

import yaml

from megatron_vespo.config import ConfigError, RunConfig, describe_fields, load_run_config, to_dict


def config_reference_markdown() -> str:
    """Markdown table of every run-config field (docs/config_reference.md is generated from this)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, tp, default, help_text in describe_fields(RunConfig):
        lines.append(f"| `{name}` | {tp.replace('|', '/')} | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.run_yaml, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"# OK: {args.run_yaml} is valid", file=sys.stderr)
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    print(config_reference_markdown(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import warnings

    from megatron_vespo.driver import run_training

    # Expected on CPU (no TE/Apex: Megatron falls back to torch); one line each per rank is noise.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed.*")
    cfg = load_run_config(args.run_yaml, args.overrides)
    summary = run_training(cfg)
    if summary is not None:  # rank 0
        print("\n== megatron-vespo run summary ==")
        print(summary.text(cfg.run.stop_at_reward), flush=True)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from megatron_vespo.planning import PlanError, format_plan, minimal_world_size, plan_run

    cfg = load_run_config(args.run_yaml, args.overrides)
    if args.trainer_gpus is None:
        print(f"# trainer GPUs not given: planning the smallest valid world size, {minimal_world_size(cfg)} "
              "(pass --trainer-gpus)", file=sys.stderr)
    try:
        plan = plan_run(cfg, trainer_gpus=args.trainer_gpus, gpu_memory_gib=args.gpu_memory_gib,
                        recompute=args.recompute, overhead_gib=args.overhead_gib)
    except PlanError as exc:
        print(f"plan error: {exc}", file=sys.stderr)
        return 3
    print(format_plan(plan, cfg), end="")
    print(f"# OK: {args.run_yaml} fits", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-vespo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a run YAML (+ overrides) and print the resolved config")
    check.add_argument("run_yaml")
    check.add_argument("overrides", nargs="*", help="a.b=value overrides")
    check.set_defaults(func=_cmd_check)
    train = sub.add_parser("train", help="RL training, sync or async per train.mode (run under torchrun for several ranks)")
    train.add_argument("run_yaml")
    train.add_argument("overrides", nargs="*", help="a.b=value overrides")
    train.set_defaults(func=_cmd_train)
    plan = sub.add_parser("plan", help="validate a run for a trainer world size and print per-GPU memory estimates "
                          "(parameters, gradients, optimizer, activations, KV cache) and the GPU split")
    plan.add_argument("run_yaml")
    plan.add_argument("overrides", nargs="*", help="a.b=value overrides")
    plan.add_argument("--trainer-gpus", type=int, default=None,
                      help="trainer world size (torchrun NNODES x nproc_per_node); default: the smallest valid one")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument("--recompute", choices=["none", "full"], default="none",
                      help="activation recompute to assume (default: none)")
    plan.add_argument("--overhead-gib", type=float, default=2.0,
                      help="per-GPU allowance for CUDA context, NCCL buffers and fragmentation (default 2)")
    plan.set_defaults(func=_cmd_plan)
    ref = sub.add_parser("config-reference", help="print the config reference as a markdown table")
    ref.set_defaults(func=_cmd_config_reference)
    return parser


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
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
