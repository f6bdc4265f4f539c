"""Typed config: loading, overrides, and one-line errors that name the field."""
from pathlib import Path

import pytest
import yaml

from megatron_vespo.config import ConfigError, RunConfig, build, load_model_config, load_run_config, to_dict
from typed_config import describe_fields

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = REPO / "configs" / "tiny_vespo.yaml"


def test_tiny_run_loads_with_defaults():
    cfg = load_run_config(TINY_RUN)
    assert cfg.model.architecture == "qwen3_moe"
    assert cfg.model.num_experts == 8 and cfg.model.num_experts_per_tok == 2
    assert cfg.loss.name == "vespo" and cfg.loss.resolved_aggregation == "token-mean"
    v = cfg.loss.vespo
    assert (v.k_pos, v.lambda_pos, v.k_neg, v.lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    assert cfg.precision.params_dtype == "fp32"


def test_overrides_reach_nested_and_model_fields():
    cfg = load_run_config(TINY_RUN, ["loss.vespo.k_neg=4", "optimizer.lr=1e-5", "model.num_experts=4",
                                     "loss.name=gspo", "parallel.tensor=2",
                                     "parallel.sequence_parallel=true", "parallel.expert_tensor=2"])
    assert cfg.loss.vespo.k_neg == 4.0 and isinstance(cfg.loss.vespo.k_neg, float)
    assert cfg.optimizer.lr == pytest.approx(1e-5)  # YAML 1.1 reads "1e-5" as a string; float fields accept it
    assert cfg.model.num_experts == 4
    assert cfg.loss.resolved_aggregation == "seq-mean-token-mean"
    assert cfg.parallel.tensor == 2


def test_model_override_swaps_the_model_file():
    cfg = load_run_config(TINY_RUN, ["model=models/tiny_dense.yaml"])
    assert cfg.model.architecture == "qwen3" and cfg.model.tie_word_embeddings


def test_every_shipped_model_yaml_is_valid():
    for path in sorted((REPO / "configs" / "models").glob("*.yaml")):
        load_model_config(path)


def test_qwen3_30b_a3b_matches_reference_setup():
    m = load_model_config(REPO / "configs" / "models" / "qwen3_30b_a3b.yaml")
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (48, 2048, 32, 4, 128)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.vocab_size) == (128, 8, 768, 151936)
    assert m.norm_topk_prob and not m.tie_word_embeddings and m.rope_theta == 1e6 and m.rms_norm_eps == 1e-6


def test_roundtrip_through_plain_dict():
    cfg = load_run_config(TINY_RUN)
    again = build(RunConfig, to_dict(cfg))
    assert again == cfg


def test_config_reference_lists_every_leaf():
    rows = {r[0]: r for r in describe_fields(RunConfig)}
    assert "loss.vespo.lambda_pos" in rows and ">=0.0001" in rows["loss.vespo.lambda_pos"][3]
    assert "model.num_experts" in rows


# (overrides, field path named in the error, fragment of the message)
BAD_CASES = [
    (["optimizer.lrr=1e-5"], "optimizer.lrr", "unknown key; did you mean 'lr'"),
    (["loss.vespo.k_poss=2"], "loss.vespo.k_poss", "unknown key"),
    (["train.seed=abc"], "train.seed", "must be an integer"),
    (["optimizer.lr=fast"], "optimizer.lr", "must be a number"),
    (["loss.vespo.lambda_pos=-1"], "loss.vespo.lambda_pos", "must be >= 0.0001"),
    (["loss.vespo.lambda_neg=0"], "loss.vespo.lambda_neg", "must be >= 0.0001"),
    (["loss.name=vespa"], "loss.name", "did you mean 'vespo'"),
    (["loss.aggregation=token-sum"], "loss.aggregation", "must be one of"),
    (["model=configs/models/does_not_exist.yaml"], "model", "file not found"),
    (["model.num_experts=0"], "model.num_experts", "must be >= 1 for architecture 'qwen3_moe'"),
    (["model.num_experts_per_tok=9"], "model.num_experts_per_tok", "must be in [1, num_experts=8]"),
    (["model.num_key_value_heads=3"], "model.num_key_value_heads", "must divide num_attention_heads=4"),
    (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by", "must be > 0"),
    (["model.architecture=llama"], "model.architecture", "must be one of"),
    (["model.tie_word_embeddings=yes please"], "model.tie_word_embeddings", "must be true or false"),
    (["precision.fp8.enabled=true"], "precision.fp8.enabled", "needs params_dtype 'bf16'"),
    (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2", "must be < 1"),
    (["optimizer.min_lr=1"], "optimizer.min_lr", "must be <= lr"),
    (["correction.mode=token_tis"], "correction.mode", "needs train.recompute_old_logprobs"),
    (["loss.aggregation=seq-mean-token-sum-norm"], "loss.norm_constant", "is required"),
    (["correction.mis_lower=3", "correction.mis_upper=2", "train.recompute_old_logprobs=true"],
     "correction.mis_lower", "must be < mis_upper"),
    (["train.micro_batch_tokens=0"], "train.micro_batch_tokens", "must be > 0"),
    (["parallel.tensor=1.5"], "parallel.tensor", "must be an integer"),
    (["optimizer=3"], "optimizer", "must be a mapping"),
    (["optimizer.lr=.inf"], "optimizer.lr", "must be finite"),
    (["train.seed=4294967296"], "train.seed", "must be <= 4294967295"),  # NumPy seeds are 32-bit
    (["rollout.stop_token_ids=[3, 128]"], "rollout.stop_token_ids[1]", "outside the vocabulary"),
    (["train.mode=async", "rollout.fleet={servers: [{kind: cpu, model_path: /m}], placement: {colocate: true}}"],
     "rollout.fleet.placement.colocate", "needs train.mode: sync"),
    (["rollout.replay_dir=/r", "rollout.fleet={servers: [{kind: cpu, model_path: /m}], placement: {colocate: true}}"],
     "rollout.fleet.placement.colocate", "cannot be combined with rollout.replay_dir"),
]


@pytest.mark.parametrize("overrides,path,fragment", BAD_CASES, ids=[c[1] + ":" + c[0][0] for c in BAD_CASES])
def test_bad_config_is_one_line_error_naming_the_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(TINY_RUN, overrides)
    err = info.value
    assert err.path == path, str(err)
    assert fragment in str(err), str(err)
    assert str(err).startswith(path + ":")
    assert "\n" not in str(err)


def test_missing_required_model_field(tmp_path):
    model = yaml.safe_load((REPO / "configs/models/tiny_moe.yaml").read_text())
    del model["hidden_size"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(model))
    (tmp_path / "run.yaml").write_text("model: m.yaml\n")
    with pytest.raises(ConfigError, match=r"^model\.hidden_size: is required"):
        load_run_config(tmp_path / "run.yaml")


def test_run_without_model_and_malformed_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("loss:\n  name: vespo\n")
    with pytest.raises(ConfigError, match=r"^model: is required"):
        load_run_config(tmp_path / "run.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^run: invalid YAML .* line"):
        load_run_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_run_config(tmp_path / "list.yaml")


def test_model_path_resolves_relative_to_run_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.yaml").write_text((REPO / "configs/models/tiny_dense.yaml").read_text())
    (tmp_path / "sub" / "run.yaml").write_text("model: m.yaml\n")
    monkeypatch.chdir(REPO)
    assert load_run_config(tmp_path / "sub" / "run.yaml").model.architecture == "qwen3"


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_run_config(TINY_RUN, ["loss.name"])
    with pytest.raises(ConfigError, match=r"^loss.name: is not a mapping"):
        load_run_config(TINY_RUN, ["loss.name.x=1"])


def test_cli_check_reports_config_error(capsys):
    from megatron_vespo.cli import main
    assert main(["check", str(TINY_RUN), "loss.vespo.lambda_pos=-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: loss.vespo.lambda_pos: must be >= 0.0001; got -2.0"
    assert main(["check", str(TINY_RUN)]) == 0


def test_config_reference_doc_is_current():
    from megatron_vespo.cli import config_reference_markdown
    doc = (REPO / "docs" / "config_reference.md").read_text()
    assert doc == config_reference_markdown(), "regenerate: megatron-vespo config-reference > docs/config_reference.md"


# (overrides, field path, fragment): rules a training run needs, checked by RunConfig.check_trainable.
UNTRAINABLE = [
    (["rollout.max_response_len=500"], "rollout.max_response_len", "exceeds the model's max_position_embeddings=512"),
    (["rollout.n_samples=1"], "rollout.n_samples", "at least 2"),
    (["parallel.context=2"], "parallel.context", "not supported by the train step"),
    (["eval.every_steps=1", "eval.sets=[{name: a}]", "eval.max_response_len=600"], "eval.max_response_len",
     "exceeds the model's max_position_embeddings"),
]


@pytest.mark.parametrize("overrides,path,fragment", UNTRAINABLE, ids=[c[1] for c in UNTRAINABLE])
def test_untrainable_config_names_the_field(overrides, path, fragment):
    cfg = load_run_config(TINY_RUN, overrides)
    with pytest.raises(ConfigError) as info:
        cfg.check_trainable()
    assert info.value.path == path and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides,world,path", [
    (["parallel.context=2"], 1, "parallel.context"),
    (["parallel.pipeline=2"], 1, "parallel.pipeline"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=2"], 3, "parallel.tensor"),
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=2"], 2,
     "parallel.pipeline"),
])
def test_world_size_error_names_the_size_at_fault(overrides, world, path):
    cfg = load_run_config(TINY_RUN, overrides)
    with pytest.raises(ConfigError) as info:
        cfg.parallel.check_world_size(world)
    assert info.value.path == path, str(info.value)
    load_run_config(TINY_RUN).parallel.check_world_size(world)  # 1x1x1 fits any world size


def test_non_utf8_yaml_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "run.yaml").write_bytes(b"model: models/tiny_moe.yaml\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^run: .*run.yaml line 2 is not valid UTF-8"):
        load_run_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("overrides,line", [
    (["eval.every_steps=1", "eval.sets=[{name: a}, {name: a}]"], "error: eval.sets[1].name: duplicate eval set name"),
    (["eval.every_steps=1", "eval.sets=[{name: a, verifier: nope}]"], "error: eval.sets[0].verifier: unknown verifier"),
    (["reward.verifier=nope"], "error: reward.verifier: unknown verifier 'nope'"),
])
def test_cli_check_runs_the_launch_checks(capsys, overrides, line):
    from megatron_vespo.cli import main
    assert main(["check", str(TINY_RUN), *overrides]) == 2
    assert capsys.readouterr().err.startswith(line)
