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
    ref = sub.add_parser("config-reference", help="print the config reference as a markdown table")
    ref.set_defaults(func=_cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
