"""A run starts from Hugging Face weights (checkpoint.init_from) in any layout, bitwise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_vespo.checkpoint.hf_io import CheckpointError, hf_config_from_model
from megatron_vespo.checkpoint.init_weights import resolve_init_checkpoint
from megatron_vespo.config import load_model_config
from .torchrun import run_torchrun

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MOE = load_model_config(ROOT / "configs/models/tiny_moe.yaml")


def save_random_hf(model_cfg, directory: Path, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_from_model(model_cfg, torch.float32)))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(directory)


@pytest.mark.multiproc
def test_init_from_hf_dir_in_ep2_equals_hf_tensors(tmp_path):
    hf_dir = tmp_path / "hf"
    save_random_hf(MOE, hf_dir, seed=3)
    out = tmp_path / "report.json"
    run_torchrun(HERE / "worker_init_weights.py",
                 ["--hf-dir", hf_dir, "--cache", tmp_path / "cache", "--out", out, "parallel.expert=2"],
                 nproc=2, timeout=180)
    report = json.loads(out.read_text())
    assert report["missing"] == []
    assert report["max_abs_diff"] == 0.0
    assert (tmp_path / "cache" / "hf_mcore" / "model_config.yaml").is_file()  # converted once, reusable


def test_init_from_rejects_a_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face directory"):
        resolve_init_checkpoint(str(tmp_path / "empty"), MOE, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_init_checkpoint(str(tmp_path / "nope"), MOE, tmp_path / "cache")
