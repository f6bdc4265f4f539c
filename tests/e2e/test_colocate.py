"""End to end on CPU: the colocated cycle (``rollout.fleet.placement.colocate``) under torchrun with EP=2.

Two trainer ranks and one CPU rollout server behind the real sglang-router; every rollout step: generate ->
the server releases its memory -> the trainer reloads its state -> 2 optimizer steps -> the trainer
offloads -> the server resumes its weights -> disk push -> the server resumes its KV cache -> next
generation. The quickstart model widened to hidden 512 (experts 1024) holds ~49 MB of fp32 weights, so the
server's resident memory (read from /proc by the driver, ``colocate/engine_rss_mb_*``) shows each release
and resume plainly. Checked from ``metrics.jsonl``: memory fell and rose every step, training stayed finite,
and every step generated with the weights the previous push published (version numbers); the checkpoint
at the end is written with the trainer's state reloaded beside the engines' weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_vespo.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/quickstart.yaml")
MODEL = ["model.hidden_size=512", "model.moe_intermediate_size=1024"]  # ~49 MB of fp32 weights


def test_torchrun_expert_parallel_colocated_cycle(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_vespo.checkpoint.hf_io import hf_config_from_model
    from megatron_vespo.config import load_run_config
    from tests.multiproc.torchrun import run_torchrun

    model = load_run_config(CONFIG, MODEL).model
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_from_model(model, torch.float32)))
    hf.save_pretrained(tmp_path / "engine_hf")  # what the server boots from; the trainer's weights replace it
    model_mb = sum(p.numel() * p.element_size() for p in hf.parameters()) / (1 << 20)
    assert model_mb > 40
    fleet = (f"{{servers: [{{kind: cpu, model_path: {tmp_path / 'engine_hf'}}}], placement: {{colocate: true}}, "
             f"log_dir: {tmp_path / 'fleet_logs'}}}")
    steps, staleness = 2, 2
    out = run_torchrun("-m", ["megatron_vespo.cli", "train", CONFIG, "parallel.expert=2", *MODEL,
                              f"run.output_dir={tmp_path / 'run'}", f"run.rollout_steps={steps}",
                              "run.stop_at_reward=null", "run.plot=false", "eval.every_steps=0",
                              f"train.staleness={staleness}", "train.mini_batch_prompts=2", "rollout.n_samples=4",
                              f"checkpoint.save_every_steps={steps}",  # the trainer reloads beside the engines
                              f"rollout.fleet={fleet}"],
                       nproc=2, timeout=300)  # 64-68 s measured at load 4-8 on 2 cores
    assert out.count("megatron-vespo run summary") == 1
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train_step"] for r in records] == list(range(1, steps * staleness + 1))
    for r in records:
        assert r["train/skipped_nonfinite_step"] == 0
        for key in ("loss/policy_loss", "train/grad_norm", "vespo/W_mean", "time/colocate_release_s",
                    "time/colocate_reload_s", "time/colocate_offload_s", "time/colocate_resume_weights_s",
                    "time/colocate_resume_kv_s", "time/weight_sync_s"):
            assert math.isfinite(r[key]), (key, r)
        assert r["colocate/trainer_offloaded_mb"] > 0
    assert any(r["train/grad_norm"] > 0 for r in records)  # it learned something, not only zero-advantage groups
    for step in range(steps):
        r = records[step * staleness]  # the rollout step's metrics are on each of its records
        served, released, resumed = (r[f"colocate/engine_rss_mb_{phase}"] for phase in ("served", "released", "resumed"))
        assert served - released > 0.8 * model_mb, (step, served, released)  # weights (and spare buffers) freed
        assert resumed - released > 0.8 * model_mb, (step, released, resumed)  # and taken back for the push
        # The server generated this batch with the weights the previous push (version = steps so far) published.
        assert r["rollout_weight_version"] == str(step * staleness)
        assert r["rollout/stale_version_responses"] == 0
    assert f"fleet at weight version {steps * staleness}" in out
    assert out.count("[checkpoint] saved") == 1
