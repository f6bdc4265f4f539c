"""The run planner: parameter counts against hand arithmetic, per-rank shards, memory and layout errors."""
from __future__ import annotations

import pytest

from megatron_vespo.cli import main as cli_main
from megatron_vespo.config import ConfigError, load_run_config
from megatron_vespo.planning import PlanError, count_params, format_plan, minimal_world_size, plan_run
from megatron_vespo.planning.memory import GIB

QWEN3_30B = "configs/models/qwen3_30b_a3b.yaml"


def run_cfg(model: str, **sections):
    data = {"model": model, **sections}
    return load_run_config(data=data)


def test_qwen3_30b_a3b_parameter_count_matches_hand_calculation():
    h, layers, vocab, head_dim, experts, top_k, ffn_e = 2048, 48, 151936, 128, 128, 8, 768
    q, kv = 32 * head_dim, 4 * head_dim                      # 4096, 512
    attention = h * q + 2 * h * kv + q * h                   # q, k, v, o = 18,874,368
    norms = 2 * h + 2 * head_dim                             # input/post-attn RMSNorm + q/k norms = 4,352
    router = h * experts                                     # 262,144
    expert = 3 * h * ffn_e                                   # gate, up, down = 4,718,592
    embed = vocab * h                                        # 311,164,928 (x2: untied output layer)
    total = layers * (attention + norms + router + experts * expert) + 2 * embed + h
    active = layers * (attention + norms + router + top_k * expert) + 2 * embed + h
    assert total == 30_532_122_624 and active == 3_353_032_704  # ~30.5B total, ~3.3B active

    counts = count_params(load_run_config(data={"model": QWEN3_30B}).model)
    assert counts.total == total
    assert counts.active == active


def test_dense_qwen3_0_6b_is_about_0_6b_with_tied_embeddings():
    h, layers, vocab, head_dim, ffn = 1024, 28, 151936, 128, 3072
    attention = h * 16 * head_dim * 2 + 2 * h * 8 * head_dim
    per_layer = attention + 3 * h * ffn + 2 * h + 2 * head_dim
    total = layers * per_layer + vocab * h + h  # tied: the output layer is the embedding
    counts = count_params(load_run_config(data={"model": "configs/models/qwen3_0_6b.yaml"}).model)
    assert counts.total == total == 596_049_920
    assert counts.active == counts.total  # dense: every parameter is active


def test_per_rank_shard_of_30b_under_tp_ep():
    cfg = run_cfg(QWEN3_30B, parallel={"tensor": 4, "expert": 8, "sequence_parallel": True})
    plan = plan_run(cfg, trainer_gpus=16)
    c = plan.params
    # TP splits vocabulary and attention, EP x ETP the experts; norms and router stay whole. Megatron pads
    # the vocabulary to a multiple of 128 x TP = 512: 151936 -> 152064 rows of the embedding and output layer.
    padding = 2 * (152064 - 151936) * cfg.model.hidden_size
    expected = (c.embedding + c.output + padding + c.attention) // 4 + c.replicated + c.experts // 8
    assert plan.trainer.params_per_rank == expected
    assert plan.trainer.data_parallel == 4 and plan.trainer.expert_data_parallel == 2
    assert plan.trainer.weights == expected * 2 and plan.trainer.gradients == expected * 4
    dense = (c.embedding + c.output + padding + c.attention) // 4 + c.replicated
    assert plan.trainer.optimizer == pytest.approx(12 * (dense / 4 + c.experts // 8 / 2))
    assert plan.trainer.total < 80 * GIB


def test_pipeline_stages_and_recompute_shrink_the_estimate():
    base = run_cfg(QWEN3_30B, parallel={"tensor": 2, "expert": 8, "sequence_parallel": True})
    with pytest.raises(PlanError, match="recompute full"):
        plan_run(base, trainer_gpus=16)
    full = plan_run(base, trainer_gpus=16, recompute="full")
    assert full.trainer.activations < 0.1 * plan_run(base, trainer_gpus=16, gpu_memory_gib=1e4).trainer.activations
    piped = run_cfg(QWEN3_30B, parallel={"tensor": 2, "pipeline": 2, "expert": 8, "sequence_parallel": True})
    assert plan_run(piped, trainer_gpus=32, recompute="full").trainer.params_per_rank < full.trainer.params_per_rank


def test_impossible_layout_is_a_config_error():
    cfg = run_cfg(QWEN3_30B, parallel={"tensor": 4, "expert": 8, "sequence_parallel": True})
    with pytest.raises(ConfigError, match="parallel.expert"):
        plan_run(cfg, trainer_gpus=12)  # 8 experts ranks cannot tile a stage of 4 x 3 ranks
    with pytest.raises(ConfigError, match="parallel.tensor"):
        run_cfg(QWEN3_30B, parallel={"tensor": 3})  # 3 does not divide 32 heads
    assert minimal_world_size(cfg) == 8


def test_fleet_kv_cache_capacity():
    server = {"kind": "sglang", "model_path": "/ckpt", "tp": 4, "ep": 4, "mem_fraction_static": 0.8,
              "dtype": "bfloat16"}
    cfg = run_cfg(QWEN3_30B, parallel={"tensor": 4, "expert": 8, "sequence_parallel": True},
                  rollout={"fleet": {"servers": [server, server]}})
    plan = plan_run(cfg, trainer_gpus=16)
    s = plan.fleet.servers[0]
    weights = 30_532_122_624 * 2 / 4
    per_token = 2 * 48 * 1 * 128 * 2  # 4 KV heads / TP 4 = 1 per GPU, bf16
    assert s.weights_per_gpu == weights
    assert s.kv_tokens == int((80 * GIB * 0.8 - weights) // per_token)
    assert plan.fleet.gpus == 8 and plan.total_gpus == 24
    tight = run_cfg(QWEN3_30B, parallel={"tensor": 4, "expert": 8, "sequence_parallel": True},
                    rollout={"fleet": {"servers": [{**server, "tp": 1, "ep": 1, "mem_fraction_static": 0.7}]}})
    with pytest.raises(PlanError, match=r"servers\[0\].*weights"):
        plan_run(tight, trainer_gpus=16)


def test_cli_plan_prints_table_and_fails_cleanly(capsys, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {QWEN3_30B}\nparallel: {{tensor: 4, expert: 8, sequence_parallel: true}}\n")
    assert cli_main(["plan", str(run), "--trainer-gpus", "16"]) == 0
    out = capsys.readouterr().out
    assert "30,532,122,624" in out and "3,353,032,704" in out and "trainer 16 + fleet 0 = 16" in out
    assert cli_main(["plan", str(run), "--trainer-gpus", "12"]) == 2
    assert "parallel.expert" in capsys.readouterr().err
    assert cli_main(["plan", str(run), "--trainer-gpus", "16", "--gpu-memory-gib", "40"]) == 3
    assert capsys.readouterr().err.startswith("error: trainer rank")


@pytest.mark.parametrize("kwargs,name", [
    ({"trainer_gpus": 0}, "trainer_gpus"), ({"trainer_gpus": -8}, "trainer_gpus"),
    ({"gpu_memory_gib": float("nan")}, "gpu_memory_gib"), ({"gpu_memory_gib": -80.0}, "gpu_memory_gib"),
    ({"gpu_memory_gib": 0.0}, "gpu_memory_gib"), ({"overhead_gib": float("nan")}, "overhead_gib"),
    ({"overhead_gib": -1.0}, "overhead_gib"), ({"overhead_gib": float("inf")}, "overhead_gib"),
])
def test_plan_rejects_impossible_arguments(kwargs, name):
    cfg = run_cfg(QWEN3_30B, parallel={"tensor": 4, "expert": 8, "sequence_parallel": True})
    with pytest.raises(ConfigError) as info:
        plan_run(cfg, **kwargs)
    assert info.value.path == name


def test_plan_names_the_parallel_size_that_does_not_fit():
    cfg = run_cfg(QWEN3_30B, parallel={"tensor": 4, "pipeline": 2, "expert": 8, "sequence_parallel": True})
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline:"):
        plan_run(cfg, trainer_gpus=4)


def test_the_config_recompute_is_planned_and_ordered_by_what_it_keeps():
    """train.recompute drives the plan (the --recompute flag only overrides it): full keeps least,
    block with some layers sits between full and none, selective MoE recompute drops the routed copies."""
    layout = {"tensor": 2, "expert": 8, "sequence_parallel": True}

    def activations(**recompute) -> float:
        cfg = run_cfg(QWEN3_30B, parallel=layout, train={"recompute": recompute})
        return plan_run(cfg, trainer_gpus=16, gpu_memory_gib=1e4).trainer.activations

    none, full = activations(), activations(granularity="full")
    block = activations(granularity="full", method="block", num_layers=24)  # 24 of 48 layers
    uniform4 = activations(granularity="full", num_layers=4)
    moe = activations(granularity="selective", modules=["moe"])
    attn = activations(granularity="selective")
    assert full < uniform4 < block < none
    assert block == pytest.approx((none + full) / 2, rel=0.05)
    assert moe < attn < none
    cfg = run_cfg(QWEN3_30B, parallel=layout, train={"recompute": {"granularity": "full"}})
    plan = plan_run(cfg, trainer_gpus=16)
    assert plan.trainer.recompute == "full (uniform, 1 layer)"
    assert plan_run(cfg, trainer_gpus=16, gpu_memory_gib=1e4, recompute="none").trainer.activations == none
    with pytest.raises(ConfigError, match="expected none, full or selective"):
        plan_run(cfg, trainer_gpus=16, recompute="partial")


def test_optimizer_offload_moves_the_state_to_host_memory_in_the_plan():
    layout = {"tensor": 2, "expert": 8, "sequence_parallel": True}
    base = plan_run(run_cfg(QWEN3_30B, parallel=layout), trainer_gpus=16, gpu_memory_gib=1e4).trainer
    half = plan_run(run_cfg(QWEN3_30B, parallel=layout, optimizer={"cpu_offload": True, "offload_fraction": 0.5}),
                    trainer_gpus=16, gpu_memory_gib=1e4).trainer
    assert half.optimizer == pytest.approx(base.optimizer / 2)
    assert half.optimizer_host == pytest.approx(base.optimizer / 2)
    assert half.total == pytest.approx(base.total - base.optimizer / 2)
    with pytest.raises(ConfigError, match="only applies with cpu_offload"):
        run_cfg(QWEN3_30B, optimizer={"offload_fraction": 0.5})
    with pytest.raises(ConfigError, match="needs distributed: true"):
        run_cfg(QWEN3_30B, optimizer={"cpu_offload": True, "distributed": False})


def test_optimizer_offload_is_refused_without_a_gpu():
    import torch

    from megatron_vespo.models.trainable import _megatron_optimizer_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu/test_optimizer_offload.py covers offload there")
    cfg = run_cfg("configs/models/tiny_moe.yaml", optimizer={"cpu_offload": True})
    with pytest.raises(ConfigError, match="this machine has no GPU") as err:
        _megatron_optimizer_config(cfg)
    assert err.value.path == "optimizer.cpu_offload"


# ---- colocated placement: one GPU alternates between the trainer phase and the rollout phase -------------
COLOCATED_LAYOUT = {"tensor": 4, "expert": 8, "sequence_parallel": True}


def colocated_cfg(engines: int = 4, tp: int = 8, mem_fraction_static: float = 0.8, **sections):
    """The paper's colocated layout: one TP-8 engine per 8-GPU node, on the trainer's GPUs."""
    server = {"kind": "sglang", "model_path": "/ckpt", "tp": tp, "ep": tp, "dtype": "bfloat16",
              "mem_fraction_static": mem_fraction_static, "extra_args": ["--enable-memory-saver"]}
    fleet = {"placement": {"colocate": True}, "servers": [server] * engines}
    return run_cfg(QWEN3_30B, parallel=COLOCATED_LAYOUT, rollout={"fleet": fleet}, **sections)


def test_colocated_phases_of_qwen3_30b_on_32_gpus_by_hand():
    plan = plan_run(colocated_cfg(), trainer_gpus=32)
    c, t, co = plan.params, plan.trainer, plan.colocated
    # Trainer rank (TP 4, DP 8, EP 8, expert-DP 4): shards as in test_per_rank_shard_of_30b_under_tp_ep.
    padding = 2 * (152064 - 151936) * 2048
    dense = (c.embedding + c.output + padding + c.attention) // 4 + c.replicated
    experts = c.experts // 8
    assert t.params_per_rank == dense + experts == 4_018_878_464
    assert t.data_parallel == 8 and t.expert_data_parallel == 4
    optimizer = 12 * (dense / 8 + experts / 4)  # Adam m, v + fp32 master, dense over DP 8, experts over 4
    assert t.optimizer == pytest.approx(optimizer)
    # Trainer phase: the whole trainer rank + the released engine's 2 GiB (CUDA context, communicators).
    assert co.trainer_phase == t.total + 2 * GIB
    assert co.trainer_phase / GIB == pytest.approx(66.36, abs=0.01)
    # Rollout phase: the offloaded trainer's 2 GiB + 0.8 x 80 GiB (weights + KV) + 10 GiB activations/graphs.
    assert co.rollout_phase == 2 * GIB + 0.8 * 80 * GIB + 10 * GIB == 76 * GIB
    assert co.engine_weights == 30_532_122_624 * 2 / 8  # bf16 weights over TP 8: 7.11 GiB
    assert co.binding == "rollout"
    # Host memory: weights (2) + fp32 gradients (4) + optimizer, per GPU; x 8 GPUs per node.
    host = 6 * 4_018_878_464 + optimizer
    assert co.host_per_gpu == pytest.approx(host) and co.host_per_node == pytest.approx(8 * host)
    assert co.host_per_gpu / GIB == pytest.approx(33.13, abs=0.01)
    # The engines share the trainer's GPUs: 32 in all, not 32 + 32.
    assert plan.fleet.gpus == 32 and plan.total_gpus == 32


def test_the_heavier_phase_binds_and_each_phase_must_fit():
    # A small static fraction makes the trainer phase the larger one: 2 + 0.5 x 80 + 10 = 52 GiB < 66.36.
    low = plan_run(colocated_cfg(mem_fraction_static=0.5), trainer_gpus=32).colocated
    assert low.binding == "trainer" and low.rollout_phase == 52 * GIB
    with pytest.raises(PlanError, match=r"^rollout\.fleet\.servers\[0\]: the colocated rollout phase needs about 84\.0 "
                                        r"GiB.*lower mem_fraction_static"):
        plan_run(colocated_cfg(mem_fraction_static=0.9), trainer_gpus=32)  # 2 + 72 + 10
    # 65 GiB holds the trainer rank alone (64.36) but not beside the released engines (+2).
    with pytest.raises(PlanError, match=r"^trainer rank .* about 66\.4 GiB beside the released engines \(2\.0 GiB\)"):
        plan_run(colocated_cfg(), trainer_gpus=32, gpu_memory_gib=65)
    assert plan_run(colocated_cfg(), trainer_gpus=32, engine_runtime_gib=12).colocated.rollout_phase == 78 * GIB
    with pytest.raises(ConfigError, match=r"^rollout\.fleet\.servers: colocated engines take 40 GPUs, more than "
                                          r"the 32"):
        plan_run(colocated_cfg(engines=5), trainer_gpus=32)


def test_disaggregated_runs_have_no_colocated_phases():
    server = {"kind": "sglang", "model_path": "/ckpt", "tp": 4, "ep": 4, "dtype": "bfloat16"}
    cfg = run_cfg(QWEN3_30B, parallel=COLOCATED_LAYOUT, rollout={"fleet": {"servers": [server] * 4}})
    plan = plan_run(cfg, trainer_gpus=16)
    assert plan.colocated is None and plan.total_gpus == 32


def test_colocated_cpu_servers_leave_only_the_trainer_on_the_gpu():
    fleet = {"placement": {"colocate": True}, "servers": [{"kind": "cpu", "model_path": "/ckpt"}]}
    cfg = run_cfg("configs/models/tiny_moe.yaml", rollout={"fleet": fleet})
    plan = plan_run(cfg)
    co = plan.colocated
    assert co.rollout_phase == co.trainer_resident == 2 * GIB and co.trainer_phase == plan.trainer.total
    assert co.binding == "trainer" and plan.total_gpus == 1
    line = "  rollout phase        2.00 GiB  offloaded trainer 2.00 (no GPU engine in the fleet)\n"
    assert line in format_plan(plan, cfg)


def test_cli_plan_prints_the_colocated_phases(capsys):
    path = "configs/paper/vespo_sync_n8_colocated.yaml"
    assert cli_main(["plan", path, "--trainer-gpus", "32"]) == 0
    out = capsys.readouterr().out
    assert "  trainer phase       66.36 GiB  trainer rank 64.36 + released engine 2.00\n" in out
    assert "  rollout phase       76.00 GiB  offloaded trainer 2.00 + engine static 64.00 (weights 7.11 + KV 56.89, " \
           "mem_fraction_static 0.8 of server 0) + activations/CUDA graphs 10.00\n" in out
    assert "  binding phase    rollout: 76.00 of 80 GiB (the other phase 66.36)\n" in out
    assert "265.07 GiB pinned per node of 8 GPUs" in out
    assert "== GPUs: 32, shared by the trainer (32) and the fleet (32, colocated) ==" in out
    assert cli_main(["plan", path, "--trainer-gpus", "32", "--gpus-per-node", "4"]) == 0
    assert "132.54 GiB pinned per node of 4 GPUs" in capsys.readouterr().out
    for flag, value in (("--gpus-per-node", "0"), ("--engine-runtime-gib", "-1")):
        assert cli_main(["plan", path, "--trainer-gpus", "32", flag, value]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag}:")
