"""torchrun worker: start the policy from a Hugging Face directory (checkpoint.init_from) in some layout.

Rank 0 converts the HF directory once into the cache; every rank loads its own shards; the weights
exported back in HF names (the same path as weight sync) must equal the HF tensors bitwise.
Writes ``{"max_abs_diff": ..., "num_tensors": ..., "missing": [...]}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.init_weights import resolve_init_checkpoint
from megatron_vespo.config import load_run_config
from megatron_vespo.distributed import destroy_distributed, init_distributed
from megatron_vespo.models.trainable import build_model_and_optimizer
from tests.model_state import gather_hf_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_run_config(REPO_ROOT / "configs/tiny_vespo.yaml", args.overrides)
    ctx = init_distributed(cfg.parallel, cfg.train.seed, model=cfg.model, precision=cfg.precision)
    try:
        ckpt = resolve_init_checkpoint(args.hf_dir, cfg.model, Path(args.cache))
        trainable = build_model_and_optimizer(cfg, init_checkpoint=ckpt)
        named = dict(gather_hf_weights(HFWeightExporter(trainable.model, cfg.model)))
        if ctx.rank == 0:
            reference = {}
            for file in sorted(Path(args.hf_dir).glob("*.safetensors")):
                reference.update(load_file(file))
            missing = sorted(set(reference) ^ set(named))
            diff = max(float((named[k].float() - reference[k].float()).abs().max())
                       for k in reference if k in named)
            Path(args.out).write_text(json.dumps({"max_abs_diff": diff, "num_tensors": len(named),
                                                  "missing": missing}))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
