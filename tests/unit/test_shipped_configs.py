"""Every shipped YAML loads and validates; paper runs fit their GPUs and differ only where they should."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, load_model_config, load_run_config, to_dict
from megatron_vespo.models.layout import validate_layout
from megatron_vespo.planning import minimal_world_size, plan_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if "models" not in p.parts)
MODEL_YAMLS = sorted((CONFIGS / "models").glob("*.yaml"))
PAPER_30B = sorted(p for p in (CONFIGS / "paper").glob("*.yaml") if "qwen3_" not in p.name)


def planned_world_size(path: Path, cfg) -> int:
    """The trainer world size a config's header names (``--trainer-gpus N``), else the smallest valid one."""
    match = re.search(r"--trainer-gpus (\d+)", path.read_text())
    return int(match.group(1)) if match else minimal_world_size(cfg)


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_yaml_loads_and_its_layout_fits_its_world_size(path):
    cfg = load_run_config(path)
    validate_layout(cfg.model, cfg.parallel, cfg.precision, world_size=planned_world_size(path, cfg))


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_yaml_passes_check(path, capsys):
    """`megatron-vespo check` accepts every shipped run: all of it where its files ship with the repo
    (data, tokenizer, checkpoints), the config alone for paper runs (their data and checkpoints are
    downloaded separately), at the world size the header plans for."""
    from megatron_vespo.cli import main as cli_main

    cfg = load_run_config(path)
    files_here = not cfg.data.path and not cfg.data.tokenizer and not cfg.checkpoint.init_from
    args = ["check", str(path), "--trainer-gpus", str(planned_world_size(path, cfg))]
    assert cli_main(args + ([] if files_here else ["--config-only"])) == 0, capsys.readouterr().err
    assert "# OK:" in capsys.readouterr().err
    assert files_here or "paper" in path.parts  # only paper runs may need files that are not shipped


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_runs_fit_in_80gib(path):
    cfg = load_run_config(path)
    plan = plan_run(cfg, trainer_gpus=planned_world_size(path, cfg), gpu_memory_gib=80)
    text = path.read_text()
    stated = re.search(r"^# (\d+) GPUs", text, re.M) or re.search(r"one (\d+)-GPU node", text)
    assert stated, "the header states the run's GPU count"
    assert plan.total_gpus == int(stated.group(1))  # trainer + fleet = the GPUs the header promises


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.name)
def test_model_yaml_loads(path):
    load_model_config(path)


def test_qwen3_30b_a3b_matches_the_reference_setup():
    m = load_model_config(CONFIGS / "models/qwen3_30b_a3b.yaml")  # docs/scale_out.md §3
    assert (m.architecture, m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads,
            m.head_dim, m.vocab_size) == ("qwen3_moe", 48, 2048, 32, 4, 128, 151936)
    assert (m.rms_norm_eps, m.rope_theta, m.qk_layernorm, m.attention_bias, m.tie_word_embeddings) == \
        (1e-6, 1e6, True, False, False)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob,
            m.router_aux_loss_coef, m.mlp_only_layers, m.decoder_sparse_step) == (128, 8, 768, True, 0.0, [], 1)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# What a paper run may change relative to vespo_sync_n8 (everything else is the shared setup); a colocated
# run also places its engines and publishes weights its own way.
ALLOWED = re.compile(r"^(loss\..*|train\.(staleness|mode)|asynchronous\..*|rollout\.fleet\.servers|"
                     r"run\.(rollout_steps|output_dir)|logging\.run_name)$")
ALLOWED_COLOCATED = re.compile(r"^rollout\.(fleet\.placement|weight_sync)\..*$")


@pytest.mark.parametrize("path", PAPER_30B, ids=lambda p: p.name)
def test_paper_runs_share_one_setup(path):
    base = _flat(to_dict(load_run_config(CONFIGS / "paper/vespo_sync_n8.yaml")))
    cfg = load_run_config(path)
    run = _flat(to_dict(cfg))
    changed = {k for k in base if base[k] != run.get(k)}
    colocated = cfg.rollout.fleet.placement.colocate
    allowed = lambda k: ALLOWED.match(k) or (colocated and ALLOWED_COLOCATED.match(k))  # noqa: E731
    assert all(allowed(k) for k in changed), sorted(k for k in changed if not allowed(k))
    assert cfg.optimizer.lr == 1e-6 and cfg.rollout.n_samples == 8 and cfg.train.mini_batch_prompts == 256
    assert cfg.rollout.max_response_len == 15360 and cfg.train.micro_batch_tokens == 16384
    if cfg.train.mode == "sync":
        assert cfg.run.rollout_steps * cfg.train.staleness == 512
        assert cfg.train.staleness == int(re.search(r"_n(\d+)", path.name).group(1))
    else:
        assert cfg.asynchronous.push_every_steps == 4 and cfg.asynchronous.partial_rollouts
        assert sum(s.tp for s in cfg.rollout.fleet.servers) == 48
    if colocated:  # the engines share the trainer's GPUs, one per node, and release memory with SGLang's saver
        # Four nodes: CUDA IPC reaches only the fleet owner's node, so the weights go over NCCL.
        assert cfg.train.mode == "sync" and cfg.rollout.weight_sync.transport == "distributed"
        assert sum(s.tp for s in cfg.rollout.fleet.servers) == planned_world_size(path, cfg) == 32
        assert all(s.tp == 8 and "--enable-memory-saver" in s.extra_args for s in cfg.rollout.fleet.servers)


def test_the_paper_sync_n8_run_ships_colocated_and_disaggregated():
    """The paper colocates its synchronous runs; both placements of VESPO N=8 ship, on 32 GPUs each."""
    placements = {}
    for name in ("vespo_sync_n8.yaml", "vespo_sync_n8_colocated.yaml"):
        cfg = load_run_config(CONFIGS / "paper" / name)
        plan = plan_run(cfg, trainer_gpus=planned_world_size(CONFIGS / "paper" / name, cfg))
        placements[cfg.rollout.fleet.placement.colocate] = (plan.trainer.world_size, plan.fleet.gpus, plan.total_gpus)
    assert placements == {False: (16, 16, 32), True: (32, 32, 32)}
    with pytest.raises(ConfigError, match=r"^rollout\.fleet\.placement\.colocate: needs train\.mode: sync"):
        load_run_config(CONFIGS / "paper/vespo_sync_n8_colocated.yaml", ["train.mode=async"])
