"""Converted HF checkpoints compute the same logits in Megatron as in HF transformers, in any layout.

Random tiny HF models (Qwen3-MoE matching tiny_moe.yaml with norm_topk_prob true and false, Qwen3
dense with tied embeddings; every weight random, norms included, so a swapped q/k norm or gate/up
half changes the logits) are saved with ``save_pretrained``, converted with
``tools/convert_hf_to_mcore.py`` and loaded with ``dist_checkpointing.load`` into the Megatron
policy: single process (TP=1), TP=2 + sequence parallel, EP=2. The logits must match HF's within
1e-5 (fp32), and the weight exporter must yield exactly the HF files' tensors (also with PP=2,
where each stage's leader yields its own layers). Checkpoints that
Megatron itself saves from the TP=2 layout must convert back to the original HF tensors.

Odd vocabularies (97 tokens, dense untied and MoE): Megatron pads the embedding and output layer to
a multiple of ``make_vocab_size_divisible_by * TP`` (128 x 2 = 256 rows at TP=2, the second TP rank
holding only padding); logits, the trainer's log-probs and entropy must still match HF within 1e-5,
the padded rows stay zero, the export yields the unpadded HF tensors, and Megatron's own padded
TP=2 save converts back to the original HF files bitwise.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.checkpoint.hf_to_mcore import convert_hf_to_mcore
from megatron_vespo.checkpoint.mcore_to_hf import convert_mcore_to_hf
from megatron_vespo.checkpoint.hf_io import SafetensorsReader, hf_config_from_model
from megatron_vespo.config import load_model_config

from .torchrun import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("worker_hf_parity.py")
LOGITS_TOL = 1e-5




def random_hf_model(model_cfg, seed: int):
    """An HF model of ``model_cfg`` with every parameter random (norm weights around 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**hf_config_from_model(model_cfg, torch.float32))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    """HF checkpoints, their conversions, the HF logits, and the worker's case list."""
    tmp = tmp_path_factory.mktemp("hf_parity")
    to_mcore = convert_hf_to_mcore
    moe = load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml")
    dense = load_model_config(REPO_ROOT / "configs/models/tiny_dense.yaml")
    models = {
        "moe_norm_topk": moe,
        "moe_no_norm_topk": dataclasses.replace(moe, norm_topk_prob=False),
        "dense_tied": dense,
        # Layer 1 has a dense MLP (HF mlp_only_layers): the provider must build a per-layer spec.
        "moe_mlp_only_layer": dataclasses.replace(moe, mlp_only_layers=[1]),
    }
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, moe.vocab_size, (2, 12), generator=generator)
    prepared = {}
    for seed, (name, model_cfg) in enumerate(models.items()):
        hf = random_hf_model(model_cfg, seed)
        hf.save_pretrained(tmp / f"{name}_hf")
        with torch.no_grad():
            logits = hf(input_ids=tokens).logits.float()
        torch.save({"tokens": tokens, "hf_logits": logits}, tmp / f"{name}_inputs.pt")
        to_mcore(tmp / f"{name}_hf", tmp / f"{name}_mcore", log=lambda _: None)
        prepared[name] = {"ckpt": str(tmp / f"{name}_mcore"), "hf_dir": str(tmp / f"{name}_hf"),
                          "inputs": str(tmp / f"{name}_inputs.pt")}
    return tmp, prepared


def _run(tmp: Path, spec: list[dict], nproc: int) -> dict:
    spec_path, out = tmp / f"spec_{nproc}.json", tmp / f"results_{nproc}.json"
    spec_path.write_text(json.dumps(spec))
    run_torchrun(WORKER, ["--spec", spec_path, "--out", out], nproc=nproc, timeout=150)
    return json.loads(out.read_text())


def _check(name: str, result: dict) -> None:
    assert result["logits_scale"] > 1.0, "the random model's logits are too small to test anything"
    if "logits_max_abs_diff" in result:  # (pipeline cases check the export only)
        assert result["logits_max_abs_diff"] < LOGITS_TOL, (name, result["logits_max_abs_diff"])
        assert result["logprobs_max_abs_diff"] < LOGITS_TOL, (name, result["logprobs_max_abs_diff"])
        assert result["entropy_max_abs_diff"] < LOGITS_TOL, (name, result["entropy_max_abs_diff"])
    assert result["padding_abs_max"] == 0.0, (name, result["padding_abs_max"])
    assert result["export_missing"] == [] and result["export_unexpected"] == [], (name, result)
    assert result["export_duplicates"] == [], (name, result["export_duplicates"])
    assert result["export_mismatched"] == [], (name, result["export_mismatched"])


def test_single_process_matches_hf(cases):
    tmp, prepared = cases
    layout = {"tp": 1, "ep": 1, "etp": 1, "sp": False}
    # A tiny bucket budget forces many buckets: the exporter's bucketing is exercised.
    spec = [{"name": name, **paths, **layout, "bucket_bytes": 64 * 1024} for name, paths in prepared.items()]
    results = _run(tmp, spec, nproc=1)
    for name, result in results.items():
        _check(name, result)
        assert result["layout_differences"] == [], (name, result["layout_differences"])
        assert result["export_buckets"] > 3


def test_two_process_layouts_match_hf(cases):
    tmp, prepared = cases
    spec = [
        {"name": "moe_tp2_sp", **prepared["moe_norm_topk"], "tp": 2, "ep": 1, "etp": 2, "sp": True},
        {"name": "moe_ep2", **prepared["moe_norm_topk"], "tp": 1, "ep": 2, "etp": 1, "sp": False},
        {"name": "dense_tied_tp2", **prepared["dense_tied"], "tp": 2, "ep": 1, "etp": 1, "sp": False},
        # Pipeline stages: each stage leader yields its own layers (tied embedding: first stage only).
        {"name": "moe_pp2", **prepared["moe_norm_topk"], "tp": 1, "pp": 2, "ep": 1, "etp": 1, "sp": False},
        {"name": "dense_tied_pp2", **prepared["dense_tied"], "tp": 1, "pp": 2, "ep": 1, "etp": 1, "sp": False},
    ]
    for case in spec:
        case["bucket_bytes"] = 256 * 1024
    spec[0]["save_to"] = str(tmp / "megatron_saved_moe_tp2")
    spec[2]["save_to"] = str(tmp / "megatron_saved_dense_tp2")
    results = _run(tmp, spec, nproc=2)
    for name, result in results.items():
        _check(name, result)
        assert result["export_leaders"] == (2 if name.endswith("pp2") else 1), (name, result["export_leaders"])
    assert "logits_max_abs_diff" in results["moe_ep2"] and "logits_max_abs_diff" not in results["moe_pp2"]

    # Checkpoints Megatron saved itself from a TP=2 layout (TP-split chunks, no model_config.yaml)
    # convert back to exactly the original HF tensors.
    to_hf = convert_mcore_to_hf
    for saved, source in (("moe_tp2", "moe_norm_topk"), ("dense_tp2", "dense_tied")):
        model_cfg = load_model_config(Path(prepared[source]["ckpt"]) / "model_config.yaml")
        to_hf(tmp / f"megatron_saved_{saved}", tmp / f"back_{saved}", model_cfg=model_cfg, log=lambda _: None)
        original, converted = SafetensorsReader(prepared[source]["hf_dir"]), SafetensorsReader(tmp / f"back_{saved}")
        assert set(original.names()) == set(converted.names())
        for name in original.names():
            assert torch.equal(original.read(name), converted.read(name)), (saved, name)


ODD_VOCAB = 97


@pytest.fixture(scope="module")
def odd_vocab_cases(tmp_path_factory) -> tuple[Path, dict]:
    """Dense (untied: embedding and output layer both padded) and MoE models with a 97-token vocabulary."""
    tmp = tmp_path_factory.mktemp("hf_parity_odd_vocab")
    moe = load_model_config(REPO_ROOT / "configs/models/tiny_moe.yaml")
    dense = load_model_config(REPO_ROOT / "configs/models/tiny_dense.yaml")
    models = {
        "dense_vocab97": dataclasses.replace(dense, vocab_size=ODD_VOCAB, tie_word_embeddings=False),
        "moe_vocab97": dataclasses.replace(moe, vocab_size=ODD_VOCAB),
    }
    tokens = torch.randint(0, ODD_VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    prepared = {}
    for seed, (name, model_cfg) in enumerate(models.items(), start=10):
        hf = random_hf_model(model_cfg, seed)
        hf.save_pretrained(tmp / f"{name}_hf")
        with torch.no_grad():
            logits = hf(input_ids=tokens).logits.float()
        torch.save({"tokens": tokens, "hf_logits": logits}, tmp / f"{name}_inputs.pt")
        convert_hf_to_mcore(tmp / f"{name}_hf", tmp / f"{name}_mcore", log=lambda _: None)  # padded for TP=1
        prepared[name] = {"ckpt": str(tmp / f"{name}_mcore"), "hf_dir": str(tmp / f"{name}_hf"),
                          "inputs": str(tmp / f"{name}_inputs.pt")}
    return tmp, prepared


def test_odd_vocabulary_tp2_matches_hf(odd_vocab_cases):
    """Before vocabulary padding, TP=2 refused vocab 97 ('TP=2 must divide vocab_size=97')."""
    tmp, prepared = odd_vocab_cases
    spec = [
        {"name": "dense_vocab97_tp2", **prepared["dense_vocab97"], "tp": 2, "ep": 1, "etp": 1, "sp": False},
        {"name": "moe_vocab97_tp2_sp", **prepared["moe_vocab97"], "tp": 2, "ep": 1, "etp": 2, "sp": True},
        # TP=1 (DP=2): padded to 128 rows, the checkpoint's own padding.
        {"name": "dense_vocab97_tp1", **prepared["dense_vocab97"], "tp": 1, "ep": 1, "etp": 1, "sp": False},
    ]
    for case in spec:
        case["bucket_bytes"] = 256 * 1024
    spec[0]["save_to"] = str(tmp / "megatron_saved_dense_vocab97_tp2")
    spec[1]["save_to"] = str(tmp / "megatron_saved_moe_vocab97_tp2")
    results = _run(tmp, spec, nproc=2)
    for name, result in results.items():
        print(name, {k: result[k] for k in ("logits_columns", "logits_max_abs_diff", "logprobs_max_abs_diff",
                                            "entropy_max_abs_diff", "padding_abs_max")})
        _check(name, result)
    assert results["dense_vocab97_tp2"]["logits_columns"] == 256 == results["moe_vocab97_tp2_sp"]["logits_columns"]
    assert results["dense_vocab97_tp2"]["padded_rows_per_rank"] == 128  # rank 1: padding only
    assert results["dense_vocab97_tp1"]["logits_columns"] == 128

    # Megatron's own TP=2 save holds 256 padded rows; the way back strips them, bitwise.
    for saved, source in (("dense_vocab97_tp2", "dense_vocab97"), ("moe_vocab97_tp2", "moe_vocab97")):
        model_cfg = load_model_config(Path(prepared[source]["ckpt"]) / "model_config.yaml")
        convert_mcore_to_hf(tmp / f"megatron_saved_{saved}", tmp / f"back_{saved}", model_cfg=model_cfg,
                            log=lambda _: None)
        original, converted = SafetensorsReader(prepared[source]["hf_dir"]), SafetensorsReader(tmp / f"back_{saved}")
        assert set(original.names()) == set(converted.names())
        for name in original.names():
            assert torch.equal(original.read(name), converted.read(name)), (saved, name)
        assert converted.info("model.embed_tokens.weight").shape[0] == ODD_VOCAB
