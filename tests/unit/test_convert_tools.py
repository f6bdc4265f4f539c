"""HF <-> Megatron conversion tools and the safetensors / config.json IO under them.

Logit parity of converted checkpoints inside Megatron is in ``tests/multiproc/test_hf_parity.py``;
here: bitwise round trips, the files and configs the tools write, streaming IO, and bad input
(clear error naming the file/tensor, nothing written).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_vespo.checkpoint.hf_to_mcore import convert_hf_to_mcore
from megatron_vespo.checkpoint.mcore_to_hf import convert_mcore_to_hf
from megatron_vespo.checkpoint.hf_io import (
    INDEX_FILE, CheckpointError, SafetensorsReader, SafetensorsWriter, hf_config_from_model, model_config_from_hf,
)
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping
from megatron_vespo.config import ConfigError, load_model_config

ROOT = Path(__file__).resolve().parents[2]
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")
DENSE = load_model_config(ROOT / "configs/models/tiny_dense.yaml")
QWEN3_30B = load_model_config(ROOT / "configs/models/qwen3_30b_a3b.yaml")




to_mcore, to_hf = convert_hf_to_mcore, convert_mcore_to_hf
quiet = {"log": lambda _: None}


def save_random_hf(model_cfg, directory: Path, dtype=torch.float32, seed=0, **save_kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_from_model(model_cfg, dtype)))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return model


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


@pytest.fixture(scope="module")
def moe_bf16(tmp_path_factory) -> Path:
    """A random tiny Qwen3-MoE in bf16, saved by transformers in several shards."""
    directory = tmp_path_factory.mktemp("moe_bf16")
    save_random_hf(MOE, directory, torch.bfloat16, max_shard_size="100KB")
    assert len(list(directory.glob("*.safetensors"))) > 1
    return directory


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_moe_round_trip_is_bitwise_and_loads_in_transformers(moe_bf16, tmp_path):
    from transformers import AutoModelForCausalLM

    mcore, back = tmp_path / "mcore", tmp_path / "back"
    to_mcore(moe_bf16, mcore, **quiet)
    # Canonical Megatron checkpoint: every mapped tensor (alias keys included) + extra states.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(mcore).read_metadata().state_dict_metadata
    mapping = Qwen3Mapping(MOE)
    tensors = {k: tuple(v.size) for k, v in metadata.items() if hasattr(v, "size")}
    assert tensors == mapping.dist_tensors()
    assert set(metadata) - set(tensors) == {o.unique_key for o in mapping.extra_states}
    assert json.loads((mcore / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert load_model_config(mcore / "model_config.yaml") == model_config_from_hf(json.loads((moe_bf16 / "config.json").read_text()))

    to_hf(mcore, back, max_shard_bytes=200_000, **quiet)
    original, converted = hf_tensors(moe_bf16), hf_tensors(back)
    assert set(original) == set(converted)
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16 and torch.equal(converted[name], tensor), name
    index = json.loads((back / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(original) and len(set(index["weight_map"].values())) > 1

    config = json.loads((back / "config.json").read_text())
    source = json.loads((moe_bf16 / "config.json").read_text())
    for key in ("vocab_size", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings", "head_dim",
                "moe_intermediate_size", "router_aux_loss_coef", "initializer_range"):
        assert config[key] == source[key], key
    assert config["num_experts"] == config["num_local_experts"] == source["num_local_experts"] == 8
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == source["rope_parameters"]["rope_theta"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    tokens = torch.randint(0, MOE.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(moe_bf16, dtype=torch.float32)(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(tokens).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("tp", [1, 2])
def test_odd_vocabulary_is_padded_on_the_way_in_and_stripped_on_the_way_out(tmp_path, tp):
    """Vocab 97: the Megatron checkpoint holds Megatron's padded rows for ``tensor_parallel`` (zero),
    the way back writes the 97 real rows, bitwise."""
    from megatron_vespo.checkpoint.mcore_to_hf import DistCheckpointSlices

    model_cfg = dataclasses.replace(DENSE, vocab_size=97, tie_word_embeddings=False)
    hf, mcore, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    save_random_hf(model_cfg, hf, torch.bfloat16)
    # A tiny chunk budget: the embedding is written in row blocks, then the padding block.
    to_mcore(hf, mcore, tensor_parallel=tp, max_chunk_bytes=4096, **quiet)
    rows = 128 * tp
    slices = DistCheckpointSlices(mcore)
    original = hf_tensors(hf)
    for key, name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                      ("output_layer.weight", "lm_head.weight")):
        assert tuple(slices.tensors[key].size) == (rows, 64), key
        (stored,) = slices.read([(key, (0, 0), (rows, 64))])
        assert torch.equal(stored[:97], original[name]), key
        assert stored[97:].abs().max().item() == 0.0, key
    to_hf(mcore, back, read_batch_bytes=4096, **quiet)
    converted = hf_tensors(back)
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
    assert converted["lm_head.weight"].shape == (97, 64)
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 97


def test_dense_tied_round_trip_through_the_command_line(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf, mcore, back, tok = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back", tmp_path / "tok"
    save_random_hf(DENSE, hf)
    vocab = {f"t{i}": i for i in range(DENSE.vocab_size)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0").save_pretrained(tok)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for cmd in (["tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--out", mcore,
                 "--model-yaml", ROOT / "configs/models/tiny_dense.yaml"],
                ["tools/convert_mcore_to_hf.py", "--ckpt", mcore, "--out", back, "--tokenizer-dir", tok]):
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "MiB/s" in proc.stderr  # progress output
    original, converted = hf_tensors(hf), hf_tensors(back)
    assert set(original) == set(converted) and "lm_head.weight" not in converted
    assert all(torch.equal(converted[n], t) for n, t in original.items())
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
    assert AutoTokenizer.from_pretrained(back).convert_tokens_to_ids("t7") == 7

    # Bad input through the command line: exit code 2, the reason, nothing written.
    proc = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(hf), "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "not a Megatron dist checkpoint" in proc.stderr
    assert_nothing_written(tmp_path / "x")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file/tensor, nothing written
# ------------------------------------------------------------------------------------------------


def test_missing_shard_is_named(moe_bf16, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(moe_bf16, hf)
    shard = sorted(hf.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing.*{shard.name}"):
        to_mcore(hf, tmp_path / "out", **quiet)
    assert_nothing_written(tmp_path / "out")


def test_config_that_does_not_match_the_weights(moe_bf16, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(moe_bf16, hf)
    config = json.loads((hf / "config.json").read_text())
    config["num_local_experts"] = 4
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"experts\.4\..*4 experts.*does not match"):
        to_mcore(hf, tmp_path / "out", **quiet)
    config["num_local_experts"], config["moe_intermediate_size"] = 8, 16
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape \(32, 64\).*\(16, 64\)"):
        to_mcore(hf, tmp_path / "out", **quiet)
    # A model YAML that disagrees with config.json.
    with pytest.raises(CheckpointError, match=r"norm_topk_prob: model YAML False vs config.json True"):
        to_mcore(moe_bf16, tmp_path / "out", dataclasses.replace(MOE, norm_topk_prob=False), **quiet)
    assert_nothing_written(tmp_path / "out")


def test_wrong_dtype_is_named(tmp_path):
    hf = tmp_path / "hf"
    save_random_hf(DENSE, hf)  # float32, config says so
    file = hf / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                              r"has dtype torch\.bfloat16.*'float32'"):
        to_mcore(hf, tmp_path / "out", **quiet)
    assert_nothing_written(tmp_path / "out")


def test_bad_megatron_checkpoints(moe_bf16, tmp_path):
    mcore = tmp_path / "mcore"
    to_mcore(moe_bf16, mcore, **quiet)
    with pytest.raises(CheckpointError, match="not a Megatron dist checkpoint"):
        to_hf(moe_bf16, tmp_path / "out", **quiet)
    with pytest.raises(CheckpointError, match="already exists"):
        to_mcore(moe_bf16, mcore, **quiet)
    with pytest.raises(CheckpointError, match=r"'decoder\.layers\.0\.mlp\.router\.weight' has global shape \(8, 64\).*\(16, 64\)"):
        to_hf(mcore, tmp_path / "out", model_cfg=dataclasses.replace(MOE, num_experts=16), **quiet)
    layer_file = mcore / "__0_layer00002.distcp"
    layer_file.unlink()
    with pytest.raises(CheckpointError, match=r"missing: \['__0_layer00002\.distcp'\]"):
        to_hf(mcore, tmp_path / "out", **quiet)
    (mcore / "model_config.yaml").unlink()
    with pytest.raises(CheckpointError, match="model_config.yaml: not found"):
        to_hf(mcore, tmp_path / "out", **quiet)
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Safetensors IO and config.json
# ------------------------------------------------------------------------------------------------


def test_writer_shards_stream_in_any_order_and_read_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=gen).to(torch.bfloat16), "b": torch.randn(300, generator=gen),
               "c": torch.arange(12, dtype=torch.float16).reshape(3, 4), "d": torch.randn(5, 5, generator=gen)}
    writer = SafetensorsWriter(tmp_path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, max_shard_bytes=1024)
    for name in ["d", "b", "a", "c"]:
        writer.write(name, tensors[name])
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    # a (140 B) | b (1200 B, alone: bigger than a shard) | c + d (124 B)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reader = SafetensorsReader(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor) and reader.read(name).dtype == tensor.dtype
    assert all(torch.equal(hf_tensors(tmp_path)[n], t) for n, t in tensors.items())  # the reference library agrees

    incomplete = SafetensorsWriter(tmp_path / "x", {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))})
    incomplete.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"never \(completely\) written.*'b'"):
        incomplete.close()
    with pytest.raises(CheckpointError, match=r"'a': got torch\.float16"):
        SafetensorsWriter(tmp_path / "y", {"a": (torch.float32, (2,))}).write("a", torch.zeros(2, dtype=torch.float16))


def test_reader_rejects_damaged_directories(tmp_path):
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor 'w'"):
        SafetensorsReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"missing.*model-00002\.safetensors"):
        SafetensorsReader(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        SafetensorsReader(tmp_path / "empty")


@pytest.mark.parametrize("model_cfg", [MOE, DENSE, QWEN3_30B], ids=["tiny_moe", "tiny_dense", "qwen3_30b_a3b"])
def test_config_json_round_trips_and_transformers_reads_it(model_cfg):
    from transformers import AutoConfig

    data = hf_config_from_model(model_cfg, torch.bfloat16)
    assert model_config_from_hf(data) == model_cfg
    hf = AutoConfig.for_model(**data)
    assert hf.rope_parameters["rope_theta"] == model_cfg.rope_theta
    assert hf.tie_word_embeddings == model_cfg.tie_word_embeddings and hf.head_dim == model_cfg.kv_channels
    if model_cfg.is_moe:
        assert hf.num_experts == model_cfg.num_experts and hf.norm_topk_prob == model_cfg.norm_topk_prob


def test_legacy_and_unsupported_config_json():
    legacy = {k: v for k, v in hf_config_from_model(QWEN3_30B, torch.bfloat16).items()
              if k not in ("rope_parameters", "num_local_experts", "head_dim")}
    legacy["head_dim"] = 128
    assert model_config_from_hf(legacy) == QWEN3_30B  # transformers 4 style: rope_theta, num_experts
    hf_default = dict(legacy, norm_topk_prob=None)
    del hf_default["norm_topk_prob"]
    assert model_config_from_hf(hf_default).norm_topk_prob is False  # Qwen3MoeConfig's default
    with pytest.raises(ConfigError, match="yarn"):
        model_config_from_hf(dict(legacy, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_hf(dict(legacy, model_type="llama"))
