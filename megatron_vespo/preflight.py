"""Every check ``train`` makes before it starts anything, run without starting anything.

``megatron-vespo check`` runs it to say whether ``train`` would start; ``train`` runs it first, before
torch and Megatron are imported, so a bad config, data file or checkpoint fails in a second with one
line naming the field, file or row, not after the model is built and the fleet has booted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_vespo.config import ConfigError, RunConfig


def _check_verifiers_and_eval_sets(cfg: RunConfig) -> None:
    """The verifiers the run would look up (reward, and every eval set when evaluation is on) and the
    eval set names."""
    from megatron_vespo.rewards.registry import get_verifier

    wanted = [("reward.verifier", cfg.reward.verifier)]
    if cfg.eval.sets and cfg.eval.every_steps:
        cfg.eval.check_set_names()
        wanted += [(f"eval.sets[{i}].verifier" if s.verifier else "reward.verifier", s.verifier or cfg.reward.verifier)
                   for i, s in enumerate(cfg.eval.sets)]
    for path, name in wanted:
        try:
            get_verifier(name, cfg.reward)
        except KeyError as exc:
            raise ConfigError(path, str(exc.args[0]).split(": ", 1)[-1]) from None


def _check_weights_dir(cfg: RunConfig, path: str, field: str) -> None:
    """``path`` (named by ``field``) is a readable HF or converted directory of the run's model."""
    from megatron_vespo.checkpoint.hf_io import load_checkpoint_model_config, model_config_from_hf, read_hf_config
    from megatron_vespo.checkpoint.init_weights import check_same_model, init_source_is_hf

    src = Path(path)
    found = model_config_from_hf(read_hf_config(src)) if init_source_is_hf(src, field) \
        else load_checkpoint_model_config(src)
    check_same_model(found, cfg.model, str(src))


def _check_checkpoint_files(cfg: RunConfig) -> list[str]:
    """The checkpoint a run would resume from (complete, per its manifest) or start from
    (``checkpoint.init_from``: a readable HF or converted directory of the run's model), and the
    reference model of ``loss.kl`` (read whether the run resumes or not)."""
    ck = cfg.checkpoint
    notes = []
    if cfg.loss.kl.enabled:
        path, field = cfg.kl_reference
        _check_weights_dir(cfg, path, field)
        notes.append(f"loss.kl: reference model from {path}")
    root = Path(ck.dir) if ck.dir else Path(cfg.run.output_dir) / "checkpoints"  # checkpoint_root(cfg)
    if not (ck.init_from or ck.load_dir or ck.resume == "must" or (ck.resume == "auto" and root.is_dir())):
        return notes  # nothing to read (and no torch import for it)
    from megatron_vespo.checkpoint.training import find_resume_checkpoint, read_manifest

    resume = find_resume_checkpoint(cfg)
    if resume is not None:
        read_manifest(resume)
        return [f"checkpoint: resumes from {resume}", *notes]
    if not ck.init_from:
        return notes
    _check_weights_dir(cfg, ck.init_from, "checkpoint.init_from")
    return [f"checkpoint: initial weights from {ck.init_from}", *notes]


def preflight(cfg: RunConfig, world_size: Optional[int] = None, files: bool = True) -> list[str]:
    """Every check ``train`` makes before it starts anything, run without starting anything: the
    trainable-config rules, the layout against ``world_size`` (when known), the verifiers and, with
    ``files``, what it reads first (tokenizer, training and eval data with every token id checked
    against the vocabulary, the checkpoint it resumes or starts from). Raises the error ``train``
    would; returns notes for the user. Both ``check`` and ``train`` call it."""
    cfg.check_trainable()
    if world_size is not None:
        from megatron_vespo.models.layout import validate_layout

        cfg.parallel.check_world_size(world_size)
        validate_layout(cfg.model, cfg.parallel, cfg.precision, world_size)
    if not cfg.rollout.replay_dir:  # a replay generates and scores nothing: its rewards are in the files
        from megatron_vespo.rollout_function import load_rollout_function

        # Imported before the verifiers are looked up: the module may register the one the run names.
        load_rollout_function(cfg.rollout.function)
        _check_verifiers_and_eval_sets(cfg)
    if not files:
        return []
    checkpoint_notes = _check_checkpoint_files(cfg)
    return _check_rollout_files(cfg, resuming=any(n.startswith("checkpoint: resumes") for n in checkpoint_notes)) \
        + checkpoint_notes


def _check_rollout_files(cfg: RunConfig, resuming: bool) -> list[str]:
    """What the run reads before the first rollout: the prompt data, or with ``rollout.replay_dir`` every saved
    batch (checked against the model and sampling settings); and that ``rollout.dump_dir`` can take this run."""
    from megatron_vespo.data import rollout_dump

    if cfg.rollout.replay_dir:
        files = rollout_dump.check_replay_dir(cfg.rollout.replay_dir, rollout_dump.BatchContext.from_config(cfg))
        steps = min(len(files), cfg.run.rollout_steps)
        return [f"replay: {len(files)} saved batch(es) in {cfg.rollout.replay_dir}, {steps} trained (no fleet starts)"]
    from megatron_vespo.data.dataset import check_run_data

    notes = check_run_data(cfg)
    if cfg.rollout.dump_dir:
        rollout_dump.check_dump_dir(cfg.rollout.dump_dir, fresh_run=not resuming)
        notes.append(f"dump: every scored batch is saved to {cfg.rollout.dump_dir}")
    return notes
