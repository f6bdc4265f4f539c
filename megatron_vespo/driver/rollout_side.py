"""What rank 0 needs to produce rollouts: prompts, a verifier, the evaluator, and the running fleet
with its weight-sync transport.

With ``rollout.fleet: null`` the fleet is ``rollout.cpu_servers`` CPU rollout servers booted from a
directory holding exactly the trainer's initial weights (written by every pipeline stage, see
``WeightPublisher.export_hf_dir``), at the trainer's version; a configured fleet boots from its own
checkpoint and is then given the trainer's weights by a push.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.config.schema import RunConfig
from megatron_vespo.data.dataset import PromptSampler, load_prompt_dataset, load_tokenizer
from megatron_vespo.driver.evaluation import Evaluator
from megatron_vespo.rollout_function import load_rollout_function
from megatron_vespo.rewards.registry import Verifier, get_verifier
from rollout_sglang.config import FleetConfig, ServerConfig
from rollout_sglang.contracts import StagedWeightSync
from rollout_sglang.fleet import Fleet
from rollout_sglang.weight_sync import make_weight_sync
from typed_config import ConfigError


def cpu_fleet_config(cfg: RunConfig, model_dir: Path, version: str) -> FleetConfig:
    """``rollout.cpu_servers`` CPU rollout servers serving ``model_dir`` at ``version``."""
    extra = ["--weight-version", version]
    deterministic = cfg.rollout.cpu_server_deterministic
    if deterministic:  # one sequence per forward: results independent of timing
        extra += ["--max-batch-size", "1"]
    # Deterministic sampling as SGLang's (the request's seed for all of its samples): runs exercise the
    # one-request-per-sample path a GPU run with --enable-deterministic-inference takes.
    server = ServerConfig(kind="cpu", model_path=str(model_dir), dtype=cfg.rollout.cpu_server_dtype,
                          deterministic_inference=deterministic, extra_args=extra)
    return FleetConfig(servers=[server] * cfg.rollout.cpu_servers, log_dir=str(Path(cfg.run.output_dir) / "fleet_logs"))


def load_verifier(cfg: RunConfig) -> Verifier:
    try:
        return get_verifier(cfg.reward.verifier, cfg.reward)
    except KeyError as exc:
        raise ConfigError("reward.verifier", str(exc.args[0]).split(": ", 1)[-1]) from None


@dataclass
class RolloutSide:
    """Rank 0's data, verifier, evaluator, fleet and weight sync (see the module docstring)."""

    tokenizer: Any
    sampler: PromptSampler
    dataset_stats: dict[str, float]
    verifier: Verifier
    evaluator: Optional[Evaluator]
    fleet: Fleet
    weight_sync: StagedWeightSync

    @classmethod
    def open(cls, cfg: RunConfig, initial_dir: Optional[Path], version: str,
             sampler_state: Optional[dict] = None) -> "RolloutSide":
        """Load the data (continuing at ``sampler_state``, a resumed run's data position), start the fleet
        (CPU servers boot from ``initial_dir`` at ``version``) and the owner's side of its weight sync."""
        output_dir = Path(cfg.run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(cfg.data)
        dataset = load_prompt_dataset(cfg.data, cfg.rollout.max_prompt_len, tokenizer)
        print(f"[data] {dataset.source}: {len(dataset.rows)} prompts "
              f"({dataset.num_filtered_too_long} longer than {cfg.rollout.max_prompt_len} dropped)", flush=True)
        sampler = PromptSampler(dataset, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
        # The rollout function's module first: it may register the verifier the run names.
        load_rollout_function(cfg.rollout.function)
        verifier = load_verifier(cfg)
        evaluator = Evaluator(cfg, tokenizer) if cfg.eval.sets and cfg.eval.every_steps else None

        if cfg.rollout.fleet is None:
            config_dir = Path(initial_dir)
            fleet_cfg = cpu_fleet_config(cfg, config_dir, version)
        else:
            fleet_cfg = cfg.rollout.fleet
            config_dir = Path(fleet_cfg.servers[0].model_path)
        t0 = time.monotonic()
        fleet = Fleet(fleet_cfg).start()
        if cfg.rollout.fleet is None:  # a complete export of this version: a restarted server reloads it
            fleet.record_weights(version, disk_path=str(config_dir))
        print(f"[fleet] {len(fleet_cfg.servers)} server(s) behind {fleet.router_url} "
              f"({time.monotonic() - t0:.1f}s)", flush=True)
        ws = cfg.rollout.weight_sync
        if ws.transport == "disk" and not ws.disk_dir:
            ws = dataclasses.replace(ws, disk_dir=str(output_dir / "weights"))
        try:
            weight_sync = make_weight_sync(fleet, ws, config_dir=str(config_dir) if config_dir.is_dir() else None)
        except BaseException:
            fleet.stop()
            raise
        stats = {"data/prompts": float(len(dataset.rows)), "data/filtered_too_long": float(dataset.num_filtered_too_long)}
        return cls(tokenizer=tokenizer, sampler=sampler, dataset_stats=stats, verifier=verifier, evaluator=evaluator,
                   fleet=fleet, weight_sync=weight_sync)

    def close(self, quiet: bool) -> None:
        """Release the weight-sync transport, then stop the fleet (errors only printed when ``quiet``,
        i.e. when the run is already failing)."""
        for closer in (self.weight_sync.close, self.fleet.stop):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 -- cleanup must not hide the run's own error
                if not quiet:
                    raise
                print(f"[shutdown] {type(exc).__name__}: {exc}", flush=True)
