"""torchrun worker: a converted checkpoint in a Megatron layout against Hugging Face transformers.

For each case of ``--spec`` (a JSON list written by ``test_hf_parity.py``) in the layout it names:

1. build the policy (fp32) and ``dist_checkpointing.load`` the converted checkpoint into it;
2. forward the fixed tokens and gather the vocab-parallel logits (the real vocabulary's columns:
   Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``); compute the
   token log-probs and entropy with the trainer's vocab-parallel kernel (padding masked);
3. run :class:`HFWeightExporter` and collect what the stage leader yields;
4. (single process only) compare the mapping's keys/shapes/extra-state objects with the model's own
   ``sharded_state_dict()``;
5. (``save_to``) save the model with Megatron's ``dist_checkpointing.save`` from this layout.

Rank 0 writes the measured differences to ``--out`` (JSON); the test asserts on them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vespo.checkpoint.export import HFWeightExporter
from megatron_vespo.checkpoint.hf_io import SafetensorsReader
from megatron_vespo.checkpoint.hf_mapping import Qwen3Mapping
from megatron_vespo.config import load_model_config
from megatron_vespo.config.schema import ParallelConfig, PrecisionConfig, RunConfig
from megatron_vespo.distributed import destroy_distributed, init_distributed
from megatron_vespo.models.provider import build_gpt_model
from megatron_vespo.train.logprobs import vocab_parallel_logprobs


def layout_differences(model, mapping: Qwen3Mapping) -> list[str]:
    """Where the mapping's idea of the canonical keys differs from the model's sharded_state_dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors, objects = {}, set()
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedObject):
            objects.add(v.unique_key)
    expected = mapping.dist_tensors()
    # Aliases are extra keys for the other layer spec: the model has exactly one of each pair.
    aliases = {a for u in mapping.units for a in u.aliases}
    diffs = [f"model has {k} {s}, mapping {expected.get(k)}" for k, s in tensors.items() if expected.get(k) != s]
    diffs += [f"mapping has {k}, model does not" for k in expected if k not in tensors and k not in aliases]
    mine = {o.unique_key for o in mapping.extra_states}
    diffs += [f"extra-state object {o}: model only" for o in sorted(objects - mine)]
    diffs += [f"extra-state object {o}: mapping only" for o in sorted(mine - objects)]
    return diffs


def run_case(case: dict) -> dict:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model_cfg = load_model_config(Path(case["ckpt"]) / "model_config.yaml")
    parallel = ParallelConfig(tensor=case["tp"], pipeline=case.get("pp", 1), expert=case["ep"],
                              expert_tensor=case["etp"], sequence_parallel=case["sp"])
    cfg = RunConfig(model=model_cfg, parallel=parallel, precision=PrecisionConfig(params_dtype="fp32"))
    init_distributed(parallel, seed=7, model=model_cfg, precision=cfg.precision)
    try:
        model = build_gpt_model(cfg)
        state = dist_checkpointing.load(model.sharded_state_dict(), case["ckpt"])
        model.load_state_dict(state)
        model.eval()
        inputs = torch.load(case["inputs"])
        result: dict = {"logits_scale": inputs["hf_logits"].abs().max().item()}
        if parallel.pipeline == 1:  # (a pipeline forward needs the schedule: PP cases check the export only)
            tokens = inputs["tokens"]
            position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
            with torch.no_grad():
                local = model(input_ids=tokens, position_ids=position_ids, attention_mask=None)
                logits = gather_from_tensor_model_parallel_region(local)
                # The trainer's kernel on this rank's shard: labels = the next tokens, padding masked.
                logp, entropy = vocab_parallel_logprobs(
                    local[:, :-1].float(), tokens[:, 1:], tp_group=parallel_state.get_tensor_model_parallel_group(),
                    compute_entropy=True, vocab_size=model_cfg.vocab_size, chunk_tokens=5)
            vocab = model_cfg.vocab_size
            result["logits_columns"] = logits.shape[-1]
            result["logits_max_abs_diff"] = (logits[..., :vocab].float() - inputs["hf_logits"]).abs().max().item()
            hf_logp_all = torch.log_softmax(inputs["hf_logits"][:, :-1].double(), dim=-1)
            hf_logp = hf_logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            hf_entropy = -(hf_logp_all.exp() * hf_logp_all).sum(-1)
            result["logprobs_max_abs_diff"] = (logp.double() - hf_logp).abs().max().item()
            result["entropy_max_abs_diff"] = (entropy.double() - hf_entropy).abs().max().item()
        # Megatron's padded rows stay zero on load (allow_shape_mismatch zero-fills what the checkpoint lacks).
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        padding_abs = 0.0
        for weight in (getattr(getattr(model, "embedding", None), "word_embeddings", None),
                       getattr(model, "output_layer", None)):
            weight = getattr(weight, "weight", None) if weight is not None else None
            if weight is not None:
                valid = max(0, min(weight.shape[0], model_cfg.vocab_size - tp_rank * weight.shape[0]))
                padding_abs = max(padding_abs, weight[valid:].abs().max().item() if valid < weight.shape[0] else 0.0)
        result["padding_abs_max"] = padding_abs
        result["padded_rows_per_rank"] = model_cfg.padded_vocab_size(parallel.tensor) // parallel.tensor

        exporter = HFWeightExporter([model], model_cfg, bucket_bytes=case["bucket_bytes"])
        exported: dict[str, torch.Tensor] = {}
        n_buckets = 0
        for bucket in exporter.buckets():
            n_buckets += 1
            assert exporter.is_leader or not bucket, "only stage leaders yield tensors"
            for name, tensor in bucket:
                assert name not in exported, f"{name} exported twice"
                exported[name] = tensor
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (exported, n_buckets, exporter.is_leader))
        if dist.get_world_size() == 1:
            result["layout_differences"] = layout_differences(model, Qwen3Mapping(model_cfg))
        if case.get("save_to"):  # Megatron's own save from this layout, for the converter to read back
            Path(case["save_to"]).mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), case["save_to"])
        for measure in ("logits_max_abs_diff", "logprobs_max_abs_diff", "entropy_max_abs_diff", "padding_abs_max"):
            diffs: list = [None] * dist.get_world_size()
            dist.all_gather_object(diffs, result.get(measure))
            if measure in result:
                result[measure] = max(diffs)  # the worst rank

        # What all stage leaders yielded together must be the HF files' tensors, each exactly once.
        union: dict[str, torch.Tensor] = {}
        for part, _, _ in everyone:
            result.setdefault("export_duplicates", []).extend(sorted(set(union) & set(part)))
            union.update(part)
        reader = SafetensorsReader(case["hf_dir"])
        expected = {n for n in reader.names() if not (model_cfg.tie_word_embeddings and n == "lm_head.weight")}
        result["export_missing"] = sorted(expected - set(union))
        result["export_unexpected"] = sorted(set(union) - expected)
        result["export_mismatched"] = sorted(
            n for n in expected & set(union)
            if union[n].dtype != reader.info(n).dtype or not torch.equal(union[n], reader.read(n)))
        result["export_buckets"] = sum(n for _, n, leader in everyone if leader)
        result["export_leaders"] = sum(leader for _, _, leader in everyone)
        return result
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cases = json.loads(Path(args.spec).read_text())
    results = {case["name"]: run_case(case) for case in cases}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
